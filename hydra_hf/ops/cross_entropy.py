"""Linear + cross-entropy loss: the reference and the Liger fused path.

``linear_cross_entropy_ref`` materialises the (N, V) logits and is the spec. On CUDA the
dispatcher (``hydra_hf.ops.fused_linear_cross_entropy``) uses Liger's
``LigerFusedLinearCrossEntropyFunction``, which computes the loss and both gradients chunk by
chunk without ever holding the full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


REDUCTIONS = ("mean", "sum")


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, E), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, E={hidden.shape[1]}), got shape {tuple(weight.shape)}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must be (N={hidden.shape[0]},), got shape {tuple(labels.shape)}")


def linear_cross_entropy_ref(
    hidden: torch.Tensor,  # (N, E)
    weight: torch.Tensor,  # (V, E)
    labels: torch.Tensor,  # (N,) int64
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` over the non-ignored labels (fp32 scalar; mean or sum).

    The logits are upcast to fp32 before the softmax (as Hugging Face causal LMs do and as Liger
    computes internally). With every label ignored the mean is 0/0 = nan, like ``F.cross_entropy``.
    """
    _check_inputs(hidden, weight, labels, reduction)
    logits = hidden @ weight.T  # (N, V)
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy_liger(
    hidden: torch.Tensor,  # (N, E)
    weight: torch.Tensor,  # (V, E)
    labels: torch.Tensor,  # (N,) int64
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Liger's fused linear cross-entropy (CUDA only), mean or sum over the non-ignored labels."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    _check_inputs(hidden, weight, labels, reduction)
    out = LigerFusedLinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight.contiguous(), labels.contiguous(), None, None, ignore_index, 0.0, 0.0, reduction
    )
    return out[0] if isinstance(out, tuple) else out
