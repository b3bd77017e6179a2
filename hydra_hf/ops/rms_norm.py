"""A small Triton RMSNorm (spec: ``reference.rms_norm_ref``, Llama casting).

The dispatcher prefers Liger's RMSNorm on CUDA; this kernel is the Triton path where Liger is
not installed and under the CPU interpreter (``TRITON_INTERPRET=1``), so ``backend="triton"``
runs Triton end to end in the interpreter tests. One program normalises one row in fp32; the
backward recomputes ``rstd`` and writes per-row ``dy * x_hat`` partials for the weight gradient,
reduced with a deterministic ``sum`` afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_lang import fsum
from ._triton_utils import is_interpreted_kernel, launch, next_pow2


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # (N, E)
    w_ptr,  # (E,)
    y_ptr,  # (N, E)
    E, eps,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    m = offs < E
    x = tl.load(x_ptr + row * E + offs, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(fsum(x * x, 0) / E + eps)
    x_hat = (x * rstd).to(x_ptr.dtype.element_ty)  # the reference rounds to the input dtype first
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    tl.store(y_ptr + row * E + offs, (w.to(tl.float32) * x_hat.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_bwd_kernel(
    x_ptr,  # (N, E)
    w_ptr,  # (E,)
    gy_ptr,  # (N, E)
    gx_ptr,  # (N, E)
    gw_part_ptr,  # (N, E) fp32 per-row weight-gradient terms
    E, eps,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    m = offs < E
    x = tl.load(x_ptr + row * E + offs, mask=m, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + row * E + offs, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(fsum(x * x, 0) / E + eps)
    x_hat = x * rstd
    tl.store(gw_part_ptr + row * E + offs, gy * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32), mask=m)
    g_hat = gy * w  # (BLOCK_E,)
    gx = rstd * (g_hat - x_hat * (fsum(g_hat * x_hat, 0) / E))
    tl.store(gx_ptr + row * E + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)


INTERPRETED = is_interpreted_kernel(_rms_norm_fwd_kernel)


def _num_warps(block_e: int) -> int:
    return max(1, min(16, block_e // 256))


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: Triton forward and backward (grads for x and weight)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        E = shape[-1]
        x2 = x.reshape(-1, E).contiguous()  # (N, E)
        weight = weight.contiguous()
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty(x2.shape, device=x.device, dtype=out_dtype)  # (N, E)
        BLOCK_E = next_pow2(E)
        if x2.shape[0] > 0:
            launch(_rms_norm_fwd_kernel, (x2.shape[0],), x2, weight, y, E, eps, BLOCK_E=BLOCK_E, num_warps=_num_warps(BLOCK_E))
        ctx.save_for_backward(x2, weight)
        ctx.eps = eps
        ctx.shape = shape
        return y.view(*shape[:-1], E)

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight = ctx.saved_tensors
        N, E = x2.shape
        gy = grad_y.reshape(N, E).contiguous()  # (N, E)
        gx = torch.empty_like(x2)  # (N, E)
        gw_part = torch.empty(N, E, device=x2.device, dtype=torch.float32)
        BLOCK_E = next_pow2(E)
        if N > 0:
            launch(_rms_norm_bwd_kernel, (N,), x2, weight, gy, gx, gw_part, E, ctx.eps, BLOCK_E=BLOCK_E, num_warps=_num_warps(BLOCK_E))
        gw = gw_part.sum(0).to(weight.dtype)  # (E,)
        return gx.view(ctx.shape), gw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton ``rms_norm_ref``: x (..., E), weight (E,) -> (..., E)."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be (E={x.shape[-1]},), got shape {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    return RMSNormFunction.apply(x, weight, float(eps))
