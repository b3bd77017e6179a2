"""Small helpers shared by the HYDRA Triton kernels.

Nothing here imports Triton, so the dispatcher (``ops_hydra``) can ask "may Triton run on this tensor?"
(``interpret_requested``) on machines without Triton installed. Like every kernel module, this one never
imports the dispatcher: the dispatcher imports the kernel modules (see the layout in ``ops_hydra``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, NamedTuple

import torch

_TRUE = ("1", "true", "yes", "on")


def interpret_requested() -> bool:
    """True when ``TRITON_INTERPRET`` is set in the environment right now (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (and >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


_sm_count_override: int | None = None  # set by models of a GPU launch (benchmarks/bench_kernels.py --model)


def sm_count(t: torch.Tensor) -> int | None:
    """Streaming multiprocessors of ``t``'s GPU (launchers size their grids from it); None off-GPU."""
    if _sm_count_override is not None:
        return _sm_count_override
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return None


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: exact fp32 for fp32 tensors, tf32 is below the rounding of half inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def is_interpreted_kernel(kernel) -> bool:
    """True when a ``@triton.jit`` object was built for the CPU interpreter (decided at decoration time)."""
    return type(kernel).__name__ == "InterpretedFunction"



class KernelLaunch(NamedTuple):
    """One kernel launch as a launcher chose it: ``kernel[grid](*args, **meta)``."""

    kernel: Any  # the @triton.jit function
    grid: tuple
    args: tuple  # positional arguments (tensors, ints, floats)
    meta: dict  # constexprs and launch options (num_warps, ...)


_recorder: list[KernelLaunch] | None = None


def launch(kernel, grid, *args, **meta) -> None:
    """Run ``kernel[grid](*args, **meta)``; inside ``record_launches()`` only record it.

    Every launcher goes through here, so a dry run of a launcher on meta tensors (no data, no
    GPU) yields exactly the specializations it would compile; ``aot_compile`` compiles those.
    """
    if _recorder is not None:
        _recorder.append(KernelLaunch(kernel, tuple(grid), tuple(args), dict(meta)))
        return
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def record_launches():
    """Collect the launches made inside the block instead of running them (yields the list)."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous
