"""Every Triton kernel specialization compiles for sm_80 and sm_90 with the real compiler, on CPU.

The interpreter tests (``test_ops_*.py``) check numbers; they cannot see shared memory, register
spills or what ``ptxas`` rejects. ``hydra_hf.ops.aot_compile`` records the launches the launchers
choose (dry runs on meta tensors) for every preset, a ``tiny`` config and the edges of
``ops_hydra.TRITON_LIMITS``, in fp32 / bf16 / fp16, and compiles each distinct specialization for
``GPUTarget("cuda", 80, 32)`` and ``("cuda", 90, 32)`` in worker processes. Compiled artifacts
stay in Triton's cache (and the ``ptxas`` usage next to them), so a second run is fast.

The same module holds the tests of the one place that says which configs the kernels run
(``ops_hydra.TRITON_LIMITS``): the compile check above is what justifies those limits.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hydra_hf import HydraConfig, HydraForCausalLM, ops
from hydra_hf.ops import aot_compile as A
from hydra_hf.ops.reference import causal_conv_ref
from conftest import rel, tiny_config

EXPECTED_KERNELS = {
    "_causal_conv_fwd_kernel", "_causal_conv_bwd_dx_kernel", "_causal_conv_bwd_dw_kernel",
    "_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel",
    "_gather_fwd_kernel", "_gather_bwd_kernel", "_scatter_fwd_kernel", "_scatter_bwd_kernel",
    "_permute_fwd_kernel", "_permute_bwd_kernel", "_unpermute_fwd_kernel", "_unpermute_bwd_kernel",
}


@pytest.fixture(scope="module")
def compiled():
    """Compile the CI set once per run (both targets)."""
    return A.compile_all()


def _describe(results):
    return "\n".join(f"{r.target} {r.kernel} {r.constexprs} warps={r.num_warps} [{r.labels[0]}]: {'; '.join(r.problems())}"
                     for r in results[:20])


def test_every_kernel_and_target_is_covered(compiled):
    assert {r.kernel for r in compiled} == EXPECTED_KERNELS
    assert {r.target for r in compiled} == set(A.TARGETS)
    labels = {label.split("/")[0] for r in compiled for label in r.labels}
    from hydra_hf.configuration_hydra import PRESET_NAMES

    assert set(PRESET_NAMES) <= labels and {"edge-conv", "edge-hidden"} <= labels
    assert {label.split("/")[1] for r in compiled for label in r.labels} == set(A.DTYPES)


def test_every_specialization_compiles(compiled):
    failed = [r for r in compiled if not r.ok]
    assert not failed, _describe(failed)


def test_shared_memory_within_sm80_and_sm90(compiled):
    over = [r for r in compiled if r.shared > A.SHARED_MEM_LIMIT[r.target]]
    assert not over, _describe(over)


def test_no_register_spills(compiled):
    spilling = [r for r in compiled if r.spill_bytes > 0]
    assert not spilling, _describe(spilling)


# A deliberately oversized tile: the causal-conv weight-gradient kernel with a 1024-step time tile
# keeps two (64 x 1024) bf16 dot operands in shared memory, 256 KiB > both limits.
_OVERSIZED = textwrap.dedent("""
    import dataclasses, importlib, json
    from hydra_hf.ops import aot_compile as A
    cc = importlib.import_module("hydra_hf.ops.causal_conv_triton")
    cc.CONV_TILES[("bwd_dw", False)] = (1024, 64, 8)
    shapes = A.default_configs()["750M"]  # h = 64
    launches = [l for l in A.dry_run(shapes, A.DTYPES["bf16"], "train") if l.kernel.__name__ == "_causal_conv_bwd_dw_kernel"]
    spec = A.Spec("oversized", launches[0].kernel.__name__, "causal_conv", launches[0], ["750M/bf16/train"])
    print(json.dumps(dataclasses.asdict(A.compile_launch(spec, "sm_90"))))
""")


def test_oversized_tile_is_reported_over_the_limit():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _OVERSIZED], env=env, capture_output=True, text=True, check=True)
    res = A.CompileResult(**json.loads(out.stdout.strip().splitlines()[-1]))
    assert res.ok and res.constexprs["BLOCK_T"] == 1024
    assert res.shared > A.SHARED_MEM_LIMIT["sm_90"]
    assert any("shared memory" in p for p in res.problems())


def test_problems_and_occupancy_are_computed_from_the_figures():
    ok = A.CompileResult("k", "m", "sm_80", ["x"], {}, 4, ok=True, registers=64, shared=16384)
    assert ok.problems() == []
    # 64 registers x 32 threads = 2048 per warp: 32 warps = 8 blocks of 4 warps (shared memory allows 9)
    assert ok.occupancy == pytest.approx(32 / 64)
    spill = dataclasses.replace(ok, registers=255, spill_bytes=120)  # 8192 registers per warp: 8 warps
    assert "spills" in spill.problems()[0] and spill.occupancy == pytest.approx(8 / 64)
    big = dataclasses.replace(ok, shared=A.SHARED_MEM_LIMIT["sm_80"] + 1)
    assert "shared memory" in big.problems()[0] and big.occupancy == 0.0
    assert dataclasses.replace(ok, ok=False, error="boom").problems()[0].startswith("compile failed")


# ---------------------------------------------------------------- the limits: one place, used twice
def test_every_preset_and_the_edges_are_within_the_limits():
    from hydra_hf.configuration_hydra import PRESET_NAMES

    for name in PRESET_NAMES:
        assert ops.triton_config_violations(HydraConfig.from_preset(name)) == [], name
    # the edge configs the compile test checks are exactly at the limits
    edges = A.default_configs()
    assert edges["edge-conv"].head_dim == ops.TRITON_LIMITS["latent_head_dim"]
    assert edges["edge-conv"].seq_kernel == ops.TRITON_LIMITS["qk_conv_kernel_size"]
    assert edges["edge-conv"].chan_kernel == ops.TRITON_LIMITS["qk_channel_conv_kernel_size"]
    assert edges["edge-conv"].heads * edges["edge-conv"].head_dim == ops.TRITON_LIMITS["padded_latent_size"]
    assert edges["edge-hidden"].hidden == ops.TRITON_LIMITS["hidden_size"]


@pytest.mark.parametrize("field,value", [("qk_conv_kernel_size", 5), ("qk_channel_conv_kernel_size", 3)])
def test_triton_backend_refuses_a_config_the_kernels_cannot_run(field, value):
    with pytest.raises(ValueError, match=field):
        HydraForCausalLM(tiny_config(kernel_backend="triton", **{field: value}))
    HydraForCausalLM(tiny_config(kernel_backend="auto", **{field: value}))  # auto: the reference runs these ops
    HydraForCausalLM(tiny_config(kernel_backend="torch", **{field: value}))


def test_triton_backend_refuses_a_head_dim_above_the_limit():
    cfg = tiny_config(kernel_backend="triton", hidden_size=512, num_attention_heads=2, compression_factor=2)
    assert cfg.latent_head_dim == 128
    with pytest.raises(ValueError, match="latent head dim"):
        HydraForCausalLM(cfg)


@pytest.mark.usefixtures("triton_interpreter")
def test_dispatcher_runs_the_reference_outside_the_limits(monkeypatch):
    import importlib

    cc = importlib.import_module("hydra_hf.ops.causal_conv_triton")
    calls = []
    monkeypatch.setattr(cc, "causal_conv_triton", lambda *a: calls.append(1) or causal_conv_ref(*a))
    g = torch.Generator().manual_seed(0)
    x, wc = torch.randn(1, 6, 16, generator=g), torch.randn(16, 8, 1, generator=g)
    for ks, expect in ((4, [1]), (5, [1])):  # Ks = 5 is above the limit: never reaches the kernel
        ws = torch.randn(16, ks, generator=g)
        out = ops.causal_conv(x, ws, wc, 2, backend="triton")
        assert rel(out, causal_conv_ref(x, ws, wc, 2)) < 1e-6
        assert calls == expect
