"""Linear + cross-entropy loss: the Liger fused path.

``linear_cross_entropy_ref`` (in ``hydra_hf/ops_reference_hydra.py``, ``hydra_hf.ops.reference``)
materialises the (N, V) logits and is the spec. On CUDA the
dispatcher (``hydra_hf.ops.fused_linear_cross_entropy``) uses Liger's fused linear cross-entropy
(its public ``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy``, called by keyword),
which computes the loss and both gradients chunk by chunk without ever holding the full logits.
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
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    check_linear_cross_entropy_inputs(hidden, weight, labels, reduction)
    out = liger_fused_linear_cross_entropy(
        input=hidden.contiguous(), weight=weight.contiguous(), target=labels.contiguous(), bias=None,
        ignore_index=ignore_index, lse_square_scale=0.0, label_smoothing=0.0, reduction=reduction,
    )
    return out[0] if isinstance(out, tuple) else out  # a bare loss tensor in current Liger; a tuple in some versions
