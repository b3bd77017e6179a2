"""Triton kernels for token routing (mixture-of-depths style): gather the selected tokens of each
sequence and scatter their (gated) updates back into the residual stream.

Specs: ``reference.gather_tokens_ref`` and ``reference.scatter_gated_add_ref``.

* ``gather_tokens``: one program per selected row copies ``x[b, index[b, k]]``; the backward
  accumulates ``grad_out`` rows into a zeroed ``grad_x`` with atomic adds (fp32 accumulator when
  ``x`` is half precision), so repeated indices are handled like ``torch.gather``.
* ``scatter_gated_add``: ``out = residual`` (one copy) and one program per selected row writes
  ``residual[b, i] + gate[b, k] * update[b, k]`` in fp32 and rounds once. The backward passes
  ``grad_out`` through to ``residual`` and one program per row produces ``grad_update`` and the
  ``grad_gate`` dot product in a single read of the two rows.

Index contract (same as the reference docstring): ``index`` is (B, K) with values in ``[0, T)``;
for ``scatter_gated_add`` they are unique within each row. Out-of-range indices are masked
(read as zeros / not written) rather than checked, to avoid a device sync per call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_lang import fsum
from ._triton_utils import interpret_requested, is_interpreted_kernel, launch, next_pow2


@triton.jit
def _gather_fwd_kernel(
    x_ptr,  # (B, T, E)
    idx_ptr,  # (B, K)
    out_ptr,  # (B, K, E)
    T, K, E,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)  # b * K + k
    b = row // K
    i = tl.load(idx_ptr + row).to(tl.int64)
    ok = (i >= 0) & (i < T)
    e_ok = tl.where(ok, E, 0)  # an out-of-range index masks the whole row
    i = tl.where(ok, i, 0)
    src = x_ptr + (b.to(tl.int64) * T + i) * E
    dst = out_ptr + row.to(tl.int64) * E
    for e0 in range(0, E, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        m = offs < E
        v = tl.load(src + offs, mask=offs < e_ok, other=0.0)
        tl.store(dst + offs, v, mask=m)


@triton.jit
def _gather_bwd_kernel(
    gout_ptr,  # (B, K, E)
    idx_ptr,  # (B, K)
    gx_ptr,  # (B, T, E) zero-initialised accumulator
    T, K, E,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // K
    i = tl.load(idx_ptr + row).to(tl.int64)
    ok = (i >= 0) & (i < T)
    e_ok = tl.where(ok, E, 0)  # an out-of-range index masks the whole row
    i = tl.where(ok, i, 0)
    src = gout_ptr + row.to(tl.int64) * E
    dst = gx_ptr + (b.to(tl.int64) * T + i) * E
    for e0 in range(0, E, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        m = offs < E
        g = tl.load(src + offs, mask=m, other=0.0).to(gx_ptr.dtype.element_ty)
        tl.atomic_add(dst + offs, g, mask=offs < e_ok)


@triton.jit
def _scatter_fwd_kernel(
    res_ptr,  # (B, T, E)
    upd_ptr,  # (B, K, E)
    idx_ptr,  # (B, K)
    gate_ptr,  # (B, K) or dummy
    out_ptr,  # (B, T, E), already a copy of residual
    T, K, E,
    HAS_GATE: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // K
    i = tl.load(idx_ptr + row).to(tl.int64)
    ok = (i >= 0) & (i < T)
    e_ok = tl.where(ok, E, 0)  # an out-of-range index masks the whole row
    i = tl.where(ok, i, 0)
    if HAS_GATE:
        g = tl.load(gate_ptr + row).to(tl.float32)
    else:
        g = 1.0
    dst_off = (b.to(tl.int64) * T + i) * E
    upd = upd_ptr + row.to(tl.int64) * E
    for e0 in range(0, E, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        m = offs < e_ok
        r = tl.load(res_ptr + dst_off + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(upd + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + dst_off + offs, (r + g * u).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _scatter_bwd_kernel(
    gout_ptr,  # (B, T, E)
    upd_ptr,  # (B, K, E)
    idx_ptr,  # (B, K)
    gate_ptr,  # (B, K) or dummy
    gupd_ptr,  # (B, K, E)
    ggate_ptr,  # (B, K) fp32 or dummy
    T, K, E,
    HAS_GATE: tl.constexpr,
    GATE_GRAD: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // K
    i = tl.load(idx_ptr + row).to(tl.int64)
    ok = (i >= 0) & (i < T)
    e_ok = tl.where(ok, E, 0)  # an out-of-range index masks the whole row
    i = tl.where(ok, i, 0)
    if HAS_GATE:
        g = tl.load(gate_ptr + row).to(tl.float32)
    else:
        g = 1.0
    src = gout_ptr + (b.to(tl.int64) * T + i) * E
    upd = upd_ptr + row.to(tl.int64) * E
    gupd = gupd_ptr + row.to(tl.int64) * E
    acc = tl.full((BLOCK_E,), 0.0, tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        m = offs < E
        go = tl.load(src + offs, mask=offs < e_ok, other=0.0).to(tl.float32)
        tl.store(gupd + offs, (go * g).to(gupd_ptr.dtype.element_ty), mask=m)
        if GATE_GRAD:
            u = tl.load(upd + offs, mask=m, other=0.0).to(tl.float32)
            acc += go * u
    if GATE_GRAD:
        tl.store(ggate_ptr + row, fsum(acc, 0))


INTERPRETED = is_interpreted_kernel(_gather_fwd_kernel)


def _block_e(E: int) -> int:
    return min(next_pow2(E), 4096 if interpret_requested() else 1024)


def _num_warps(block_e: int) -> int:
    return max(1, min(8, block_e // 256))


def _check_index(name: str, index: torch.Tensor, B: int, x: torch.Tensor) -> None:
    if index.dim() != 2 or index.shape[0] != B:
        raise ValueError(f"{name} must be (B={B}, K), got shape {tuple(index.shape)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 or int32, got {index.dtype}")
    if index.device != x.device:
        raise ValueError(f"{name} is on {index.device} but the data is on {x.device}")


class GatherTokensFunction(torch.autograd.Function):
    """Autograd wrapper: Triton row gather, Triton atomic scatter-add backward."""

    @staticmethod
    def forward(ctx, x, index):
        x = x.contiguous()  # (B, T, E)
        index = index.contiguous()  # (B, K)
        B, T, E = x.shape
        K = index.shape[1]
        out = torch.empty(B, K, E, device=x.device, dtype=x.dtype)  # (B, K, E)
        BLOCK_E = _block_e(E)
        if B * K > 0 and E > 0:
            launch(_gather_fwd_kernel, (B * K,), x, index, out, T, K, E, BLOCK_E=BLOCK_E, num_warps=_num_warps(BLOCK_E))
        ctx.save_for_backward(index)
        ctx.x_meta = (x.shape, x.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        (B, T, E), dtype = ctx.x_meta
        K = index.shape[1]
        acc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        grad_x = torch.zeros(B, T, E, device=grad_out.device, dtype=acc_dtype)  # (B, T, E)
        BLOCK_E = _block_e(E)
        if B * K > 0 and E > 0:
            launch(_gather_bwd_kernel, (B * K,),
                grad_out.contiguous(), index, grad_x, T, K, E, BLOCK_E=BLOCK_E, num_warps=_num_warps(BLOCK_E)
            )
        return grad_x.to(dtype), None


class ScatterGatedAddFunction(torch.autograd.Function):
    """Autograd wrapper: Triton gated row scatter, Triton backward for update and gate."""

    @staticmethod
    def forward(ctx, residual, update, index, gate):
        residual = residual.contiguous()  # (B, T, E)
        update = update.contiguous()  # (B, K, E)
        index = index.contiguous()  # (B, K)
        has_gate = gate is not None
        if has_gate:
            gate = gate.contiguous()  # (B, K)
        B, T, E = residual.shape
        K = index.shape[1]
        out = residual.clone()  # (B, T, E)
        BLOCK_E = _block_e(E)
        if B * K > 0 and E > 0:
            launch(_scatter_fwd_kernel, (B * K,),
                residual, update, index, gate if has_gate else update, out, T, K, E,
                HAS_GATE=has_gate, BLOCK_E=BLOCK_E, num_warps=_num_warps(BLOCK_E),
            )
        ctx.save_for_backward(update, index, gate)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        update, index, gate = ctx.saved_tensors
        has_gate = gate is not None
        gate_grad = has_gate and ctx.needs_input_grad[3]
        grad_out = grad_out.contiguous()  # (B, T, E)
        B, T, E = grad_out.shape
        K = index.shape[1]
        grad_update = None
        grad_gate = None
        if ctx.needs_input_grad[1] or gate_grad:
            grad_update = torch.empty_like(update)  # (B, K, E)
            grad_gate_f = torch.empty(B, K, device=update.device, dtype=torch.float32) if gate_grad else None
            BLOCK_E = _block_e(E)
            if B * K > 0 and E > 0:
                launch(_scatter_bwd_kernel, (B * K,),
                    grad_out, update, index, gate if has_gate else update, grad_update,
                    grad_gate_f if gate_grad else grad_update, T, K, E,
                    HAS_GATE=has_gate, GATE_GRAD=gate_grad, BLOCK_E=BLOCK_E, num_warps=_num_warps(BLOCK_E),
                )
            elif gate_grad:
                grad_gate_f.zero_()
            if gate_grad:
                grad_gate = grad_gate_f.to(gate.dtype)
            if not ctx.needs_input_grad[1]:
                grad_update = None
        grad_residual = grad_out if ctx.needs_input_grad[0] else None
        return grad_residual, grad_update, None, grad_gate


def gather_tokens_triton(
    x: torch.Tensor,  # (B, T, E)
    index: torch.Tensor,  # (B, K) int64
) -> torch.Tensor:
    """Triton ``gather_tokens_ref``: rows ``x[b, index[b, k]]`` -> (B, K, E)."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, E), got shape {tuple(x.shape)}")
    _check_index("index", index, x.shape[0], x)
    return GatherTokensFunction.apply(x, index)


def scatter_gated_add_triton(
    residual: torch.Tensor,  # (B, T, E)
    update: torch.Tensor,  # (B, K, E)
    index: torch.Tensor,  # (B, K) int64, unique within each row
    gate: torch.Tensor | None = None,  # (B, K) or None
) -> torch.Tensor:
    """Triton ``scatter_gated_add_ref``: out-of-place ``residual[b, index[b, k]] += gate[b, k] * update[b, k]``."""
    if residual.dim() != 3:
        raise ValueError(f"residual must be (B, T, E), got shape {tuple(residual.shape)}")
    B, T, E = residual.shape
    _check_index("index", index, B, residual)
    K = index.shape[1]
    if tuple(update.shape) != (B, K, E):
        raise ValueError(f"update must be (B={B}, K={K}, E={E}), got shape {tuple(update.shape)}")
    if update.device != residual.device:
        raise ValueError(f"update is on {update.device} but residual is on {residual.device}")
    if gate is not None:
        if tuple(gate.shape) != (B, K):
            raise ValueError(f"gate must be (B={B}, K={K}) or None, got shape {tuple(gate.shape)}")
        if gate.device != residual.device:
            raise ValueError(f"gate is on {gate.device} but residual is on {residual.device}")
    return ScatterGatedAddFunction.apply(residual, update, index, gate)
