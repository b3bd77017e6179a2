"""Ahead-of-time compile of every HYDRA Triton kernel specialization for sm_80 and sm_90, on CPU.

CI runs the kernels only in the Triton interpreter, which accepts what the real compiler rejects
(too much shared memory, register spills, ...). Triton's real compiler needs no GPU: given a
``GPUTarget`` it builds PTX and a cubin, and the ``ptxas`` bundled with Triton reports registers
and spills. This module does that for every specialization the launchers can choose:

1. **Enumerate.** ``kernel_shapes(config)`` reduces a ``HydraConfig`` to the sizes the kernels see
   (hidden, heads, latent head dim, conv kernels, rotary dim). ``dry_run(shapes, dtype, scenario)``
   calls each op's real launcher / ``autograd.Function`` on *meta* tensors inside
   ``_triton_utils.record_launches()``: nothing runs, every ``launch(...)`` is recorded with the
   exact constexprs, ``num_warps`` and argument values the launcher picked. Scenarios: a training
   step at T = 2048 (forward + backward), a ragged step at T = 1000 (MoD/MoR pick arbitrary token
   counts, so integer arguments lose their divisibility-by-16 specialization) and a cached decode
   step (T = 1, conv state, forward only). ``enumerate_launches()`` does this for every preset of
   ``configuration_hydra._PRESETS``, ``tiny`` configs (hidden 128, 4 heads, compression 1 / 2,
   every supported conv kernel pair) and the edge of the supported envelope
   (``ops_hydra.TRITON_LIMITS``), in fp32, bf16 and fp16, and dedupes by Triton's own
   specialization key (signature, constexprs, divisibility attributes, options).
2. **Compile.** ``compile_launch(spec, target)`` binds the recorded arguments with Triton's own
   binder (so divisibility / ``== 1`` specialization is what a GPU launch would get), compiles
   with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))`` and runs the
   bundled ``ptxas -v`` on the PTX for registers and spill bytes; shared memory comes from the
   compiled metadata. ``compile_all()`` spreads the work over worker processes started without
   ``TRITON_INTERPRET`` (the interpreter decides at import time, so the workers import the kernel
   modules fresh). Triton's on-disk cache keeps the compiled artifacts; the ``ptxas`` usage is
   cached next to them, keyed by the kernel hash.

``python -m hydra_hf.ops.aot_compile`` prints one line per (specialization, target) and a
per-kernel summary; ``tests/test_ops_compile.py`` asserts on the same results.

This relies on two private Triton helpers (``create_function_from_signature`` and
``JITFunction._pack_args``, Triton 3.9) so that the compiled specialization is exactly the one a
launch would build.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from typing import Iterable

import torch

from ._triton_utils import KernelLaunch, record_launches

# ---------------------------------------------------------------- hardware limits
TARGETS = {"sm_80": 80, "sm_90": 90}
# Largest dynamic shared memory one block may use (opt-in): A100 163 KB, H100 227 KB.
SHARED_MEM_LIMIT = {"sm_80": 166912, "sm_90": 232448}
# Shared memory per SM (for occupancy): A100 164 KB, H100 228 KB; 1 KB per block is reserved.
SHARED_MEM_PER_SM = {"sm_80": 167936, "sm_90": 233472}
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCENARIOS = {  # name -> (T, backward, conv state)
    "train": (2048, True, False),
    "ragged": (1000, True, False),
    "decode": (1, False, True),
}
CI_SCENARIOS = ("train", "decode")


# ---------------------------------------------------------------- shapes from configs
@dataclasses.dataclass(frozen=True)
class KernelShapes:
    """The sizes of one model that the kernels see."""

    hidden: int
    heads: int  # query heads Hq
    kv_heads: int  # Hk
    head_dim: int  # latent head dim h
    seq_kernel: int  # Ks
    chan_kernel: int  # Kc
    rotary_dim: int
    qk_mean: bool = True


def kernel_shapes(config) -> KernelShapes:
    """The kernel-facing sizes of a ``HydraConfig``."""
    return KernelShapes(
        hidden=config.hidden_size, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
        head_dim=config.latent_head_dim, seq_kernel=config.qk_conv_kernel_size,
        chan_kernel=config.qk_channel_conv_kernel_size, rotary_dim=config.rotary_dim, qk_mean=config.use_qk_mean,
    )


def default_configs() -> dict[str, KernelShapes]:
    """Every preset, ``tiny`` configs with every supported conv kernel pair, and the supported edge."""
    from ..configuration_hydra import PRESET_NAMES, HydraConfig
    from ..ops_hydra import TRITON_LIMITS

    out = {name: kernel_shapes(HydraConfig.from_preset(name)) for name in PRESET_NAMES}
    for cf in (1, 2):
        for ks in range(1, TRITON_LIMITS["qk_conv_kernel_size"] + 1):
            for kc in range(1, TRITON_LIMITS["qk_channel_conv_kernel_size"] + 1):
                cfg = HydraConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                                  compression_factor=cf, qk_conv_kernel_size=ks, qk_channel_conv_kernel_size=kc)
                out[f"tiny-cf{cf}-ks{ks}-kc{kc}"] = kernel_shapes(cfg)
    # the supported edge: largest conv kernels at the largest head dim and the largest latent width / hidden size
    h = TRITON_LIMITS["latent_head_dim"]
    heads = TRITON_LIMITS["padded_latent_size"] // h
    conv = HydraConfig(hidden_size=TRITON_LIMITS["padded_latent_size"], intermediate_size=256, num_attention_heads=heads,
                       num_key_value_heads=heads, compression_factor=1,
                       qk_conv_kernel_size=TRITON_LIMITS["qk_conv_kernel_size"],
                       qk_channel_conv_kernel_size=TRITON_LIMITS["qk_channel_conv_kernel_size"])
    out["edge-conv"] = kernel_shapes(conv)
    wide = HydraConfig(hidden_size=TRITON_LIMITS["hidden_size"], intermediate_size=256, num_attention_heads=heads,
                       num_key_value_heads=heads // 4, compression_factor=TRITON_LIMITS["hidden_size"] // (heads * h))
    out["edge-hidden"] = kernel_shapes(wide)
    return out


# ---------------------------------------------------------------- dry runs
def _kernel_module(name: str):
    return importlib.import_module(f"hydra_hf.ops.{name}")


def _meta(*shape, dtype, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)


def _fwd_bwd(fn, inputs, backward: bool):
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    outs = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
    if backward and outs:
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        torch.autograd.grad(outs, leaves, [torch.empty_like(o) for o in outs])


def dry_run(s: KernelShapes, dtype: torch.dtype, scenario: str, batch: int = 2) -> list[KernelLaunch]:
    """The launches one forward (+ backward) of every kernel-backed op makes at these shapes."""
    T, backward, with_state = SCENARIOS[scenario]
    B, E, h = batch, s.hidden, s.head_dim
    grad = backward
    cc, qk = _kernel_module("causal_conv_triton"), _kernel_module("qk_norm_rope_triton")
    rn, rg, mp = _kernel_module("rms_norm_triton"), _kernel_module("routing_gather_triton"), _kernel_module("moe_permute_triton")
    P = cc.causal_conv_state_len(s.seq_kernel, s.chan_kernel)
    with torch.enable_grad(), record_launches() as rec:
        x = _meta(B, T, E, dtype=dtype, grad=grad)
        w = _meta(E, dtype=dtype, grad=grad)
        _fwd_bwd(lambda: rn.rms_norm_triton(x, w, 1e-6), (x, w), backward)
        for H in (s.heads, s.kv_heads):  # q and k convs
            C = H * h
            xc = _meta(B, T, C, dtype=dtype, grad=grad)
            ws = _meta(C, s.seq_kernel, dtype=dtype, grad=grad)
            wc = _meta(C, h, s.chan_kernel, dtype=dtype, grad=grad)
            st = _meta(B, P, C, dtype=dtype) if with_state else None
            _fwd_bwd(lambda: cc.causal_conv_triton(xc, ws, wc, H, st), (xc, ws, wc), backward)
        q, k = _meta(B, T, s.heads, h, dtype=dtype, grad=grad), _meta(B, T, s.kv_heads, h, dtype=dtype, grad=grad)
        qm = _meta(B, T, s.heads, h, dtype=dtype, grad=grad) if s.qk_mean else None
        km = _meta(B, T, s.kv_heads, h, dtype=dtype, grad=grad) if s.qk_mean else None
        temp = _meta(s.kv_heads, dtype=torch.float32, grad=grad)
        cos = _meta(1, T, s.rotary_dim, dtype=dtype)
        _fwd_bwd(lambda: qk.qk_norm_rope_triton(q, k, qm, km, temp, cos, cos), (q, k, qm, km, temp), backward)
        if T > 1:  # routed tokens: MoD / MoR gather-scatter, MoE permute (training and prefill only)
            K = math.ceil(0.75 * T)
            idx = torch.empty(B, K, device="meta", dtype=torch.int64)
            upd, gate = _meta(B, K, E, dtype=dtype, grad=grad), _meta(B, K, dtype=dtype, grad=grad)
            _fwd_bwd(lambda: rg.gather_tokens_triton(x, idx), (x,), backward)
            _fwd_bwd(lambda: rg.scatter_gated_add_triton(x, upd, idx, gate), (x, upd, gate), backward)
            for topk in (1, 2):
                N = B * T
                xt = _meta(N, E, dtype=dtype, grad=grad)
                pairs = torch.empty(N * topk, device="meta", dtype=torch.int64)
                _fwd_bwd(lambda: mp.MoEPermuteFunction.apply(xt, pairs, topk), (xt,), backward)
                eo, wts = _meta(N * topk, E, dtype=dtype, grad=grad), _meta(N, topk, dtype=dtype, grad=grad)
                _fwd_bwd(lambda: mp.moe_unpermute_triton(eo, pairs, wts), (eo, wts), backward)
    return rec


# ---------------------------------------------------------------- specializations
@dataclasses.dataclass
class Spec:
    """One distinct compiled specialization and the (config, dtype, scenario) labels that choose it."""

    key: str
    kernel: str  # kernel function name
    module: str  # hydra_hf.ops.<module>, e.g. causal_conv_triton
    launch: KernelLaunch
    labels: list[str]


def _bind(launch: KernelLaunch, arch: int):
    """Triton's own binding of a launch for ``arch``: (options, signature, constexprs, attrs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.meta)
    return fn._pack_args(backend, dict(launch.meta), bound, specialization, options)


def _spec_key(launch: KernelLaunch) -> str:
    options, signature, constexprs, attrs = _bind(launch, 90)
    return repr((launch.kernel.__name__, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(attrs.items()), options.num_warps, options.num_stages))


def enumerate_launches(configs: dict[str, KernelShapes] | None = None, dtypes: Iterable[str] = tuple(DTYPES),
                       scenarios: Iterable[str] = tuple(SCENARIOS)) -> list[Spec]:
    """Every distinct specialization the launchers choose for ``configs`` x ``dtypes`` x ``scenarios``."""
    configs = default_configs() if configs is None else configs
    specs: dict[str, Spec] = {}
    for name, shapes in configs.items():
        for dt in dtypes:
            for sc in scenarios:
                for launch in dry_run(shapes, DTYPES[dt], sc):
                    key = _spec_key(launch)
                    label = f"{name}/{dt}/{sc}"
                    if key in specs:
                        if label not in specs[key].labels:
                            specs[key].labels.append(label)
                    else:
                        module = launch.kernel.fn.__module__.rsplit(".", 1)[-1]
                        specs[key] = Spec(key, launch.kernel.__name__, module, launch, [label])
    return list(specs.values())


# ---------------------------------------------------------------- compile
@dataclasses.dataclass
class CompileResult:
    kernel: str
    module: str
    target: str  # "sm_80" / "sm_90"
    labels: list[str]
    constexprs: dict
    num_warps: int
    ok: bool
    error: str = ""
    registers: int = 0
    spill_bytes: int = 0  # ptxas "bytes spill stores"
    shared: int = 0  # bytes of shared memory per block
    grid: tuple = ()

    @property
    def shared_limit(self) -> int:
        return SHARED_MEM_LIMIT[self.target]

    @property
    def occupancy(self) -> float:
        return occupancy(self.registers, self.num_warps, self.shared, self.target)

    def problems(self) -> list[str]:
        """What a GPU would reject or run badly: compile error, shared memory over the limit, spills."""
        out = []
        if not self.ok:
            out.append(f"compile failed: {self.error}")
        if self.shared > self.shared_limit:
            out.append(f"shared memory {self.shared} B > {self.target} limit {self.shared_limit} B")
        if self.spill_bytes > 0:
            out.append(f"{self.spill_bytes} B register spills ({self.registers} registers)")
        return out


def occupancy(registers: int, num_warps: int, shared: int, target: str) -> float:
    """Estimated fraction of an SM's 64 warp slots a kernel keeps busy (registers, shared memory, warps)."""
    if registers <= 0:
        return 0.0
    regs_per_warp = math.ceil(registers * 32 / 256) * 256  # allocation unit: 256 registers per warp
    blocks = min(MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps,
                 (REGISTERS_PER_SM // regs_per_warp) // num_warps)
    if shared > 0:
        blocks = min(blocks, SHARED_MEM_PER_SM[target] // (shared + 1024))
    return blocks * num_warps / MAX_WARPS_PER_SM


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_bytes": re.compile(r"(\d+) bytes spill stores"),
}


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill-store bytes of a PTX kernel, from the bundled ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               src, "-o", os.path.join(d, "k.cubin")]
        return _parse_ptxas(subprocess.run(cmd, capture_output=True, text=True, check=True).stderr)


def _parse_ptxas(log: str) -> dict:
    out = {}
    for name, pattern in _PTXAS_RE.items():
        m = pattern.search(log)
        out[name] = int(m.group(1)) if m else 0
    return out


@contextlib.contextmanager
def _ptxas_log_on():
    from triton import knobs

    previous = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log = previous


def _usage_cache_dir() -> str:
    from triton import knobs

    d = os.path.join(knobs.cache.dir, "hydra_ptxas_usage")
    os.makedirs(d, exist_ok=True)
    return d


def compile_launch(spec: Spec, target: str) -> CompileResult:
    """Compile one specialization for ``target`` ("sm_80" / "sm_90") and report its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = TARGETS[target]
    launch = spec.launch
    constexprs = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                  for k, v in launch.meta.items() if k not in ("num_warps", "num_stages")}
    res = CompileResult(spec.kernel, spec.module, target, spec.labels, constexprs, launch.meta.get("num_warps", 4),
                        ok=False, grid=launch.grid)
    try:
        options, signature, consts, attrs = _bind(launch, arch)
        res.num_warps = options.num_warps
        log = io.StringIO()
        with _ptxas_log_on(), contextlib.redirect_stdout(log):  # Triton runs `ptxas -v`; keep what it prints
            kernel = triton.compile(ASTSource(launch.kernel, signature, consts, attrs),
                                    target=GPUTarget("cuda", arch, 32), options=options.__dict__)
        cache = os.path.join(_usage_cache_dir(), f"{kernel.hash}.json")
        if "registers" in log.getvalue():  # compiled now: parse Triton's own ptxas log
            usage = _parse_ptxas(log.getvalue())
        elif os.path.exists(cache):
            with open(cache) as f:
                usage = json.load(f)
        else:  # a Triton cache hit from a run without this module: run ptxas once more
            usage = ptxas_usage(kernel.asm["ptx"], arch)
        with open(cache, "w") as f:
            json.dump(usage, f)
        res.registers, res.spill_bytes = usage["registers"], usage["spill_bytes"]
        res.shared = int(kernel.metadata.shared)
        res.ok = True
    except Exception as e:  # report it: the CI test fails on any compile error
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return res


def ci_configs() -> dict[str, KernelShapes]:
    """The CI subset of ``default_configs``: every preset, the two edges and the largest ``tiny``
    (Ks = 4, Kc = 2), with the ``CI_SCENARIOS``. The other ``tiny`` conv-kernel pairs (shorter tap
    loops of the same kernels) and the ragged scenario (integer arguments not divisible by 16) add
    specializations that differ only there; ``python -m hydra_hf.ops.aot_compile --all`` compiles
    them too."""
    return {k: v for k, v in default_configs().items() if not k.startswith("tiny-") or k == "tiny-cf2-ks4-kc2"}


def _compile_shard(index: int, count: int, targets: list[str], full: bool) -> list[dict]:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if full:
        specs = enumerate_launches(default_configs())
    else:
        specs = enumerate_launches(ci_configs(), scenarios=CI_SCENARIOS)
    specs = _ordered(specs)
    out = []
    for spec in specs[index::count]:
        for target in targets:
            out.append(dataclasses.asdict(compile_launch(spec, target)))
    return out


def _ordered(specs: list[Spec]) -> list[Spec]:
    """Heaviest first (the conv backward), so that round-robin shards get similar work."""
    weight = {"_causal_conv_bwd_kernel": 0, "_causal_conv_fwd_kernel": 1}
    return sorted(specs, key=lambda s: (weight.get(s.kernel, 2), s.key))


def compile_all(jobs: int | None = None, targets: Iterable[str] = tuple(TARGETS), full: bool = False) -> list[CompileResult]:
    """Enumerate and compile every specialization for every target, in ``jobs`` fresh worker processes.

    The workers run ``python -m hydra_hf.ops.aot_compile --shard i/n`` with ``TRITON_INTERPRET``
    removed from their environment, so this works from an interpreter test session too.
    """
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    targets = list(targets)
    procs = [
        subprocess.Popen([sys.executable, "-m", "hydra_hf.ops.aot_compile", "--shard", f"{i}/{jobs}",
                          "--targets", *targets, *(["--all"] if full else [])], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(jobs)
    ]
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"aot_compile worker failed ({p.returncode}):\n{err[-4000:]}")
        results.extend(CompileResult(**{**r, "grid": tuple(r["grid"])}) for r in json.loads(out))
    return results


# ---------------------------------------------------------------- reporting
def summarize(results: list[CompileResult]) -> list[dict]:
    """Per (module, kernel): specialization count, max registers, total spilling specs, max shared memory."""
    rows = defaultdict(lambda: dict(specs=0, max_registers=0, spilling=0, max_spill_bytes=0, max_shared=0, failed=0))
    for r in results:
        row = rows[(r.module, r.kernel)]
        row["specs"] += 1
        row["failed"] += not r.ok
        row["max_registers"] = max(row["max_registers"], r.registers)
        row["spilling"] += r.spill_bytes > 0
        row["max_spill_bytes"] = max(row["max_spill_bytes"], r.spill_bytes)
        row["max_shared"] = max(row["max_shared"], r.shared)
    return [dict(module=m, kernel=k, **v) for (m, k), v in sorted(rows.items())]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compile every HYDRA Triton kernel specialization for sm_80 / sm_90.")
    p.add_argument("--shard", help="worker mode: i/n, print this shard's results as JSON")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--verbose", action="store_true", help="one line per compiled specialization")
    p.add_argument("--all", action="store_true",
                   help="every tiny conv-kernel pair and the ragged scenario too (default: the CI subset)")
    args = p.parse_args(argv)
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        json.dump(_compile_shard(i, n, args.targets, args.all), sys.stdout)
        return 0
    results = compile_all(args.jobs, args.targets, args.all)
    if args.verbose:
        for r in sorted(results, key=lambda r: (r.kernel, r.target, str(r.constexprs))):
            print(f"{r.target} {r.kernel:28s} warps={r.num_warps} regs={r.registers:3d} spill={r.spill_bytes:6d} "
                  f"smem={r.shared:7d} {r.constexprs} {r.labels[0]} (+{len(r.labels) - 1})"
                  + (f" ERROR {r.error}" if not r.ok else ""))
    print(f"{'kernel':32s} {'compiles':>8s} {'failed':>6s} {'max regs':>8s} {'spilling':>8s} {'max spill B':>11s} "
          f"{'max smem B':>10s}")
    for row in summarize(results):
        print(f"{row['kernel']:32s} {row['specs']:8d} {row['failed']:6d} {row['max_registers']:8d} "
              f"{row['spilling']:8d} {row['max_spill_bytes']:11d} {row['max_shared']:10d}")
    bad = [r for r in results if r.problems()]
    print(f"{len(results)} compiles, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
