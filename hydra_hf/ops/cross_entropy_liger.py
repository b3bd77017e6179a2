"""Linear + cross-entropy loss: the Liger fused path.

``linear_cross_entropy_ref`` (in ``hydra_hf/ops_reference_hydra.py``, ``hydra_hf.ops.reference``)
materialises the (N, V) logits and is the spec. On CUDA the
dispatcher (``hydra_hf.ops.fused_linear_cross_entropy``) uses Liger's
``LigerFusedLinearCrossEntropyFunction``, which computes the loss and both gradients chunk by
chunk without ever holding the full logits.
"""

from __future__ import annotations

import torch

from ..ops_reference_hydra import check_linear_cross_entropy_inputs


def linear_cross_entropy_liger(
    hidden: torch.Tensor,  # (N, E)
    weight: torch.Tensor,  # (V, E)
    labels: torch.Tensor,  # (N,) int64
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Liger's fused linear cross-entropy (CUDA only), mean or sum over the non-ignored labels."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    check_linear_cross_entropy_inputs(hidden, weight, labels, reduction)
    out = LigerFusedLinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight.contiguous(), labels.contiguous(), None, None, ignore_index, 0.0, 0.0, reduction
    )
    return out[0] if isinstance(out, tuple) else out
