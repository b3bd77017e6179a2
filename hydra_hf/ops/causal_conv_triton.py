"""Triton kernels for the CCGQA causal convolution pair (spec: ``reference.causal_conv_ref``).

One kernel fuses the two stacked causal convs of CCGQA:

1. a depthwise conv over time (kernel ``Ks``, one filter per channel), then
2. a conv over time grouped per head (kernel ``Kc``) that mixes the ``h = C // H`` channels of a head.

The intermediate (post sequence-conv) activations never reach memory: each program owns one
(batch, head, time tile) and recomputes the ``Kc`` shifted intermediate tiles it needs from
``x`` (or from ``state`` for times before the sequence start), then applies the channel mix
with ``tl.dot``. The backward kernel recomputes them the same way and produces in one pass:
``grad_x``, ``grad_state`` (when ``state`` is given), and per-program partial sums of the two
weight gradients, reduced with a deterministic ``sum`` over programs afterwards.

Time convention (x-time ``t`` = index into ``x``; negative times live in ``state``):
``mid(u) = sum_i ws[i] * xp(u + i - (Ks - 1))`` and ``out(t) = sum_j Wc_j @ mid(t + j - (Kc - 1))``.

Decode: a single step is ``T = 1`` with ``state`` = the last ``Ks + Kc - 2`` pre-conv columns;
the same kernel serves it. ``causal_conv_next_state`` rolls the state forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_lang import fsum
from ._triton_utils import dot_precision, interpret_requested, is_interpreted_kernel, launch, next_pow2, sm_count
from ..ops_reference_hydra import causal_conv_state_len


@triton.jit
def _load_xp(x_ptr, state_ptr, b, src_t, ch, mask_c, T, C, P: tl.constexpr, HAS_STATE: tl.constexpr):
    """Load the (BLOCK_T, BLOCK_H) tile of the padded input at x-times ``src_t`` (fp32)."""
    in_x = (src_t >= 0) & (src_t < T)  # (BLOCK_T,)
    x_off = src_t[:, None] * C + ch[None, :]  # (BLOCK_T, BLOCK_H) int32: offsets within one sequence
    v = tl.load(x_ptr + (b * T).to(tl.int64) * C + x_off, mask=in_x[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    if HAS_STATE:
        in_s = (src_t < 0) & (src_t >= -P)
        s_off = (src_t + P)[:, None] * C + ch[None, :]
        v += tl.load(state_ptr + (b * P).to(tl.int64) * C + s_off, mask=in_s[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _mid_tile(
    x_ptr, state_ptr, ws_ptr, b, offs_t, shift, ch, mask_c, T, C,
    KS: tl.constexpr, P: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Sequence-conv output at x-times ``offs_t + shift``: (BLOCK_T, BLOCK_H) fp32."""
    mid = tl.full((BLOCK_T, BLOCK_H), 0.0, tl.float32)
    for i in range(KS):
        w_i = tl.load(ws_ptr + ch * KS + i, mask=mask_c, other=0.0).to(tl.float32)  # (BLOCK_H,)
        src_t = offs_t + shift + i - (KS - 1)
        mid += _load_xp(x_ptr, state_ptr, b, src_t, ch, mask_c, T, C, P, HAS_STATE) * w_i[None, :]
    return mid


@triton.jit
def _causal_conv_fwd_kernel(
    x_ptr,  # (B, T, C)
    state_ptr,  # (B, P, C) or dummy
    ws_ptr,  # (C, KS)
    wc_ptr,  # (C, HEAD_DIM, KC)
    out_ptr,  # (B, T, C)
    T,
    C,
    HEAD_DIM,
    KS: tl.constexpr,
    KC: tl.constexpr,
    P: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    N_DB: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    g = tl.program_id(2) // N_DB  # head
    db = tl.program_id(2) % N_DB  # block of output channels within the head
    offs_h = tl.arange(0, BLOCK_H)
    mask_c = offs_h < HEAD_DIM
    ch = g * HEAD_DIM + offs_h  # (BLOCK_H,) global channels of this head
    offs_o = db * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) output channels within the head
    mask_o = offs_o < HEAD_DIM
    ch_o = g * HEAD_DIM + offs_o
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    wmask = mask_c[:, None] & mask_o[None, :]
    acc = tl.full((BLOCK_T, BLOCK_D), 0.0, tl.float32)
    for j in range(KC):
        mid = _mid_tile(x_ptr, state_ptr, ws_ptr, b, offs_t, j - (KC - 1), ch, mask_c, T, C,
                        KS, P, HAS_STATE, BLOCK_T, BLOCK_H)  # (BLOCK_T, BLOCK_H[d])
        # wT[d, c] = wc[g*h + c, d, j]
        wT = tl.load(wc_ptr + ch_o[None, :] * (HEAD_DIM * KC) + offs_h[:, None] * KC + j, mask=wmask, other=0.0)
        # half inputs: the intermediate is rounded to the input dtype (as the reference does) -> half mma
        acc += tl.dot(mid.to(DOT_DTYPE), wT.to(DOT_DTYPE), input_precision=DOT_PREC)  # (BLOCK_T, BLOCK_D[c])
    out_off = offs_t[:, None] * C + ch_o[None, :]
    tl.store(out_ptr + (b * T).to(tl.int64) * C + out_off, acc.to(out_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & mask_o[None, :])


@triton.jit
def _causal_conv_bwd_dx_kernel(
    x_ptr,  # (B, T, C)
    state_ptr,  # (B, P, C) or dummy
    ws_ptr,  # (C, KS)
    wc_ptr,  # (C, HEAD_DIM, KC)
    gout_ptr,  # (B, T, C)
    gx_ptr,  # (B, T, C)
    gstate_ptr,  # (B, P, C) or dummy
    gws_part_ptr,  # (B * n_chunks, C, KS) fp32
    T,
    C,
    HEAD_DIM,
    P_START,  # first position handled: -P with state, 0 without
    POS_PER_PROG,  # multiple of BLOCK_T
    KS: tl.constexpr,
    KC: tl.constexpr,
    P: tl.constexpr,
    HAS_STATE: tl.constexpr,
    STATE_GRAD: tl.constexpr,
    KS_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    N_DB: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """grad_x / grad_state and partial sums of grad_seq_weight over one (batch, chunk of time, head,
    block of BLOCK_D channels)."""
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    g = tl.program_id(2) // N_DB
    db = tl.program_id(2) % N_DB
    n_chunks = tl.num_programs(1)
    offs_h = tl.arange(0, BLOCK_H)
    mask_c = offs_h < HEAD_DIM
    ch = g * HEAD_DIM + offs_h  # (BLOCK_H,) all channels c of the head (the channel-conv input)
    offs_d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    ch_d = g * HEAD_DIM + offs_d  # (BLOCK_D,) the channels d this program produces
    wmask = mask_c[:, None] & mask_d[None, :]
    offs_k = tl.arange(0, KS_PAD)
    gws_acc = tl.full((BLOCK_D, KS_PAD), 0.0, tl.float32)  # [d, i]

    start = P_START + chunk * POS_PER_PROG
    for it in range(0, POS_PER_PROG, BLOCK_T):
        offs_p = start + it + tl.arange(0, BLOCK_T)  # (BLOCK_T,) x-times, may be negative
        valid_p = offs_p < T
        in_t = (offs_p >= 0) & valid_p
        # grad of the pre-conv input: gxp(p) = sum_i ws[i] * gmid(p + KS-1-i),
        # gmid(u)[d] = sum_j sum_c gout(u + KC-1-j)[c] * wc[c, d, j]
        xp = _load_xp(x_ptr, state_ptr, b, offs_p, ch_d, mask_d, T, C, P, HAS_STATE)  # (BLOCK_T, BLOCK_D)
        gxp = tl.full((BLOCK_T, BLOCK_D), 0.0, tl.float32)
        for i in range(KS):
            gmid = tl.full((BLOCK_T, BLOCK_D), 0.0, tl.float32)
            for j in range(KC):
                src_t = offs_p + (KS - 1 - i) + (KC - 1 - j)
                m = (src_t >= 0) & (src_t < T)
                s_off = src_t[:, None] * C + ch[None, :]
                gsh = tl.load(gout_ptr + (b * T).to(tl.int64) * C + s_off, mask=m[:, None] & mask_c[None, :], other=0.0)  # (BLOCK_T, BLOCK_H[c])
                # w[c, d] = wc[g*h + c, d, j]
                w = tl.load(wc_ptr + ch[:, None] * (HEAD_DIM * KC) + offs_d[None, :] * KC + j, mask=wmask, other=0.0)
                gmid += tl.dot(gsh.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PREC)  # (BLOCK_T, BLOCK_D[d])
            gmid = tl.where(valid_p[:, None], gmid, 0.0)
            w_i = tl.load(ws_ptr + ch_d * KS + i, mask=mask_d, other=0.0).to(tl.float32)
            gxp += gmid * w_i[None, :]
            gws_i = fsum(gmid * xp, 0)  # (BLOCK_D,)
            gws_acc += tl.where(offs_k[None, :] == i, gws_i[:, None], 0.0)

        g_off = offs_p[:, None] * C + ch_d[None, :]
        tl.store(gx_ptr + (b * T).to(tl.int64) * C + g_off, gxp.to(gx_ptr.dtype.element_ty), mask=in_t[:, None] & mask_d[None, :])
        if STATE_GRAD:
            in_s = (offs_p < 0) & (offs_p >= -P)
            st_off = (offs_p + P)[:, None] * C + ch_d[None, :]
            tl.store(gstate_ptr + (b * P).to(tl.int64) * C + st_off, gxp.to(gstate_ptr.dtype.element_ty), mask=in_s[:, None] & mask_d[None, :])

    part = (b * n_chunks + chunk).to(tl.int64)
    gws_off = (part * C + ch_d[:, None]) * KS + offs_k[None, :]
    tl.store(gws_part_ptr + gws_off, gws_acc, mask=mask_d[:, None] & (offs_k[None, :] < KS))


@triton.jit
def _causal_conv_bwd_dw_kernel(
    x_ptr,  # (B, T, C)
    state_ptr,  # (B, P, C) or dummy
    ws_ptr,  # (C, KS)
    gout_ptr,  # (B, T, C)
    gwc_part_ptr,  # (B * n_chunks, C, HEAD_DIM, KC) fp32
    T,
    C,
    HEAD_DIM,
    POS_PER_PROG,  # multiple of BLOCK_T
    KS: tl.constexpr,
    KC: tl.constexpr,
    P: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    N_DB: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Partial sums of grad_chan_weight over one (batch, chunk of time, head, block of BLOCK_D output
    channels c): gwc[c, d, j] += sum_t gout(t)[c] * mid(t + j - (KC-1))[d]."""
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    g = tl.program_id(2) // N_DB
    cb = tl.program_id(2) % N_DB
    n_chunks = tl.num_programs(1)
    offs_h = tl.arange(0, BLOCK_H)
    mask_d = offs_h < HEAD_DIM
    ch = g * HEAD_DIM + offs_h  # (BLOCK_H,) all channels d of the head (mid)
    offs_c = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_c = offs_c < HEAD_DIM
    ch_c = g * HEAD_DIM + offs_c  # (BLOCK_D,) output channels c of this program
    wmask = mask_c[:, None] & mask_d[None, :]
    gwc_acc0 = tl.full((BLOCK_D, BLOCK_H), 0.0, tl.float32)  # [c, d] for j = 0
    gwc_acc1 = tl.full((BLOCK_D, BLOCK_H), 0.0, tl.float32)  # [c, d] for j = 1 (KC == 2)

    start = chunk * POS_PER_PROG
    for it in range(0, POS_PER_PROG, BLOCK_T):
        offs_t = start + it + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
        in_t = offs_t < T
        g_off = offs_t[:, None] * C + ch_c[None, :]
        gout_t = tl.trans(tl.load(gout_ptr + (b * T).to(tl.int64) * C + g_off, mask=in_t[:, None] & mask_c[None, :], other=0.0))  # (BLOCK_D[c], BLOCK_T)
        for j in tl.static_range(KC):
            mid = _mid_tile(x_ptr, state_ptr, ws_ptr, b, offs_t, j - (KC - 1), ch, mask_d, T, C,
                            KS, P, HAS_STATE, BLOCK_T, BLOCK_H)  # (BLOCK_T, BLOCK_H[d])
            contrib = tl.dot(gout_t.to(DOT_DTYPE), mid.to(DOT_DTYPE), input_precision=DOT_PREC)  # (BLOCK_D[c], BLOCK_H[d])
            if j == 0:
                gwc_acc0 += contrib
            else:
                gwc_acc1 += contrib

    part = (b * n_chunks + chunk).to(tl.int64)
    gwc_off = (part * C + ch_c[:, None]) * (HEAD_DIM * KC) + offs_h[None, :] * KC
    tl.store(gwc_part_ptr + gwc_off, gwc_acc0, mask=wmask)
    if KC == 2:
        tl.store(gwc_part_ptr + gwc_off + 1, gwc_acc1, mask=wmask)


INTERPRETED = is_interpreted_kernel(_causal_conv_fwd_kernel)


def _check_inputs(x, seq_weight, chan_weight, num_heads, state):
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, C), got shape {tuple(x.shape)}")
    B, T, C = x.shape
    if num_heads <= 0 or C % num_heads != 0:
        raise ValueError(f"num_heads={num_heads} must divide the channel count C={C} of x")
    h = C // num_heads
    if seq_weight.dim() != 2 or seq_weight.shape[0] != C or not 1 <= seq_weight.shape[1] <= 4:
        raise ValueError(f"seq_weight must be (C={C}, Ks) with 1 <= Ks <= 4, got {tuple(seq_weight.shape)}")
    if chan_weight.dim() != 3 or chan_weight.shape[:2] != (C, h) or not 1 <= chan_weight.shape[2] <= 2:
        raise ValueError(f"chan_weight must be (C={C}, C // H={h}, Kc) with Kc in (1, 2), got {tuple(chan_weight.shape)}")
    P = causal_conv_state_len(seq_weight.shape[1], chan_weight.shape[2])
    if state is not None and tuple(state.shape) != (B, P, C):
        raise ValueError(f"state must be (B={B}, Ks + Kc - 2={P}, C={C}), got {tuple(state.shape)}")
    for name, t in (("seq_weight", seq_weight), ("chan_weight", chan_weight), ("state", state)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


# (kernel, fp32?) -> (BLOCK_T, largest BLOCK_D, num_warps), tuned with ``hydra_hf.ops.aot_compile`` for
# no register spills and shared memory far below the sm_80 limit at every supported head dim.
CONV_TILES = {
    ("fwd", False): (32, 64, 8),
    ("fwd", True): (16, 32, 4),
    ("bwd_dx", False): (16, 32, 4),
    ("bwd_dx", True): (16, 16, 4),
    ("bwd_dw", False): (32, 32, 8),
    ("bwd_dw", True): (16, 16, 4),
}


def conv_meta(h: int, dtype: torch.dtype, kernel: str) -> dict:
    """Tile sizes and launch options of the conv kernels: a pure function of (head dim, dtype, kernel),
    ``kernel`` one of ``"fwd"``, ``"bwd_dx"``, ``"bwd_dw"``.

    ``BLOCK_H`` covers one head (``tl.dot`` needs every dim >= 16). Each program produces
    ``BLOCK_D`` of the head's channels (``N_DB`` programs per head) over ``BLOCK_T`` time steps;
    both and ``num_warps`` come from ``CONV_TILES`` so that no supported head dim spills registers
    or exceeds the shared memory of sm_80 / sm_90 (checked by ``tests/test_ops_compile.py``).
    fp32 uses exact (FMA) dots, which need smaller tiles than the half-precision tensor-core dots.
    """
    block_t, block_d, num_warps = CONV_TILES[(kernel, dtype == torch.float32)]
    block_h = max(16, next_pow2(h))
    block_d = min(block_d, block_h)
    if interpret_requested():
        block_t = 64  # the interpreter pays per program, not per register
    return dict(BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, N_DB=block_h // block_d,
                DOT_PREC=dot_precision(dtype), DOT_DTYPE=_tl_dtype(dtype), num_warps=num_warps)


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def causal_conv_fwd(x, seq_weight, chan_weight, num_heads, state=None):
    """Launch the forward kernel. x: (B, T, C) -> (B, T, C) in x's dtype."""
    B, T, C = x.shape
    h = C // num_heads
    Ks, Kc = seq_weight.shape[1], chan_weight.shape[2]
    P = causal_conv_state_len(Ks, Kc)
    out = torch.empty_like(x)  # (B, T, C)
    if T == 0:
        return out
    meta = conv_meta(h, x.dtype, "fwd")
    has_state = state is not None and P > 0
    grid = (B, triton.cdiv(T, meta["BLOCK_T"]), num_heads * meta["N_DB"])
    launch(_causal_conv_fwd_kernel, grid,
        x, state if has_state else x, seq_weight, chan_weight, out, T, C, h,
        KS=Ks, KC=Kc, P=P, HAS_STATE=has_state, **meta,
    )
    return out


def _chunks(x, n_pos: int, block_t: int, programs_per_chunk: int) -> tuple[int, int]:
    """Split ``n_pos`` positions into chunks of whole time tiles: (number of chunks, positions per chunk).

    On a GPU about 4 programs per SM in total; in the interpreter one chunk (it pays per program).
    """
    n_tiles = triton.cdiv(n_pos, block_t)
    sms = sm_count(x)
    if interpret_requested() or sms is None:
        n_chunks = 1
    else:
        n_chunks = max(1, min(n_tiles, (4 * sms) // max(1, programs_per_chunk)))
    tiles_per_chunk = triton.cdiv(n_tiles, n_chunks)
    return triton.cdiv(n_tiles, tiles_per_chunk), tiles_per_chunk * block_t


def causal_conv_bwd(x, seq_weight, chan_weight, num_heads, state, grad_out, state_grad: bool):
    """Launch the two backward kernels; returns (grad_x, grad_seq_weight, grad_chan_weight, grad_state or None)."""
    B, T, C = x.shape
    h = C // num_heads
    Ks, Kc = seq_weight.shape[1], chan_weight.shape[2]
    P = causal_conv_state_len(Ks, Kc)
    has_state = state is not None and P > 0
    state_grad = state_grad and has_state
    state_arg = state if has_state else x

    grad_x = torch.empty_like(x)  # (B, T, C)
    grad_state = torch.zeros_like(state) if state_grad else None  # (B, P, C)
    meta = conv_meta(h, x.dtype, "bwd_dx")
    p_start = -P if has_state else 0
    n_chunks, per_prog = _chunks(x, T - p_start, meta["BLOCK_T"], B * num_heads * meta["N_DB"])
    gws_part = torch.empty(B * n_chunks, C, Ks, device=x.device, dtype=torch.float32)  # (B * n_chunks, C, Ks)
    launch(_causal_conv_bwd_dx_kernel, (B, n_chunks, num_heads * meta["N_DB"]),
           x, state_arg, seq_weight, chan_weight, grad_out, grad_x, grad_state if state_grad else grad_x, gws_part,
           T, C, h, p_start, per_prog, KS=Ks, KC=Kc, P=P, HAS_STATE=has_state, STATE_GRAD=state_grad,
           KS_PAD=next_pow2(Ks), **meta)

    meta = conv_meta(h, x.dtype, "bwd_dw")
    n_chunks, per_prog = _chunks(x, T, meta["BLOCK_T"], B * num_heads * meta["N_DB"])
    gwc_part = torch.empty(B * n_chunks, C, h, Kc, device=x.device, dtype=torch.float32)  # (B * n_chunks, C, h, Kc)
    launch(_causal_conv_bwd_dw_kernel, (B, n_chunks, num_heads * meta["N_DB"]),
           x, state_arg, seq_weight, grad_out, gwc_part, T, C, h, per_prog,
           KS=Ks, KC=Kc, P=P, HAS_STATE=has_state, **meta)
    grad_ws = gws_part.sum(0).to(seq_weight.dtype)  # (C, Ks)
    grad_wc = gwc_part.sum(0).to(chan_weight.dtype)  # (C, h, Kc)
    return grad_x, grad_ws, grad_wc, grad_state


class CausalConvFunction(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward (grads for x, both weights and state)."""

    @staticmethod
    def forward(ctx, x, seq_weight, chan_weight, num_heads, state):
        x = x.contiguous()
        seq_weight = seq_weight.contiguous()
        chan_weight = chan_weight.contiguous()
        ctx.state_dtype = state.dtype if state is not None else None
        if state is not None:
            state = state.to(x.dtype).contiguous()
        out = causal_conv_fwd(x, seq_weight, chan_weight, num_heads, state)
        ctx.save_for_backward(x, seq_weight, chan_weight, state)
        ctx.num_heads = num_heads
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, seq_weight, chan_weight, state = ctx.saved_tensors
        state_grad = state is not None and ctx.needs_input_grad[4]
        gx, gws, gwc, gstate = causal_conv_bwd(
            x, seq_weight, chan_weight, ctx.num_heads, state, grad_out.contiguous(), state_grad
        )
        if state_grad and gstate is None:  # P == 0: the state has no columns
            gstate = torch.zeros_like(state)
        if gstate is not None:
            gstate = gstate.to(ctx.state_dtype)
        return gx, gws, gwc, None, gstate


def causal_conv_triton(
    x: torch.Tensor,  # (B, T, C)
    seq_weight: torch.Tensor,  # (C, Ks)
    chan_weight: torch.Tensor,  # (C, C // H, Kc)
    num_heads: int,
    state: torch.Tensor | None = None,  # (B, Ks + Kc - 2, C)
) -> torch.Tensor:
    """Triton ``causal_conv_ref``: same arguments, same result, (B, T, C) in x's dtype."""
    _check_inputs(x, seq_weight, chan_weight, num_heads, state)
    return CausalConvFunction.apply(x, seq_weight, chan_weight, num_heads, state)


def causal_conv_next_state(
    x: torch.Tensor,  # (B, T, C) pre-conv columns just consumed
    state: torch.Tensor | None,  # (B, P, C) or None (zeros)
    seq_kernel: int,
    chan_kernel: int,
) -> torch.Tensor:
    """Decode helper: the state to pass with the next step, i.e. the last ``Ks + Kc - 2`` pre-conv columns."""
    B, T, C = x.shape
    P = causal_conv_state_len(seq_kernel, chan_kernel)
    if state is None:
        state = x.new_zeros(B, P, C)
    return torch.cat([state.to(x.dtype), x], dim=1)[:, x.shape[1] + state.shape[1] - P :]  # (B, P, C)
