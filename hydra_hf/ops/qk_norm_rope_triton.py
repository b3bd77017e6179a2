"""Triton kernels for the CCGQA query/key epilogue (spec: ``reference.qk_norm_rope_ref``).

One program per token handles every query head and every key head of that token and fuses:
q-k mean add-back (optional), fp32 L2 norm per head, the ``sqrt(h)`` scale, the per-KV-head key
temperature, and partial RoPE on the first ``r`` channels (HF layout, ``rotate_half``).
The rotation partner of channel ``d`` (``d +- r/2``) is read with a second, cache-hitting load
instead of an in-register shuffle; the per-head norm is a scalar so the partner is normalised
with the same factor.

The backward kernel recomputes the normalised values from the saved inputs, applies the
transposed rotation, the L2-norm Jacobian ``s * inv * (dn - x * inv^2 * <dn, x>)`` and writes
the same gradient to ``q`` and ``q_mean`` (and ``k`` / ``k_mean``), plus per-token partial
sums of the temperature gradient reduced with a deterministic ``sum`` afterwards.

``qk_mean`` itself stays on the PyTorch reference: it is two element-wise ops plus a mean over
the query group that the model runs on the *pre*-conv tensors, so it cannot be fused into this
epilogue; eager PyTorch already streams it at memory bandwidth (and ``torch.compile`` fuses it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_lang import fsum
from ._triton_utils import is_interpreted_kernel, launch, next_pow2


@triton.jit
def _offsets(n, NH, HD, R, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Element offsets of token ``n``'s (NH, HD) block, its rotation partners and masks."""
    offs_hh = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_hh < NH)[:, None] & (offs_d < HD)[None, :]  # (BLOCK_H, BLOCK_D)
    half = R // 2
    is_rot = offs_d < R  # (BLOCK_D,)
    partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
    partner = tl.where(is_rot, partner, offs_d)
    base = n.to(tl.int64) * NH * HD
    off = base + offs_hh[:, None] * HD + offs_d[None, :]
    poff = base + offs_hh[:, None] * HD + partner[None, :]
    sign = tl.where(offs_d < half, -1.0, 1.0)  # rotate_half: -x2 for the first half, +x1 for the second
    return offs_hh, offs_d, mask, is_rot, partner, off, poff, sign


@triton.jit
def _norm_rope_fwd_block(
    x_ptr, m_ptr, out_ptr, temp_ptr, cos_ptr, sin_ptr, n, cs_off, NH, HD, R, scale, eps,
    HAS_MEAN: tl.constexpr, HAS_TEMP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_hh, offs_d, mask, is_rot, partner, off, poff, sign = _offsets(n, NH, HD, R, BLOCK_H, BLOCK_D)
    xf = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_D)
    xp = tl.load(x_ptr + poff, mask=mask, other=0.0).to(tl.float32)
    if HAS_MEAN:
        xf += tl.load(m_ptr + off, mask=mask, other=0.0).to(tl.float32)
        xp += tl.load(m_ptr + poff, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(fsum(xf * xf, 1) + eps)  # (BLOCK_H,)
    s = inv * scale
    if HAS_TEMP:
        s = s * tl.load(temp_ptr + offs_hh, mask=offs_hh < NH, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + cs_off + offs_d, mask=is_rot, other=1.0).to(tl.float32)  # (BLOCK_D,)
    sn = tl.load(sin_ptr + cs_off + offs_d, mask=is_rot, other=0.0).to(tl.float32)
    y = (xf * c[None, :] + (sign * sn)[None, :] * xp) * s[:, None]
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_bwd_block(
    x_ptr, m_ptr, gout_ptr, gx_ptr, gm_ptr, temp_ptr, gtemp_part_ptr, cos_ptr, sin_ptr,
    n, cs_off, NH, HD, R, scale, eps,
    HAS_MEAN: tl.constexpr, MEAN_GRAD: tl.constexpr, HAS_TEMP: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_hh, offs_d, mask, is_rot, partner, off, poff, sign = _offsets(n, NH, HD, R, BLOCK_H, BLOCK_D)
    xf = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_D)
    if HAS_MEAN:
        xf += tl.load(m_ptr + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gout_ptr + off, mask=mask, other=0.0).to(tl.float32)
    gp = tl.load(gout_ptr + poff, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + cs_off + offs_d, mask=is_rot, other=1.0).to(tl.float32)  # (BLOCK_D,)
    sn_p = tl.load(sin_ptr + cs_off + partner, mask=is_rot, other=0.0).to(tl.float32)
    # transposed rotation: dn[e] = g[e] cos[e] - sign[e] sin[p(e)] g[p(e)]
    dn = g * c[None, :] - (sign * sn_p)[None, :] * gp
    inv = 1.0 / tl.sqrt(fsum(xf * xf, 1) + eps)  # (BLOCK_H,)
    dot = fsum(dn * xf, 1)  # (BLOCK_H,)
    s = inv * scale
    if HAS_TEMP:
        hmask = offs_hh < NH
        temp = tl.load(temp_ptr + offs_hh, mask=hmask, other=0.0).to(tl.float32)
        tl.store(gtemp_part_ptr + n.to(tl.int64) * NH + offs_hh, dot * s, mask=hmask)
        s = s * temp
    dx = s[:, None] * (dn - xf * (inv * inv * dot)[:, None])
    tl.store(gx_ptr + off, dx.to(gx_ptr.dtype.element_ty), mask=mask)
    if MEAN_GRAD:
        tl.store(gm_ptr + off, dx.to(gm_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    q_ptr, k_ptr, qm_ptr, km_ptr, temp_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    T, cs_stride_b, cs_stride_t, HQ, HK, HD, R, scale, eps,
    HAS_MEAN: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)  # token b * T + t
    cs_off = (n // T).to(tl.int64) * cs_stride_b + (n % T).to(tl.int64) * cs_stride_t
    _norm_rope_fwd_block(q_ptr, qm_ptr, qo_ptr, temp_ptr, cos_ptr, sin_ptr, n, cs_off, HQ, HD, R, scale, eps,
                         HAS_MEAN, False, BLOCK_HQ, BLOCK_D)
    _norm_rope_fwd_block(k_ptr, km_ptr, ko_ptr, temp_ptr, cos_ptr, sin_ptr, n, cs_off, HK, HD, R, scale, eps,
                         HAS_MEAN, True, BLOCK_HK, BLOCK_D)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    q_ptr, k_ptr, qm_ptr, km_ptr, temp_ptr, cos_ptr, sin_ptr, gqo_ptr, gko_ptr,
    gq_ptr, gk_ptr, gqm_ptr, gkm_ptr, gtemp_part_ptr,
    T, cs_stride_b, cs_stride_t, HQ, HK, HD, R, scale, eps,
    HAS_MEAN: tl.constexpr, QM_GRAD: tl.constexpr, KM_GRAD: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    cs_off = (n // T).to(tl.int64) * cs_stride_b + (n % T).to(tl.int64) * cs_stride_t
    _norm_rope_bwd_block(q_ptr, qm_ptr, gqo_ptr, gq_ptr, gqm_ptr, temp_ptr, gtemp_part_ptr, cos_ptr, sin_ptr,
                         n, cs_off, HQ, HD, R, scale, eps, HAS_MEAN, QM_GRAD, False, BLOCK_HQ, BLOCK_D)
    _norm_rope_bwd_block(k_ptr, km_ptr, gko_ptr, gk_ptr, gkm_ptr, temp_ptr, gtemp_part_ptr, cos_ptr, sin_ptr,
                         n, cs_off, HK, HD, R, scale, eps, HAS_MEAN, KM_GRAD, True, BLOCK_HK, BLOCK_D)


INTERPRETED = is_interpreted_kernel(_qk_norm_rope_fwd_kernel)


def qk_meta(Hq: int, Hk: int, h: int) -> dict:
    """Block sizes and warps: one (heads, h) tile per token; 2 warps up to 256 elements, 4 at 512, 8 beyond
    (so that the largest supported tile, ``TRITON_LIMITS["padded_latent_size"]`` = BLOCK_HQ * BLOCK_D, does not spill)."""
    block_hq, block_d = next_pow2(Hq), next_pow2(h)
    return dict(BLOCK_HQ=block_hq, BLOCK_HK=next_pow2(Hk), BLOCK_D=block_d,
                num_warps=max(2, min(8, block_hq * block_d // 128)))


def _rope_table(t: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, int, int]:
    """Broadcast cos/sin to (B, T, r) without copying; returns the tensor and its batch/time strides."""
    t = t.expand(B, T, t.shape[-1])
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1)


def _check_inputs(q, k, q_mean, k_mean, temperature, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, T, H, h), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    B, T, Hq, h = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != h:
        raise ValueError(f"k must be (B={B}, T={T}, Hk, h={h}), got {tuple(k.shape)}")
    Hk = k.shape[2]
    if (q_mean is None) != (k_mean is None):
        raise ValueError("q_mean and k_mean must both be tensors or both be None")
    if q_mean is not None and (q_mean.shape != q.shape or k_mean.shape != k.shape):
        raise ValueError(
            f"q_mean must match q {tuple(q.shape)} and k_mean must match k {tuple(k.shape)}, "
            f"got {tuple(q_mean.shape)} and {tuple(k_mean.shape)}"
        )
    if temperature.numel() != Hk:
        raise ValueError(f"temperature must have Hk={Hk} entries, got shape {tuple(temperature.shape)}")
    r = cos.shape[-1]
    if sin.shape[-1] != r or r % 2 != 0 or r > h:
        raise ValueError(f"cos and sin must share an even last dim r <= h={h}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    for name, t in (("k", k), ("q_mean", q_mean), ("k_mean", k_mean), ("temperature", temperature), ("cos", cos), ("sin", sin)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


class QKNormRopeFunction(torch.autograd.Function):
    """Autograd wrapper: Triton forward and backward; grads for q, k, q_mean, k_mean, temperature."""

    @staticmethod
    def forward(ctx, q, k, q_mean, k_mean, temperature, cos, sin, eps):
        B, T, Hq, h = q.shape
        Hk = k.shape[2]
        q = q.contiguous()
        k = k.contiguous()
        has_mean = q_mean is not None
        if has_mean:
            q_mean = q_mean.contiguous()
            k_mean = k_mean.contiguous()
        ctx.temp_shape = temperature.shape
        temperature = temperature.reshape(-1).contiguous()
        cos, sb, st = _rope_table(cos, B, T)
        sin, sb2, st2 = _rope_table(sin, B, T)
        if (sb, st) != (sb2, st2):
            cos, sin = cos.contiguous(), sin.contiguous()
            sb, st = cos.stride(0), cos.stride(1)
        r = cos.shape[-1]
        q_out = torch.empty_like(q)  # (B, T, Hq, h)
        k_out = torch.empty(k.shape, device=k.device, dtype=q.dtype)  # (B, T, Hk, h), q's dtype like the reference
        meta = qk_meta(Hq, Hk, h)
        if B * T > 0:
            launch(_qk_norm_rope_fwd_kernel, (B * T,),
                q, k, q_mean if has_mean else q, k_mean if has_mean else k, temperature, cos, sin, q_out, k_out,
                T, sb, st, Hq, Hk, h, r, float(h) ** 0.5, eps, HAS_MEAN=has_mean, **meta,
            )
        ctx.save_for_backward(q, k, q_mean, k_mean, temperature, cos, sin)
        ctx.meta = meta
        ctx.cs_strides = (sb, st)
        ctx.eps = eps
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q_out, grad_k_out):
        q, k, q_mean, k_mean, temperature, cos, sin = ctx.saved_tensors
        B, T, Hq, h = q.shape
        Hk = k.shape[2]
        has_mean = q_mean is not None
        if grad_q_out is None:
            grad_q_out = torch.zeros(q.shape, device=q.device, dtype=q.dtype)
        if grad_k_out is None:
            grad_k_out = torch.zeros(k.shape, device=k.device, dtype=q.dtype)
        grad_q_out = grad_q_out.contiguous()  # (B, T, Hq, h)
        grad_k_out = grad_k_out.contiguous()  # (B, T, Hk, h)
        qm_grad = has_mean and ctx.needs_input_grad[2]
        km_grad = has_mean and ctx.needs_input_grad[3]
        gq = torch.empty_like(q)
        gk = torch.empty_like(k)
        gqm = torch.empty_like(q_mean) if qm_grad else None
        gkm = torch.empty_like(k_mean) if km_grad else None
        gtemp_part = torch.empty(B * T, Hk, device=q.device, dtype=torch.float32)  # per-token partial sums
        sb, st = ctx.cs_strides
        if B * T > 0:
            launch(_qk_norm_rope_bwd_kernel, (B * T,),
                q, k, q_mean if has_mean else q, k_mean if has_mean else k, temperature, cos, sin,
                grad_q_out, grad_k_out, gq, gk, gqm if qm_grad else gq, gkm if km_grad else gk, gtemp_part,
                T, sb, st, Hq, Hk, h, cos.shape[-1], float(h) ** 0.5, ctx.eps,
                HAS_MEAN=has_mean, QM_GRAD=qm_grad, KM_GRAD=km_grad, **ctx.meta,
            )
        gtemp = gtemp_part.sum(0).to(temperature.dtype).view(ctx.temp_shape)  # (Hk,)
        return gq, gk, gqm, gkm, gtemp, None, None, None


def qk_norm_rope_triton(
    q: torch.Tensor,  # (B, T, Hq, h)
    k: torch.Tensor,  # (B, T, Hk, h)
    q_mean: torch.Tensor | None,  # (B, T, Hq, h) or None
    k_mean: torch.Tensor | None,  # (B, T, Hk, h) or None
    temperature: torch.Tensor,  # (Hk,)
    cos: torch.Tensor,  # (B, T, r) (a batch dim of 1 broadcasts)
    sin: torch.Tensor,  # (B, T, r)
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``qk_norm_rope_ref``: same arguments, same results (both in q's dtype)."""
    _check_inputs(q, k, q_mean, k_mean, temperature, cos, sin)
    q_out, k_out = QKNormRopeFunction.apply(q, k, q_mean, k_mean, temperature, cos, sin, float(eps))
    return q_out, k_out
