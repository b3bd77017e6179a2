"""Plain PyTorch references for every HYDRA op.

These functions define what each op computes. The model runs them directly on the
``"torch"`` kernel backend (and on CPU under ``"auto"``); every Triton kernel in
``hydra_hf/ops/`` is tested against them, output and every gradient. This is a flat module
(only torch imports) so that a saved model's remote code (``trust_remote_code=True``) ships it
next to ``modeling_hydra.py``; ``hydra_hf.ops.reference`` is the same module under its package name.

Shape letters: B batch, T tokens, C channels, H heads, h head dim, K selected tokens,
N flattened tokens, X experts, E hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv_state_len(seq_kernel: int, chan_kernel: int) -> int:
    """Number of past pre-conv columns the two stacked causal convs need (their receptive field - 1)."""
    return seq_kernel + chan_kernel - 2


def causal_conv_ref(
    x: torch.Tensor,  # (B, T, C)
    seq_weight: torch.Tensor,  # (C, Ks) depthwise kernel over time
    chan_weight: torch.Tensor,  # (C, C // H, Kc) per-head channel mixing over time
    num_heads: int,
    state: torch.Tensor | None = None,  # (B, Ks + Kc - 2, C) previous pre-conv columns, oldest first
    sequence_ids: torch.Tensor | None = None,  # (B, T) packed-sequence id; the state belongs to id 0
) -> torch.Tensor:
    """Causal depthwise sequence conv followed by a causal conv grouped per head.

    Token t sees only tokens <= t. With ``state=None`` the past is zeros (a sequence start).
    The two convs have no bias, so zero history gives zero intermediate values, which is the
    same as zero-padding each conv on its own. Equal to
    ``conv1d(conv1d(cat(state, x), seq_weight, groups=C), chan_weight, groups=H)`` (tested).
    With ``sequence_ids`` every tap only reads columns of the token's own sequence, which equals running each
    packed sequence on its own from a zero history (segments are contiguous, so checking the two ends of a tap
    is enough).
    """
    B, T, C = x.shape
    Ks = seq_weight.shape[-1]
    Kc = chan_weight.shape[-1]
    H, h = num_heads, C // num_heads
    P = causal_conv_state_len(Ks, Kc)
    if state is None:
        xp = F.pad(x, (0, 0, P, 0))  # (B, P + T, C) zero history
    else:
        xp = torch.cat([state.to(x.dtype), x], dim=1)  # (B, P + T, C)
    # Depthwise "valid" conv over time as a sum of shifted products (much faster than a
    # depthwise conv1d on CPU): mid[t] = sum_j w[:, j] * xp[t + j].
    L1 = T + Kc - 1
    if T == 1 and sequence_ids is None:
        # One new token (decoding): both convs as one product-and-sum each over sliding windows (views), a handful
        # of ops instead of Ks + Kc of them.
        mid = (xp.unfold(1, Ks, 1) * seq_weight).sum(-1)  # (B, Kc, C): windows (B, Kc, C, Ks) x (C, Ks)
        # per head: (B, Kc * h_in) @ (Kc * h_in, h_out), one batched matmul over the heads
        mid = mid.view(B, Kc, H, h).permute(2, 0, 1, 3).reshape(H, B, Kc * h)  # (H, B, Kc*h)
        w2 = chan_weight.view(H, h, h, Kc).permute(0, 3, 2, 1).reshape(H, Kc * h, h)  # (H, Kc*h_in, h_out)
        return torch.bmm(mid, w2).permute(1, 0, 2).reshape(B, 1, C)
    if sequence_ids is not None:
        seq = F.pad(sequence_ids, (P, 0), value=0)  # (B, P + T) history columns belong to sequence 0
        mid_seq = seq[:, Ks - 1 : Ks - 1 + L1]  # (B, L1) sequence of each mid column's own token
        same = [(seq[:, j : j + L1] == mid_seq).unsqueeze(-1).to(x.dtype) for j in range(Ks)]
        mid = xp[:, 0:L1] * seq_weight[:, 0] * same[0]
        for j in range(1, Ks):
            mid = mid + xp[:, j : j + L1] * seq_weight[:, j] * same[j]  # (B, L1, C)
    else:
        mid = xp[:, 0:L1] * seq_weight[:, 0]
        for j in range(1, Ks):
            mid = mid + xp[:, j : j + L1] * seq_weight[:, j]  # (B, L1, C)
    # Per-head channel mixing over Kc taps: out[t, head] = sum_j W[head, :, :, j] @ mid[t + j, head].
    w2 = chan_weight.view(H, h, h, Kc)  # (H, h_out, h_in, Kc), conv1d's grouped layout
    mid = mid.view(B, L1, H, h)
    out = 0
    for j in range(Kc):
        tap = mid[:, j : j + T]  # (B, T, H, h)
        if sequence_ids is not None:
            tap = tap * (mid_seq[:, j : j + T] == sequence_ids)[:, :, None, None].to(x.dtype)
        out = out + torch.einsum("bthi,hoi->btho", tap, w2[..., j])
    return out.reshape(B, T, C)  # (B, T, C)


def qk_mean_ref(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CCGQA q-k mean: m_q = (q + k repeated to the query heads) / 2; m_k = m_q averaged per KV group.

    q: (B, T, Hq, h), k: (B, T, Hk, h) -> m_q (B, T, Hq, h), m_k (B, T, Hk, h).
    """
    B, T, Hq, h = q.shape
    Hk = k.shape[2]
    groups = Hq // Hk
    if groups == 1:  # one query head per KV head: m_k = m_q
        m_q = 0.5 * (q + k)
        return m_q, m_q
    # broadcast k over its query group instead of materialising k repeated to Hq heads
    m_q = 0.5 * (q.view(B, T, Hk, groups, h) + k.unsqueeze(3))  # (B, T, Hk, groups, h)
    m_k = m_q.mean(dim=3)  # (B, T, Hk, h)
    return m_q.view(B, T, Hq, h), m_k


def apply_partial_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` channels of each head; the rest pass through.

    x: (B, T, H, h); cos, sin: (B, T, r) with r even (HF layout: both halves repeat the freqs).
    Written as the two half-rotations (x1 c - x2 s, x2 c + x1 s) on views, which is the HF
    ``x * cos + rotate_half(x) * sin`` with fewer tensor ops (this runs in every layer on CPU).
    """
    r = cos.shape[-1]
    half = r // 2
    c = cos[..., :half].unsqueeze(2).to(x.dtype)  # (B, T, 1, r/2)
    s = sin[..., :half].unsqueeze(2).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:r]  # (B, T, H, r/2) each
    parts = [x1 * c - x2 * s, x2 * c + x1 * s]
    if r < x.shape[-1]:
        parts.append(x[..., r:])
    return torch.cat(parts, dim=-1)


def qk_norm_rope_ref(
    q: torch.Tensor,  # (B, T, Hq, h) post-conv queries
    k: torch.Tensor,  # (B, T, Hk, h) post-conv keys
    q_mean: torch.Tensor | None,  # (B, T, Hq, h) or None
    k_mean: torch.Tensor | None,  # (B, T, Hk, h) or None
    temperature: torch.Tensor,  # (Hk,) learnable key temperature
    cos: torch.Tensor,  # (B, T, r)
    sin: torch.Tensor,  # (B, T, r)
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add back the q-k mean, L2-normalise per head, scale by sqrt(h) (keys also by their
    per-KV-head temperature), then partial RoPE. Computed in fp32, returned in q's dtype."""
    dtype = q.dtype
    Hq, h = q.shape[2], q.shape[-1]
    # q and k go through the same per-head steps: run them as one (B, T, Hq + Hk, h) tensor, which
    # halves the number of tensor ops (what the time goes to on CPU at small widths).
    x = torch.cat([q, k], dim=2).float()  # (B, T, Hq + Hk, h)
    if q_mean is not None:
        x = x + torch.cat([q_mean, k_mean], dim=2).float()
    # per-head scale: sqrt(h) for queries, sqrt(h) * temperature for keys
    head_scale = torch.cat([temperature.new_ones(Hq), temperature]).float().view(1, 1, -1, 1) * h**0.5
    x = x * (torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * head_scale)
    x = apply_partial_rope_ref(x, cos.float(), sin.float())
    return x[:, :, :Hq].to(dtype), x[:, :, Hq:].to(dtype)


def gather_tokens_ref(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, T, E), index: (B, K) int64 -> (B, K, E) rows x[b, index[b, k]]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_gated_add_ref(
    residual: torch.Tensor,  # (B, T, E)
    update: torch.Tensor,  # (B, K, E)
    index: torch.Tensor,  # (B, K) int64, unique within each row
    gate: torch.Tensor | None = None,  # (B, K) or None (= 1)
) -> torch.Tensor:
    """Out-of-place residual[b, index[b, k]] += gate[b, k] * update[b, k]."""
    if gate is not None:
        update = update * gate.unsqueeze(-1).to(update.dtype)
    idx = index.unsqueeze(-1).expand(-1, -1, residual.shape[-1])
    return residual.scatter_add(1, idx, update.to(residual.dtype))


def moe_permute_ref(
    x: torch.Tensor,  # (N, E)
    expert_index: torch.Tensor,  # (N, k) int64
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the N*k (token, slot) pairs by expert.

    Returns permuted (N*k, E) rows grouped by expert (stable: token order inside an expert),
    tokens_per_expert (X,) int64 and sorted_pairs (N*k,) int64: the flat pair id n*k+j of each row.
    """
    N, k = expert_index.shape
    flat = expert_index.reshape(-1)  # (N*k,)
    sorted_pairs = torch.argsort(flat, stable=True)  # (N*k,)
    permuted = x.index_select(0, sorted_pairs // k)  # (N*k, E)
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)
    return permuted, tokens_per_expert, sorted_pairs


def moe_unpermute_ref(
    expert_out: torch.Tensor,  # (N*k, E) rows in permuted order
    sorted_pairs: torch.Tensor,  # (N*k,)
    weights: torch.Tensor,  # (N, k) routing weights
) -> torch.Tensor:
    """Put rows back in (token, slot) order and sum the slots weighted by the routing weights -> (N, E)."""
    N, k = weights.shape
    unsorted = torch.empty_like(expert_out)
    unsorted = unsorted.index_copy(0, sorted_pairs, expert_out)  # (N*k, E)
    unsorted = unsorted.view(N, k, -1)
    return (unsorted * weights.unsqueeze(-1).to(unsorted.dtype)).sum(dim=1)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: fp32 statistics, weight applied in the input dtype."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # the same math as below in one fused ATen op (fewer kernels per layer on CPU)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


REDUCTIONS = ("mean", "sum")


def check_linear_cross_entropy_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, E), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, E={hidden.shape[1]}), got shape {tuple(weight.shape)}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must be (N={hidden.shape[0]},), got shape {tuple(labels.shape)}")


def linear_cross_entropy_ref(
    hidden: torch.Tensor,  # (N, E)
    weight: torch.Tensor,  # (V, E)
    labels: torch.Tensor,  # (N,) int64
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` over the non-ignored labels (fp32 scalar; mean or sum).

    The logits are upcast to fp32 before the softmax (as Hugging Face causal LMs do and as Liger
    computes internally). With every label ignored the mean is 0/0 = nan, like ``F.cross_entropy``.
    """
    check_linear_cross_entropy_inputs(hidden, weight, labels, reduction)
    logits = hidden @ weight.T  # (N, V)
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)
