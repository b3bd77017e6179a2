"""Triton kernels for mixture-of-experts token permutation.

Specs: ``reference.moe_permute_ref`` and ``reference.moe_unpermute_ref``.

The routing bookkeeping (a stable ``argsort`` of the flat expert ids, ``bincount``, and the
inverse permutation ``inv[sorted_pairs[r]] = r``) stays in PyTorch: it touches ``N * k`` integers.
The data movement (``N * k`` rows of ``E`` values each way) is Triton:

* ``moe_permute``: row ``r`` of the output is ``x[sorted_pairs[r] // k]``. Its backward is a
  deterministic gather-sum: ``grad_x[n] = sum_j grad_permuted[inv[n * k + j]]`` (no atomics).
* ``moe_unpermute``: ``out[n] = sum_j weights[n, j] * expert_out[inv[n * k + j]]`` accumulated in
  fp32. Its backward writes ``grad_expert_out[inv[p]] = weights[p] * grad_out[p // k]`` and the
  routing-weight gradient ``<grad_out[n], expert_out[inv[p]]>`` in one pass over the rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_lang import fsum
from ._triton_utils import interpret_requested, is_interpreted_kernel, launch, next_pow2


@triton.jit
def _permute_fwd_kernel(
    x_ptr,  # (N, E)
    pairs_ptr,  # (N*k,) sorted pair ids
    out_ptr,  # (N*k, E)
    E, TOPK,
    BLOCK_E: tl.constexpr,
):
    r = tl.program_id(0)
    src_row = tl.load(pairs_ptr + r).to(tl.int64) // TOPK
    src = x_ptr + src_row * E
    dst = out_ptr + r.to(tl.int64) * E
    for e0 in range(0, E, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        m = offs < E
        tl.store(dst + offs, tl.load(src + offs, mask=m, other=0.0), mask=m)


@triton.jit
def _permute_bwd_kernel(
    gperm_ptr,  # (N*k, E)
    inv_ptr,  # (N*k,) row of each pair in the permuted order
    gx_ptr,  # (N, E)
    E, TOPK,
    BLOCK_E: tl.constexpr,
):
    n = tl.program_id(0)
    dst = gx_ptr + n.to(tl.int64) * E
    for e0 in range(0, E, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        m = offs < E
        acc = tl.full((BLOCK_E,), 0.0, tl.float32)
        for j in range(TOPK):
            row = tl.load(inv_ptr + n.to(tl.int64) * TOPK + j).to(tl.int64)
            acc += tl.load(gperm_ptr + row * E + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(dst + offs, acc.to(gx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _unpermute_fwd_kernel(
    eo_ptr,  # (N*k, E)
    inv_ptr,  # (N*k,)
    w_ptr,  # (N, k)
    out_ptr,  # (N, E)
    E, TOPK,
    BLOCK_E: tl.constexpr,
):
    n = tl.program_id(0)
    dst = out_ptr + n.to(tl.int64) * E
    for e0 in range(0, E, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        m = offs < E
        acc = tl.full((BLOCK_E,), 0.0, tl.float32)
        for j in range(TOPK):
            p = n.to(tl.int64) * TOPK + j
            row = tl.load(inv_ptr + p).to(tl.int64)
            w = tl.load(w_ptr + p).to(tl.float32)
            acc += w * tl.load(eo_ptr + row * E + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(dst + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _unpermute_bwd_kernel(
    gout_ptr,  # (N, E)
    eo_ptr,  # (N*k, E)
    inv_ptr,  # (N*k,)
    w_ptr,  # (N, k)
    geo_ptr,  # (N*k, E)
    gw_ptr,  # (N, k) fp32 or dummy
    E, TOPK,
    W_GRAD: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)  # flat pair id n * k + j
    n = p // TOPK
    row = tl.load(inv_ptr + p).to(tl.int64)
    w = tl.load(w_ptr + p).to(tl.float32)
    acc = tl.full((BLOCK_E,), 0.0, tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        m = offs < E
        go = tl.load(gout_ptr + n * E + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(geo_ptr + row * E + offs, (w * go).to(geo_ptr.dtype.element_ty), mask=m)
        if W_GRAD:
            acc += go * tl.load(eo_ptr + row * E + offs, mask=m, other=0.0).to(tl.float32)
    if W_GRAD:
        tl.store(gw_ptr + p, fsum(acc, 0))


INTERPRETED = is_interpreted_kernel(_permute_fwd_kernel)


def _block_e(E: int) -> int:
    return min(next_pow2(E), 4096 if interpret_requested() else 1024)


def _num_warps(block_e: int) -> int:
    return max(1, min(8, block_e // 256))


def inverse_permutation(sorted_pairs: torch.Tensor) -> torch.Tensor:
    """inv[sorted_pairs[r]] = r: the permuted row of every flat (token, slot) pair. (N*k,) int64."""
    arange = torch.arange(sorted_pairs.numel(), device=sorted_pairs.device, dtype=torch.int64)
    return torch.empty_like(arange).scatter_(0, sorted_pairs.long(), arange)


class MoEPermuteFunction(torch.autograd.Function):
    """Autograd wrapper for the row gather of ``moe_permute``; Triton gather-sum backward."""

    @staticmethod
    def forward(ctx, x, sorted_pairs, topk):
        x = x.contiguous()  # (N, E)
        N, E = x.shape
        rows = sorted_pairs.numel()
        out = torch.empty(rows, E, device=x.device, dtype=x.dtype)  # (N*k, E)
        BLOCK_E = _block_e(E)
        if rows > 0 and E > 0:
            launch(_permute_fwd_kernel, (rows,), x, sorted_pairs, out, E, topk, BLOCK_E=BLOCK_E, num_warps=_num_warps(BLOCK_E))
        ctx.save_for_backward(sorted_pairs)
        ctx.topk = topk
        ctx.x_meta = (N, E, x.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_perm):
        (sorted_pairs,) = ctx.saved_tensors
        N, E, dtype = ctx.x_meta
        inv = inverse_permutation(sorted_pairs)  # (N*k,)
        grad_x = torch.empty(N, E, device=grad_perm.device, dtype=dtype)  # (N, E)
        BLOCK_E = _block_e(E)
        if N > 0 and E > 0:
            launch(_permute_bwd_kernel, (N,),
                grad_perm.contiguous(), inv, grad_x, E, ctx.topk, BLOCK_E=BLOCK_E, num_warps=_num_warps(BLOCK_E)
            )
        return grad_x, None, None


class MoEUnpermuteFunction(torch.autograd.Function):
    """Autograd wrapper for ``moe_unpermute``: Triton weighted gather-sum, Triton backward."""

    @staticmethod
    def forward(ctx, expert_out, sorted_pairs, weights):
        expert_out = expert_out.contiguous()  # (N*k, E)
        weights = weights.contiguous()  # (N, k)
        N, k = weights.shape
        E = expert_out.shape[1]
        inv = inverse_permutation(sorted_pairs)  # (N*k,)
        out = torch.empty(N, E, device=expert_out.device, dtype=expert_out.dtype)  # (N, E)
        BLOCK_E = _block_e(E)
        if N > 0 and E > 0:
            launch(_unpermute_fwd_kernel, (N,),
                expert_out, inv, weights, out, E, k, BLOCK_E=BLOCK_E, num_warps=_num_warps(BLOCK_E)
            )
        ctx.save_for_backward(expert_out, inv, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        expert_out, inv, weights = ctx.saved_tensors
        N, k = weights.shape
        E = expert_out.shape[1]
        w_grad = ctx.needs_input_grad[2]
        grad_eo = torch.empty_like(expert_out)  # (N*k, E)
        grad_w = torch.zeros(N, k, device=weights.device, dtype=torch.float32) if w_grad else None
        BLOCK_E = _block_e(E)
        if N * k > 0 and E > 0:
            launch(_unpermute_bwd_kernel, (N * k,),
                grad_out.contiguous(), expert_out, inv, weights, grad_eo, grad_w if w_grad else grad_eo, E, k,
                W_GRAD=w_grad, BLOCK_E=BLOCK_E, num_warps=_num_warps(BLOCK_E),
            )
        return (
            grad_eo if ctx.needs_input_grad[0] else None,
            None,
            grad_w.to(weights.dtype) if w_grad else None,
        )


def moe_permute_triton(
    x: torch.Tensor,  # (N, E)
    expert_index: torch.Tensor,  # (N, k) int64
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``moe_permute_ref`` -> (permuted (N*k, E), tokens_per_expert (X,), sorted_pairs (N*k,))."""
    if x.dim() != 2:
        raise ValueError(f"x must be (N, E), got shape {tuple(x.shape)}")
    if expert_index.dim() != 2 or expert_index.shape[0] != x.shape[0]:
        raise ValueError(f"expert_index must be (N={x.shape[0]}, k), got shape {tuple(expert_index.shape)}")
    if expert_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"expert_index must be int64 or int32, got {expert_index.dtype}")
    if expert_index.device != x.device:
        raise ValueError(f"expert_index is on {expert_index.device} but x is on {x.device}")
    topk = expert_index.shape[1]
    flat = expert_index.reshape(-1)  # (N*k,)
    sorted_pairs = torch.argsort(flat, stable=True)  # (N*k,)
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)  # (X,)
    permuted = MoEPermuteFunction.apply(x, sorted_pairs, topk)  # (N*k, E)
    return permuted, tokens_per_expert, sorted_pairs


def moe_unpermute_triton(
    expert_out: torch.Tensor,  # (N*k, E) rows in permuted order
    sorted_pairs: torch.Tensor,  # (N*k,)
    weights: torch.Tensor,  # (N, k)
) -> torch.Tensor:
    """Triton ``moe_unpermute_ref`` -> (N, E): slots back in token order, summed with the routing weights."""
    if weights.dim() != 2:
        raise ValueError(f"weights must be (N, k), got shape {tuple(weights.shape)}")
    N, k = weights.shape
    if expert_out.dim() != 2 or expert_out.shape[0] != N * k:
        raise ValueError(f"expert_out must be (N*k={N * k}, E), got shape {tuple(expert_out.shape)}")
    if sorted_pairs.dim() != 1 or sorted_pairs.numel() != N * k:
        raise ValueError(f"sorted_pairs must be (N*k={N * k},), got shape {tuple(sorted_pairs.shape)}")
    for name, t in (("sorted_pairs", sorted_pairs), ("weights", weights)):
        if t.device != expert_out.device:
            raise ValueError(f"{name} is on {t.device} but expert_out is on {expert_out.device}")
    return MoEUnpermuteFunction.apply(expert_out, sorted_pairs, weights)
