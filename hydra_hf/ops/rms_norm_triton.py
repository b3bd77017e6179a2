"""A small Triton RMSNorm (spec: ``reference.rms_norm_ref``, Llama casting).

The dispatcher prefers Liger's RMSNorm on CUDA; this kernel is the Triton path where Liger is
not installed and under the CPU interpreter (``TRITON_INTERPRET=1``), so ``backend="triton"``
runs Triton end to end in the interpreter tests. One program normalises one row in fp32. The
backward runs a few programs per SM (Liger's way): each walks a contiguous block of rows,
recomputes ``rstd``, writes ``grad_x`` and accumulates ``dy * x_hat`` in registers; its (E,) fp32
partial sum of the weight gradient is written once and the (programs, E) partials are reduced
with a deterministic ``sum`` (at the 1B shapes ~0.9 MB instead of an (N, E) buffer of 235 MB).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_lang import fsum
from ._triton_utils import is_interpreted_kernel, launch, next_pow2, sm_count


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
    gw_part_ptr,  # (n_programs, E) fp32 per-program weight-gradient sums
    N, E, eps,
    ROWS_PER_PROG,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    w = tl.load(w_ptr + offs, mask=offs < E, other=0.0).to(tl.float32)
    gw_acc = tl.full((BLOCK_E,), 0.0, tl.float32)
    row_start = pid.to(tl.int64) * ROWS_PER_PROG
    for i in range(0, ROWS_PER_PROG):
        row = row_start + i
        rows = tl.full((BLOCK_E,), 0, tl.int64) + row  # (BLOCK_E,) a vector mask (the interpreter needs one)
        m = (offs < E) & (rows < N)  # the last program's tail rows load zeros and store nothing
        x = tl.load(x_ptr + row * E + offs, mask=m, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + row * E + offs, mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(fsum(x * x, 0) / E + eps)
        x_hat = x * rstd
        gw_acc += gy * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
        g_hat = gy * w  # (BLOCK_E,)
        gx = rstd * (g_hat - x_hat * (fsum(g_hat * x_hat, 0) / E))
        tl.store(gx_ptr + row * E + offs, gx.to(gx_ptr.dtype.element_ty), mask=m)
    tl.store(gw_part_ptr + pid.to(tl.int64) * E + offs, gw_acc, mask=offs < E)


INTERPRETED = is_interpreted_kernel(_rms_norm_fwd_kernel)


def _num_warps(block_e: int) -> int:
    return max(1, min(16, block_e // 256))


def _bwd_programs(x: torch.Tensor, n_rows: int) -> int:
    """Backward programs: a few per SM on a GPU (each sums its rows' weight-gradient terms), 1 per
    16 rows in the interpreter. The (programs, E) fp32 partials replace an (N, E) buffer."""
    sms = sm_count(x)
    if sms is not None:
        return max(1, min(n_rows, 4 * sms))
    return max(1, min(n_rows, triton.cdiv(n_rows, 16)))


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
        BLOCK_E = next_pow2(E)
        n_progs = _bwd_programs(x2, N)
        rows_per_prog = triton.cdiv(N, n_progs) if N > 0 else 1
        n_progs = triton.cdiv(N, rows_per_prog) if N > 0 else 0
        gw_part = torch.zeros(max(n_progs, 1), E, device=x2.device, dtype=torch.float32)  # (n_progs, E)
        if N > 0:
            launch(_rms_norm_bwd_kernel, (n_progs,), x2, weight, gy, gx, gw_part, N, E, ctx.eps, rows_per_prog,
                   BLOCK_E=BLOCK_E, num_warps=_num_warps(BLOCK_E))
        gw = gw_part.sum(0).to(weight.dtype)  # (E,)
        return gx.view(ctx.shape), gw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton ``rms_norm_ref``: x (..., E), weight (E,) -> (..., E)."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be (E={x.shape[-1]},), got shape {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    return RMSNormFunction.apply(x, weight, float(eps))
