"""Whole model: kernel_backend="triton" (Triton interpreter on CPU) matches "torch" in logits
and in every parameter gradient, on the debug preset's width with routing on."""

import os

import torch

_PREV = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported

import pytest  # noqa: E402

from hydra_hf import HydraConfig, HydraForCausalLM  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret_env():
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _PREV is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_triton_backend_matches_torch_backend():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = dict(
        vocab_size=128, num_unique_blocks=1, mor_recursions=2, mod_enabled=True, mod_every=2,
        moe_enabled=True, moe_num_layers=1, qk_conv_kernel_size=2, qk_channel_conv_kernel_size=2,
    )
    torch.manual_seed(0)
    ref_model = HydraForCausalLM(HydraConfig.from_preset("debug", kernel_backend="torch", **overrides)).to(device)
    tri_model = HydraForCausalLM(HydraConfig.from_preset("debug", kernel_backend="triton", **overrides)).to(device)
    tri_model.load_state_dict(ref_model.state_dict())
    x = torch.randint(0, 128, (2, 13), device=device)
    outs = []
    for model in (ref_model, tri_model):
        model.train()
        out = model(x, labels=x)
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (tri_logits, tri_grads) = outs
    # The dispatcher really takes the Triton path for these tensors (not the reference fallback).
    from hydra_hf import ops

    for module in ("causal_conv", "qk_norm_rope", "routing_gather", "moe_permute"):
        assert ops._triton_module("triton", module, x.float()) is not None, module
    assert _rel(tri_logits, ref_logits) < 1e-5
    for name, g in ref_grads.items():
        assert tri_grads[name] is not None, name
        assert _rel(tri_grads[name], g) < 1e-4, name
