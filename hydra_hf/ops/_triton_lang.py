"""Triton-language helpers shared by the HYDRA kernels.

Triton decides interpreted-vs-compiled for every ``@triton.jit`` function when it is defined.
Its own library helpers (``tl.sum``, ``tl.zeros``, ...) are ``@jit`` functions defined when
``triton.language`` is first imported, which in a test session usually happens (through
transformers / torch) before ``TRITON_INTERPRET=1`` can be set. Our kernels therefore only use
Triton *builtins* (``tl.full``, ``tl.reduce``, ...) plus the helpers below, which are defined
together with our kernels and so share their mode: the kernels run under the CPU interpreter
whenever the variable was set before ``hydra_hf.ops``' kernel modules were imported.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Triton's own add-combine: the interpreter recognises it by identity and reduces with numpy.
_SUM_COMBINE = getattr(getattr(tl, "standard", None), "_sum_combine", None)

if _SUM_COMBINE is None:  # pragma: no cover - older / newer Triton layouts

    @triton.jit
    def _SUM_COMBINE(a, b):
        return a + b


@triton.jit
def fsum(x, axis: tl.constexpr):
    """``tl.sum(x, axis)`` for float tensors, built from the ``tl.reduce`` builtin."""
    return tl.reduce(x, axis, _SUM_COMBINE)
