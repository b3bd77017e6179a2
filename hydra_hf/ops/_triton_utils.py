"""Small helpers shared by the HYDRA Triton kernels.

Nothing here imports Triton, so the dispatcher can ask "may Triton run on this tensor?"
on machines without Triton installed.
"""

from __future__ import annotations

import torch

from ..ops_hydra import interpret_requested  # noqa: F401  (used by the kernel modules)


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (and >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: exact fp32 for fp32 tensors, tf32 is below the rounding of half inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def is_interpreted_kernel(kernel) -> bool:
    """True when a ``@triton.jit`` object was built for the CPU interpreter (decided at decoration time)."""
    return type(kernel).__name__ == "InterpretedFunction"

