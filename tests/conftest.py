"""Shared fixtures: tiny HYDRA configs that run in milliseconds on CPU, the Triton-interpreter
setup of the kernel tests, and the relative-error metric every numerical test uses."""

import importlib
import os

import pytest
import torch

import hydra_hf  # noqa: F401  (registers the Auto classes)
from hydra_hf import HydraConfig, HydraForCausalLM

# ---------------------------------------------------------------- Triton kernels under test
# Without CUDA the kernels run on CPU in the Triton interpreter. Triton decides interpreted vs
# compiled when a kernel is *defined*, so every kernel module is imported here, once, with
# TRITON_INTERPRET=1 set; the variable is then restored so that the other tests take the fast
# reference path, and the `triton_interpreter` fixture sets it again around each kernel test
# (the dispatcher only takes a Triton path on CPU while it is set).
INTERPRET = not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 / Liger kernels need a CUDA GPU")
KERNEL_MODULES = (
    "causal_conv_triton", "qk_norm_rope_triton", "rms_norm_triton", "routing_gather_triton", "moe_permute_triton",
    "cross_entropy_liger",
)


# Python source that, run first in a fresh interpreter (`python -c BLOCK_HYDRA_HF + code`), makes `import hydra_hf`
# fail there: what a user without the package has (remote-code and model-card tests).
BLOCK_HYDRA_HF = r"""
import sys

class BlockHydraHF:
    def find_spec(self, name, path=None, target=None):
        if name == "hydra_hf" or name.startswith("hydra_hf."):
            raise ImportError("hydra_hf is blocked in this test")
        return None

sys.meta_path.insert(0, BlockHydraHF())
"""


def _import_kernel_modules() -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in KERNEL_MODULES:
            importlib.import_module(f"hydra_hf.ops.{name}")
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_kernel_modules()


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run one test with the Triton path enabled on CPU (use via `pytestmark`)."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def tiny_config(**overrides) -> HydraConfig:
    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        compression_factor=2,
        num_unique_blocks=2,
        mor_recursions=2,
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    return HydraConfig(**kwargs)


def tiny_model(seed: int = 0, spread_routers: bool = True, **overrides) -> HydraForCausalLM:
    """A tiny model; routers get random weights so that routing selects a real mix of tokens."""
    torch.manual_seed(seed)
    model = HydraForCausalLM(tiny_config(**overrides))
    if spread_routers:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "routers" in name and name.endswith("proj.weight"):
                    param.normal_(0.0, 0.5)
    return model


ROUTING_MODES = {
    "dense": {},
    "mod": dict(mod_enabled=True, mod_every=1),
    "mor_expert": dict(mor_enabled=True, mor_routing="expert_choice"),
    "mor_token": dict(mor_enabled=True, mor_routing="token_choice", mor_recursions=3),
    "moe": dict(moe_enabled=True, moe_num_layers=2, num_local_experts=3, num_experts_per_tok=2),
    "middle_cycle": dict(num_unique_blocks=4, mor_sharing="middle_cycle", mor_enabled=True, mod_enabled=True),
    "all": dict(mod_enabled=True, mor_enabled=True, moe_enabled=True, moe_num_layers=1, mod_use_predictor=True),
    "static": dict(mod_enabled=True, mor_enabled=True, static_routing=True),
}


@pytest.fixture(params=list(ROUTING_MODES))
def routing_mode(request):
    return request.param, ROUTING_MODES[request.param]
