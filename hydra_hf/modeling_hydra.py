"""PyTorch HYDRA model: CCGQA latent attention, weight-shared recursive blocks and routing.

Reads like transformers' own modeling files: RMSNorm, rotary embedding, MLP, attention, decoder
block, MoE block, `PreTrainedModel`, `HydraModel`, `HydraForCausalLM`.

`HydraModel.forward` owns the loop over the effective layers (`build_layer_plan`). At each layer it
asks that layer's routers (leaves in `routing_hydra.py`, which never calls back here) which tokens
to process, then runs the block either densely on all tokens or on a *compact* sequence: the tokens
it processes (routing-selected and not padding) are gathered into (B, K, E) in their original order,
the block runs on them only (true RoPE positions, causal mask among them by input step,
convolutions and value shift over that sub-sequence), and its output is scatter-added back, gated.
Padding is handled by the same mechanism, which is why pad tokens never leak into the convolutions
or the value shift. Packed sequences (`position_ids` restarting inside a row) are kept apart in
attention, the convolutions, the value shift and the per-sequence routing top-k.

What one layer needs besides its hidden states travels in one `HydraLayerInputs`, by keyword.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .cache_hydra import HydraCache, HydraCacheLayer, HydraCacheMixin, HydraStaticCache
from .configuration_hydra import HydraConfig
from .ops_hydra import (
    causal_conv,
    causal_conv_state_len,
    check_kernel_backend,
    fused_linear_cross_entropy,
    gather_tokens,
    linear_cross_entropy_is_fused,
    moe_permute,
    moe_unpermute,
    qk_mean,
    qk_norm_rope,
    resolve_backend,
    rms_norm,
    scatter_gated_add,
    swiglu,
)
from .peft_hydra import register_peft_defaults
from .routing_hydra import (
    ExpertChoiceRouter,
    ExpertRouting,
    LayerPlan,
    MoDRouter,
    MoRRouter,
    RouterInputs,
    RoutingRecord,
    RoutingState,
    TokenChoiceRouter,
    attach_aux_loss,
    build_layer_plan,
    compact_selection,
    forced_experts,
    mor_layer_capacity,
    num_recursion_groups,
    route_experts,
    router_input,
    sequence_ids_from_positions,
)

logger = logging.get_logger(__name__)


class HydraRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, kernel_backend: str = "torch"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.kernel_backend = kernel_backend

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        backend = resolve_backend(self.kernel_backend, hidden_states.device)
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=backend)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class HydraRotaryEmbedding(nn.Module):
    """RoPE for the first `config.rotary_dim` channels of each latent head, as `LlamaRotaryEmbedding` computes it.

    `config.rope_parameters["rope_type"]` picks the frequencies: "default" here, the others from transformers'
    `ROPE_INIT_FUNCTIONS` (linear, dynamic, yarn, llama3), computed over `rotary_dim` channels (they see the config
    through `HydraRotaryConfig`, whose `head_dim` is `rotary_dim`). `dynamic_rope_update` recomputes dynamic
    frequencies when a sequence grows past `max_position_embeddings`, and cos / sin are multiplied by the type's
    `attention_scaling` (yarn's attention factor; 1.0 for the others)."""

    inv_freq: torch.Tensor  # (r/2,) fix linting for `register_buffer`

    def __init__(self, config: HydraConfig):
        super().__init__()
        self.config = config.rotary_config()  # what the RoPE init functions and dynamic_rope_update read
        self.dim = config.rotary_dim
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        self.rope_init_fn: Callable = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = self.rope_init_fn(self.config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None, **kwargs) -> tuple[torch.Tensor, float]:
        """The original RoPE over `config.head_dim` channels (`rotary_dim` for a `HydraRotaryConfig`) -> (inv_freq,
        attention scaling 1.0)."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update  # dynamic rope types recompute inv_freq past max_position_embeddings
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, r) for `position_ids` (B, T); computed once per forward by `HydraModel`."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, r/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, r)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class HydraMLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: HydraConfig, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {config.hidden_act!r}")
        self.kernel_backend = config.kernel_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = resolve_backend(self.kernel_backend, x.device)
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=backend))


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hk, S, h) -> (B, Hk * n_rep, S, h)."""
    batch, num_kv_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_kv_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (B, Hq, K, h)
    key: torch.Tensor,  # (B, Hk, S, h)
    value: torch.Tensor,  # (B, Hk, S, h)
    attention_mask: torch.Tensor | None,  # (B, 1, K, S) bool, True = attend; None = plain causal
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # (B, Hq, K, S)
    if attention_mask is None:
        q_len, k_len = query.shape[2], key.shape[2]
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if attention_mask.dtype == torch.bool:
        attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
    else:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)  # (B, Hq, K, h)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


# One query per row over this many cached keys (batch x KV heads x columns) or more: on CPU, two grouped matmuls beat
# PyTorch's SDPA kernel for HYDRA's small latent heads (measured at h = 16: 0.19 vs 0.48 ms at 8 x 2 x 2048 keys; below
# ~16K keys SDPA is as fast or faster). `docs/decode.md` has the numbers.
DECODE_MATMUL_MIN_KEYS = 16384


def grouped_decode_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, Hq, 1, h)
    key: torch.Tensor,  # (B, Hk, S, h)
    value: torch.Tensor,  # (B, Hk, S, h)
    attention_mask: torch.Tensor | None,  # (B, 1, 1, S) bool, True = attend; None = every key
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    """Single-token attention, the query heads of a KV group as one matmul (no KV repeat): the same result as SDPA,
    used by HYDRA's sdpa path for long CPU decodes."""
    B, Hq, _, h = query.shape
    Hk = key.shape[1]
    scores = torch.matmul(query.view(B, Hk, Hq // Hk, h), key.transpose(2, 3)) * scaling  # (B, Hk, g, S)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)  # (B, Hk, g, h)
    return out.view(B, Hq, 1, h).transpose(1, 2), None  # (B, 1, Hq, h)


def build_attention_mask(
    query_steps: torch.Tensor,  # (B, K) input step of each query
    key_steps: torch.Tensor,  # (B, S) input step of each key column
    key_valid: torch.Tensor | None,  # (B, S) bool keys that may be seen; None = all
    query_valid: torch.Tensor | None,  # (B, K) bool real query slots; None = all
    query_sequence: torch.Tensor | None,  # (B, K) packed-sequence id of each query; None = one sequence
    key_sequence: torch.Tensor | None,  # (B, S) packed-sequence id of each key
    new_columns_at: int | None = None,  # this forward's columns start here (appending cache); None = static layout
) -> torch.Tensor:
    """Boolean (B, 1, K, S) mask, True = attend: a query sees valid keys of earlier or equal steps in its sequence.

    Each query always sees its own column and a padding slot sees everything, so no row is ever empty (no NaN
    from padding slots or from static routing's hidden keys; those rows are discarded by the caller).
    """
    diff = key_steps[:, None, :] - query_steps[:, :, None]  # (B, K, S)
    visible = diff <= 0
    if key_valid is not None:
        visible = visible & key_valid[:, None, :]
    if query_sequence is not None:
        visible = visible & (key_sequence[:, None, :] == query_sequence[:, :, None])
    own = diff == 0  # a token's own column: the one written at its step ...
    if new_columns_at:  # ... among this forward's columns (a cropped-away cached column may share the step)
        own = own & (torch.arange(key_steps.shape[1], device=diff.device) >= new_columns_at)
    visible = visible | own
    if query_valid is not None:
        visible = visible | ~query_valid[:, :, None]
    return visible.unsqueeze(1)


def expand_attention_weights(
    weights: torch.Tensor,  # (B, H, K, S) over the layer's queries and key columns
    query_steps: torch.Tensor,  # (B, K)
    key_steps: torch.Tensor,  # (B, S)
    query_valid: torch.Tensor | None,  # (B, K)
    past_length: int,
    input_length: int,  # T
    num_columns: int,  # past + T, or max_cache_len for the static cache
) -> torch.Tensor:
    """(B, H, T, num_columns) attention over input positions: zeros for rows and columns a layer skipped."""
    B, K, S = query_steps.shape[0], query_steps.shape[1], key_steps.shape[1]
    if query_valid is None and K == input_length and S == num_columns:
        identity = torch.arange(num_columns, device=key_steps.device).expand(B, -1)
        if torch.equal(key_steps.long(), identity) and torch.equal(query_steps.long(), identity[:, past_length : past_length + K]):
            return weights  # already over input positions (keeps the autograd link for retain_grad)
    B, H, K, S = weights.shape
    T = input_length
    if query_valid is not None:
        weights = weights * query_valid[:, None, :, None].to(weights.dtype)
    rows = (query_steps - past_length).long().clamp(0, T - 1)  # (B, K)
    by_row = weights.new_zeros(B, H, T, S).scatter(2, rows[:, None, :, None].expand(B, H, K, S), weights)
    cols = key_steps.long().clamp(0, num_columns - 1)  # (B, S)
    return weights.new_zeros(B, H, T, num_columns).scatter(3, cols[:, None, None, :].expand(B, H, T, S), by_row)


def _shift_in(
    x: torch.Tensor,  # (B, K, C) new columns, valid ones first
    state: torch.Tensor | None,  # (B, 1, C) the previous column or None (sequence start)
) -> torch.Tensor:
    """(B, K, C): each column replaced by its predecessor (the state for the first, zeros at a sequence start)."""
    if state is None:
        return F.pad(x[:, :-1], (0, 0, 1, 0))
    return torch.cat([state.to(x.dtype), x[:, :-1]], dim=1)


@dataclass
class HydraLayerInputs:
    """Everything an effective layer needs besides its hidden states, for the (B, K) tokens it runs on.

    Built by `HydraModel.forward` (gathered for a compact layer) and passed by keyword down to attention.
    """

    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin (B, K, r)
    steps: torch.Tensor  # (B, K) index of each token in the input stream (past + t): causality and the cache
    token_valid: torch.Tensor | None = None  # (B, K) bool real slots, valid first; None = all
    sequence_ids: torch.Tensor | None = None  # (B, K) packed-sequence id; None = one sequence per row
    key_visible: torch.Tensor | None = None  # (B, K) bool keys others may attend to (static routing)
    cache_layer: HydraCacheLayer | None = None
    past_length: int | torch.Tensor = 0  # input steps before this forward (a 0-dim tensor on the static cache)
    input_length: int = 0  # T, input steps of this forward
    cache_all_steps: bool = False  # the layer skips only padding: cache a column per step (padding invalid)
    output_attentions: bool = False  # return weights over input positions (B, H, T, past + T)


class HydraAttention(nn.Module):
    """Compressed Convolutional Grouped-Query Attention (CCGQA, arXiv 2510.04476).

    Queries and keys are down-projected to latent heads, mixed over time by causal convolutions,
    L2-normalised with a learnable key temperature, rotated (partial RoPE), and attend in the
    latent space; values are latent too (half of the KV heads shifted by one token).
    """

    def __init__(self, config: HydraConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.latent_head_dim
        self.num_shift_heads = config.num_value_shift_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.use_qk_mean = config.use_qk_mean
        self.seq_kernel = config.qk_conv_kernel_size
        self.chan_kernel = config.qk_channel_conv_kernel_size
        self.conv_state_len = causal_conv_state_len(self.seq_kernel, self.chan_kernel)
        self.kernel_backend = config.kernel_backend

        q_width = self.num_heads * self.head_dim  # E / C
        kv_width = self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=False)
        # Causal convs on latent q and k: depthwise over time, then grouped per head.
        self.q_seq_conv = nn.Parameter(torch.empty(q_width, self.seq_kernel))  # (C, Ks)
        self.k_seq_conv = nn.Parameter(torch.empty(kv_width, self.seq_kernel))
        self.q_chan_conv = nn.Parameter(torch.empty(q_width, self.head_dim, self.chan_kernel))  # (C, h, Kc)
        self.k_chan_conv = nn.Parameter(torch.empty(kv_width, self.head_dim, self.chan_kernel))
        self.key_temperature = nn.Parameter(torch.ones(self.num_key_value_heads))  # (Hk,)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, K, E) normalised block input
        *,
        inputs: HydraLayerInputs,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, K, _ = hidden_states.shape
        Hq, Hk, h, Hs = self.num_heads, self.num_key_value_heads, self.head_dim, self.num_shift_heads
        backend = resolve_backend(self.kernel_backend, hidden_states.device)
        valid, sequence_ids, cache_layer = inputs.token_valid, inputs.sequence_ids, inputs.cache_layer

        q = self.q_proj(hidden_states)  # (B, K, Hq*h)
        k = self.k_proj(hidden_states)  # (B, K, Hk*h)
        v = self.v_proj(hidden_states).view(B, K, Hk, h)  # (B, K, Hk, h)

        q_mean = k_mean = None
        if self.use_qk_mean:
            q_mean, k_mean = qk_mean(q.view(B, K, Hq, h), k.view(B, K, Hk, h), backend=backend)

        # Rolling state of this layer in the cache: last P pre-conv q / k columns, last value-shift source.
        Cq, Ck, P = Hq * h, Hk * h, self.conv_state_len
        history = cache_layer.rolling_state() if cache_layer is not None else None  # (B, W, Cq + Ck + Hs*h)
        conv_state = value_prev = None
        if history is not None:
            W = history.shape[1]
            if P > 0:
                conv_state = history[:, W - P :, : Cq + Ck]  # (B, P, Cq + Ck)
            if Hs > 0:
                value_prev = history[:, W - 1 :, Cq + Ck :]  # (B, 1, Hs*h)
        # q and k go through one conv call: the seq conv is per channel and the channel conv per head, so the
        # Hq + Hk heads side by side are the two convs at once (half the ops on the per-token path).
        qk = torch.cat([q, k], dim=-1)  # (B, K, Cq + Ck)
        qk_conv = causal_conv(
            qk,
            torch.cat([self.q_seq_conv, self.k_seq_conv], dim=0),  # (Cq + Ck, Ks)
            torch.cat([self.q_chan_conv, self.k_chan_conv], dim=0),  # (Cq + Ck, h, Kc)
            Hq + Hk,
            state=conv_state,
            sequence_ids=sequence_ids,
            backend=backend,
        )
        q_conv, k_conv = qk_conv[..., :Cq], qk_conv[..., Cq:]

        # Value shift: the last Hs KV heads read the previous processed token's values (zeros at a sequence start).
        shift_source = None
        if Hs > 0:
            shift_source = v[:, :, Hk - Hs :].reshape(B, K, Hs * h)  # (B, K, Hs*h)
            shifted = value_prev if (K == 1 and value_prev is not None) else _shift_in(shift_source, value_prev)
            if sequence_ids is not None:
                same = F.pad(sequence_ids[:, 1:] == sequence_ids[:, :-1], (1, 0), value=True)  # (B, K)
                shifted = shifted * same.unsqueeze(-1).to(shifted.dtype)
            v = torch.cat([v[:, :, : Hk - Hs], shifted.view(B, K, Hs, h)], dim=2)  # (B, K, Hk, h)

        if cache_layer is not None:
            columns = [qk] if shift_source is None else [qk, shift_source]
            counts = None if valid is None else valid.sum(dim=1)  # (B,)
            cache_layer.update_rolling(columns[0] if len(columns) == 1 else torch.cat(columns, dim=-1), inputs.steps, counts)

        cos, sin = inputs.position_embeddings
        q_out, k_out = qk_norm_rope(
            q_conv.view(B, K, Hq, h), k_conv.view(B, K, Hk, h), q_mean, k_mean, self.key_temperature,
            cos, sin, backend=backend,
        )
        query_states = q_out.transpose(1, 2)  # (B, Hq, K, h)
        key_states = k_out.transpose(1, 2)  # (B, Hk, K, h)
        value_states = v.transpose(1, 2)  # (B, Hk, K, h)

        stored_valid = valid
        if inputs.key_visible is not None:
            stored_valid = inputs.key_visible if valid is None else valid & inputs.key_visible
        key_steps, key_valid = inputs.steps, stored_valid
        if cache_layer is not None:
            new_keys, new_values, new_steps = key_states, value_states, inputs.steps
            T = inputs.input_length
            if inputs.cache_all_steps and K < T and sequence_ids is None and cache_layer.max_cache_len is None:
                # Only padding was left out: cache one column per input step (padding invalid), as Llama does.
                cols = (inputs.steps - inputs.past_length).long()  # (B, K) unique per row
                spread = cols[:, None, :, None].expand(B, Hk, K, h)
                new_keys = key_states.new_zeros(B, Hk, T, h).scatter(2, spread, key_states)
                new_values = value_states.new_zeros(B, Hk, T, h).scatter(2, spread, value_states)
                kept = stored_valid if stored_valid is not None else torch.ones_like(cols, dtype=torch.bool)
                stored_valid = torch.zeros(B, T, dtype=torch.bool, device=cols.device).scatter(1, cols, kept)
                new_steps = (torch.arange(T, device=cols.device) + inputs.past_length).expand(B, T)
            first_step = None  # the new columns' steps are past + arange: the layer may keep them implicit
            if new_keys.shape[2] == T and (new_steps is not inputs.steps or (valid is None and K == T)):
                first_step = inputs.past_length if isinstance(inputs.past_length, int) else None
            key_states, value_states, key_valid, key_steps = cache_layer.update(
                new_keys, new_values, new_steps, stored_valid, first_step
            )
        S = key_states.shape[2]
        new_columns_at = S - (new_keys.shape[2] if cache_layer is not None else K)
        attention_mask = None
        need_mask = key_valid is not None or valid is not None or sequence_ids is not None or (K > 1 and S != K)
        if key_steps is None and (need_mask or inputs.output_attentions):
            key_steps = cache_layer.column_steps()
        if need_mask:
            key_sequence = sequence_ids
            if sequence_ids is not None and S != K:  # cached columns continue the row's first sequence
                key_sequence = F.pad(sequence_ids, (S - K, 0), value=0)
            static = cache_layer is not None and cache_layer.max_cache_len is not None
            attention_mask = build_attention_mask(
                inputs.steps, key_steps, key_valid, valid, sequence_ids, key_sequence, None if static else new_columns_at
            )

        implementation = self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        if (
            implementation == "sdpa"
            and K == 1
            and (attention_mask is None or attention_mask.dtype == torch.bool)
            and query_states.device.type == "cpu"
            and B * Hk * S >= DECODE_MATMUL_MIN_KEYS
        ):
            attention_interface = grouped_decode_attention
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
        )
        attn_output = attn_output.reshape(B, K, Hq * h)
        if inputs.output_attentions and attn_weights is not None:
            total = inputs.past_length + inputs.input_length
            if cache_layer is not None and cache_layer.max_cache_len is not None:
                total = S  # the static cache: weights over all max_cache_len columns, as transformers' StaticCache
            expanded = expand_attention_weights(
                attn_weights, inputs.steps, key_steps, valid, inputs.past_length, inputs.input_length, total
            )
            if expanded is not attn_weights and S <= total:
                # Compute the output from the returned (B, H, T, total) weights, as eager attention does, so the
                # returned tensor is on the path to the loss (`retain_grad` on attentions works).
                rows = (inputs.steps - inputs.past_length).long()[:, None, :, None].expand(B, Hq, K, total)
                cols = key_steps.long()[:, None, None, :].expand(B, Hq, K, S)
                back = expanded.gather(2, rows).gather(3, cols)  # (B, Hq, K, S)
                values = repeat_kv(value_states, self.num_key_value_groups)
                attn_output = torch.matmul(back.to(values.dtype), values).transpose(1, 2).reshape(B, K, Hq * h)
            attn_weights = expanded
        return self.o_proj(attn_output), attn_weights


class HydraDecoderLayer(GradientCheckpointingLayer):
    """One HYDRA block: pre-norm CCGQA attention and a SwiGLU MLP.

    Returns the block's residual update (attention + MLP output), so the caller can add it
    densely or scatter it back gated into the tokens it was gathered from.
    """

    def __init__(self, config: HydraConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = HydraAttention(config, layer_idx)
        self.mlp = HydraMLP(config)
        self.input_layernorm = HydraRMSNorm(config.hidden_size, config.rms_norm_eps, config.kernel_backend)
        self.post_attention_layernorm = HydraRMSNorm(config.hidden_size, config.rms_norm_eps, config.kernel_backend)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, K, E)
        recursion_embedding: torch.Tensor | None = None,  # (E,) added on recursion passes of a shared block
        *,
        inputs: HydraLayerInputs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if recursion_embedding is not None:
            hidden_states = hidden_states + recursion_embedding
        attn_out, attn_weights = self.self_attn(self.input_layernorm(hidden_states), inputs=inputs)
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states + attn_out))
        return attn_out + mlp_out, attn_weights


class HydraMoEBlock(nn.Module):
    """FFN-only Mixture-of-Experts residual block; the expert choice is `routing_hydra.route_experts` (Mixtral's)."""

    def __init__(self, config: HydraConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.jitter = config.moe_router_jitter
        self.kernel_backend = config.kernel_backend
        self.norm = HydraRMSNorm(config.hidden_size, config.rms_norm_eps, config.kernel_backend)
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        inter = config.moe_intermediate_size or config.intermediate_size
        self.experts = nn.ModuleList([HydraMLP(config, inter) for _ in range(self.num_experts)])

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, E)
        *,
        state: RoutingState,
        token_valid: torch.Tensor | None = None,  # (B, T) bool real tokens
        forced: torch.Tensor | None = None,  # (B * T,) forced expert per token or -1 (`forced_experts`)
    ) -> tuple[torch.Tensor, ExpertRouting, torch.Tensor]:
        """-> (hidden states + expert output, the routing decision, router logits (B * T, X))."""
        B, T, E = hidden_states.shape
        x = self.norm(hidden_states).reshape(B * T, E)  # (N, E)
        router_in = x
        if self.training and self.jitter > 0:
            router_in = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.gate(router_input(router_in, self.gate)).float()  # (N, X)
        routing = route_experts(
            logits, self.top_k, dense=state.moe_dense, forced=forced,
            token_valid=None if token_valid is None else token_valid.reshape(-1), training=self.training,
            balance_weight=state.router_aux_loss_coef, z_weight=state.moe_z_loss_coef,
        )
        backend = resolve_backend(self.kernel_backend, x.device)
        permuted, tokens_per_expert, sorted_pairs = moe_permute(
            x, routing.expert_index, self.num_experts, backend=backend
        )  # (N*k', E), (X,), (N*k',)
        outputs = []
        start = 0
        for e, count in enumerate(tokens_per_expert.tolist()):  # the expert dispatch (a graph break under compile)
            if count:
                outputs.append(self.experts[e](permuted[start : start + count]))
            start += count
        expert_out = torch.cat(outputs, dim=0) if outputs else permuted[:0]
        y = moe_unpermute(expert_out, sorted_pairs, routing.weights.to(expert_out.dtype), backend=backend)  # (N, E)
        return hidden_states + y.view(B, T, E).to(hidden_states.dtype), routing, logits


@dataclass
class HydraModelOutput(ModelOutput):
    """Output of `HydraModel`.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Final-norm hidden states.
        past_key_values (`HydraCache`, *optional*):
            The cache to continue generation from (when `use_cache=True`).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Embeddings and the hidden states after every effective layer (when `output_hidden_states=True`).
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Attention probabilities of every effective layer, `(batch_size, num_heads, sequence_length,
            past + sequence_length)` over input positions, with zero rows and columns for tokens the layer skipped
            (routing) or never stored (padding); eager attention only (when `output_attentions=True`).
        routing (`RoutingRecord`, *optional*):
            Routing losses and statistics of this forward pass.
        router_logits (`tuple(torch.FloatTensor)`, *optional*):
            MoE router logits, one `(batch_size * sequence_length, num_local_experts)` tensor per MoE block
            (when `output_router_logits=True` and the model has MoE blocks), as in Mixtral.
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: HydraCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    routing: RoutingRecord | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class HydraCausalLMOutputWithPast(ModelOutput):
    """Output of `HydraForCausalLM`.

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*):
            Next-token cross-entropy plus `aux_loss` (when `labels` are given).
        aux_loss (`torch.FloatTensor`, *optional*):
            Sum of every enabled routing component's weighted auxiliary loss, as it is inside `loss` (only with
            `labels`; a training forward without labels attaches the routing losses to the gradient of `logits`
            instead, so a loss the caller computes from them trains the routers too, and leaves this `None`). When the
            Trainer passes `num_items_in_batch` (the cross-entropy is then a sum over the micro-batch divided by
            the item count of the whole accumulated, gathered batch), the aux loss is counted the same way, per
            item: `aux * n_items / num_items_in_batch`, so that over the accumulated batch it adds up to the
            item-weighted mean of the micro-batches' aux losses, however the batch is split. The unscaled
            per-component values are in `routing.losses`.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
            Next-token logits. `None` for a training forward with labels that used the fused linear
            cross-entropy (`config.fused_linear_cross_entropy`), which never materialises them.
        past_key_values (`HydraCache`, *optional*):
            The cache to continue generation from.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            See `HydraModelOutput`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            See `HydraModelOutput`.
        routing (`RoutingRecord`, *optional*):
            Each component's loss and statistics as tensors: MoD selected fraction per routed layer,
            MoR depth histogram per block, MoE tokens per expert and routing entropy.
        router_logits (`tuple(torch.FloatTensor)`, *optional*):
            See `HydraModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: HydraCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    routing: RoutingRecord | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


def _fp32_router_patterns(num_mod: int, num_mor: int, num_moe: int) -> list[str]:
    """`_keep_in_fp32_modules` for the routers a model has. The optional prefix lets one pattern match both at the
    root of `HydraModel` and under `model.` (bitsandbytes matches from the start of the name, the fp16 loader
    anywhere); no `*`, which the loader reads as a glob."""
    prefix = r"(?:[\w.]+\.)?"
    patterns = []
    if num_mod:
        patterns.append(prefix + r"mod_routers\.\d+")
    if num_mor:
        patterns.append(prefix + r"mor_routers\.\d+")
    if num_moe:
        patterns.append(prefix + r"moe_blocks\.\d+\.gate")
    return patterns


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _mul(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a * b


def _add_losses(record: RoutingRecord, component: str, losses: dict) -> None:
    for name, value in losses.items():
        record.add_loss(f"{component}_{name}", value)


class HydraPreTrainedModel(PreTrainedModel):
    config_class = HydraConfig
    config: HydraConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HydraDecoderLayer", "HydraMoEBlock"]
    # Routers (MoD / MoR `proj` and predictor, MoE `gate`) are tiny, some only 1 wide, and their top-k and
    # threshold decisions are precision-sensitive: bitsandbytes 4/8-bit loading never quantizes them (these patterns
    # are transformers' modules-not-to-convert), and a float16 load keeps them in float32.
    # (`HydraModel.__init__` lists the ones this config has; see `_fp32_router_patterns`.)
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _is_stateful = False
    # token-choice MoR routers of checkpoints saved before they lost their (unused) threshold buffer
    _keys_to_ignore_on_load_unexpected = [r"mor_routers\.\d+\.threshold"]

    def __init__(self, config: HydraConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        register_peft_defaults()  # PEFT's default target modules for model_type "hydra" (see peft_hydra.py)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, validating the config first: an invalid config (e.g. a field changed
        after construction) writes nothing, not even the remote-code files, and leaves an earlier save intact."""
        self.config.validate()
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        from transformers import initialization as init

        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, HydraRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, HydraAttention):
            # Convs start as the identity (last tap = 1) plus a little noise; temperature 1.
            # (init.copy_ skips parameters that were loaded from a checkpoint.)
            for seq_w in (module.q_seq_conv, module.k_seq_conv):
                value = torch.randn_like(seq_w) * std
                value[:, -1] += 1.0
                init.copy_(seq_w, value)
            for chan_w in (module.q_chan_conv, module.k_chan_conv):
                C, h, _ = chan_w.shape
                value = torch.randn_like(chan_w) * std
                value[:, :, -1] += torch.eye(h, device=chan_w.device, dtype=chan_w.dtype).repeat(C // h, 1)  # (C, h)
                init.copy_(chan_w, value)
            init.ones_(module.key_temperature)
        elif isinstance(module, HydraRotaryEmbedding):
            # Non-persistent buffers: rebuilt here because from_pretrained materialises modules from meta.
            inv_freq, _ = module.rope_init_fn(module.config, module.inv_freq.device)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
        elif isinstance(module, HydraModel):
            if module.recursion_embedding is not None:
                init.zeros_(module.recursion_embedding)
        elif isinstance(module, (ExpertChoiceRouter, TokenChoiceRouter)):
            module.reset_parameters(std)
            if isinstance(module, ExpertChoiceRouter):
                init.zeros_(module.threshold)  # running top-k boundary; a loaded value is kept


class HydraModel(HydraPreTrainedModel):
    """The HYDRA decoder stack: embeddings, blocks laid out by `build_layer_plan`, final norm.

    `forward` owns the loop over the effective layers: routers (leaves) decide, `_run_layer` computes.
    """

    def __init__(self, config: HydraConfig):
        super().__init__(config)
        check_kernel_backend(config)  # "triton" with sizes outside ops_hydra.TRITON_LIMITS raises, naming the field
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        config.check_hydra_fields()  # fields changed after the config was built (e.g. PEFT's shadow adapters)
        self.plan: list[LayerPlan] = build_layer_plan(config)
        self.layers = nn.ModuleList([HydraDecoderLayer(config, i) for i in range(config.num_unique_blocks)])
        self.recursion_embedding = (
            nn.Parameter(torch.zeros(config.mor_recursions, config.hidden_size)) if config.mor_recursions > 1 else None
        )
        num_mod = sum(p.mod_router is not None for p in self.plan)
        num_mor = max([p.mor_router for p in self.plan if p.mor_router is not None], default=-1) + 1
        num_moe = sum(p.moe_block is not None for p in self.plan)
        self.mod_routers = nn.ModuleList([MoDRouter(config) for _ in range(num_mod)])
        self.mor_routers = nn.ModuleList([MoRRouter(config) for _ in range(num_mor)])
        self.moe_blocks = nn.ModuleList([HydraMoEBlock(config) for _ in range(num_moe)])
        self.norm = HydraRMSNorm(config.hidden_size, config.rms_norm_eps, config.kernel_backend)
        self.rotary_emb = HydraRotaryEmbedding(config)
        self.routing_state = RoutingState.from_config(config)
        self.num_recursion_groups = num_recursion_groups(self.plan)
        self._keep_in_fp32_modules = _fp32_router_patterns(num_mod, num_mor, num_moe)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @staticmethod
    def _default_position_ids(attention_mask: torch.Tensor | None, steps: torch.Tensor) -> torch.Tensor:
        """Positions of the tokens at `steps` (B, T): the step itself, or with a padding mask the count of real tokens
        before it (left padding: real tokens count from 0, the usual HF convention)."""
        if attention_mask is None:
            return steps
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        return positions.gather(1, steps.clamp(max=attention_mask.shape[1] - 1))

    def _run_layer(
        self,
        layer: HydraDecoderLayer,
        hidden_states: torch.Tensor,  # (B, T, E)
        inputs: HydraLayerInputs,  # for all T tokens of this forward
        *,
        active: torch.Tensor | None,  # (B, T) bool tokens this layer processes; None = all
        index: torch.Tensor | None,  # (B, k) the same tokens as indices when every row keeps k (static shape)
        gate: torch.Tensor | None,  # (B, T) multiplier of the update; None = 1
        recursion_embedding: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Run `layer` on the active tokens only and add its gated update back.

        Returns the new hidden states, the attention weights and the number of token slots the layer ran on
        (B * K), which the routing statistics and the FLOP tests read.
        """
        B, T, _ = hidden_states.shape
        if active is not None and T == 1 and inputs.cache_layer is not None and inputs.cache_layer.max_cache_len is not None:
            # Decode step on the static cache: fixed shapes for torch.compile. Every row computes its token; a row
            # whose token is skipped (routing) or padding adds nothing, stores an invalid column and keeps its
            # rolling state.
            gate = _mul(gate, active.to(hidden_states.dtype))
            inputs = replace(inputs, token_valid=active)
            active, index = None, None
        if self.config.static_routing and active is not None:
            # Fixed shapes: every real token is computed, unselected ones get weight 0 and are hidden as keys.
            gate = _mul(gate, active.to(hidden_states.dtype))
            inputs = replace(inputs, key_visible=active)
            active, index = inputs.token_valid, None
        processed = B * T
        if active is not None and T == 1:
            # One token per row (decoding): the compact sequence would be that token for the rows that process it.
            # Skip the layer when no row does; otherwise run it in place, rows that skip it adding nothing.
            selected_rows = int(active[:, 0].sum())
            if selected_rows == 0:
                return hidden_states, self._no_attention(hidden_states, inputs), 0
            if selected_rows < B:  # every row's token is computed (B slots), as the compact path would
                gate = _mul(gate, active.to(hidden_states.dtype))
                inputs = replace(inputs, token_valid=active)
            active, index = None, None
        if active is None:
            update, attn = layer(hidden_states, recursion_embedding, inputs=inputs)
            if gate is not None:
                update = update * gate.unsqueeze(-1).to(update.dtype)
            return hidden_states + update, attn, processed

        valid = None
        if index is None:
            index, valid = compact_selection(active)  # (B, K), (B, K)
            if index.shape[1] == 0:
                return hidden_states, self._no_attention(hidden_states, inputs), 0
            if bool(valid.all()):
                valid = None
        backend = resolve_backend(self.config.kernel_backend, hidden_states.device)
        x = gather_tokens(hidden_states, index, backend=backend)  # (B, K, E)
        cos, sin = inputs.position_embeddings
        r_index = index.unsqueeze(-1).expand(-1, -1, cos.shape[-1])  # (B, K, r)
        compact = replace(
            inputs,
            cache_all_steps=active is inputs.token_valid,
            position_embeddings=(torch.gather(cos, 1, r_index), torch.gather(sin, 1, r_index)),
            steps=torch.gather(inputs.steps, 1, index),
            token_valid=valid,
            sequence_ids=None if inputs.sequence_ids is None else torch.gather(inputs.sequence_ids, 1, index),
            key_visible=None if inputs.key_visible is None else torch.gather(inputs.key_visible, 1, index),
        )
        update, attn = layer(x, recursion_embedding, inputs=compact)
        scale = None if valid is None else valid.to(update.dtype)
        if gate is not None:
            scale = _mul(scale, torch.gather(gate, 1, index).to(update.dtype))
        hidden_states = scatter_gated_add(hidden_states, update, index, scale, backend=backend)
        return hidden_states, attn, B * index.shape[1]

    def _no_attention(self, hidden_states: torch.Tensor, inputs: HydraLayerInputs) -> torch.Tensor | None:
        """The attentions of a layer that processed no token: zeros (when attentions are asked for)."""
        if not inputs.output_attentions:
            return None
        B, T = hidden_states.shape[:2]
        return hidden_states.new_zeros(B, self.config.num_attention_heads, T, inputs.past_length + T)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HydraCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        domain_labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        attach_routing_loss: bool | None = None,
        **kwargs,
    ) -> HydraModelOutput | tuple:
        r"""
        position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Positions of the tokens (RoPE). Positions that restart inside a row (not the previous real token's + 1)
            start a new packed sequence, as `DataCollatorWithFlattening` and TRL's `padding_free` make them: packed
            sequences never see each other (attention, convolutions, value shift) and routing picks its top-k per
            sequence, so a padding-free batch gives the logits of the padded batch.
        output_router_logits (`bool`, *optional*):
            Return the MoE router logits (`router_logits`, one `(batch * seq_len, num_local_experts)` tensor per MoE
            block), as Mixtral does. Defaults to `config.output_router_logits`.
        attach_routing_loss (`bool`, *optional*):
            Whether the routing auxiliary losses of a training forward are attached to the gradient of
            `last_hidden_state` (see `attach_aux_loss`). `None` (default) attaches them in training mode with
            gradients enabled: `HydraModel` called directly is a backbone under someone else's LM head and loss
            (e.g. TRL's fused LM head), and attaching is the only way its routers still get their losses.
            `HydraForCausalLM` passes `False`: it adds the losses to its own `loss`.
        """
        config, state = self.config, self.routing_state
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_router_logits = output_router_logits if output_router_logits is not None else config.output_router_logits
        return_dict = return_dict if return_dict is not None else config.return_dict
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        if past_key_values is not None and not isinstance(past_key_values, HydraCacheMixin):
            if past_key_values.get_seq_length() == 0:
                past_key_values = None  # an empty cache of another type (e.g. made by a caller): replace it
            else:
                raise ValueError(
                    f"past_key_values must be a HydraCache, got a {type(past_key_values).__name__} holding "
                    f"{past_key_values.get_seq_length()} positions. HYDRA caches latent, post-convolution keys per "
                    "routed layer, so standard key/value prefixes cannot be injected: PEFT's prefix tuning is not "
                    "supported for HYDRA (use LoRA, IA3 or prompt tuning, which work on inputs_embeds)"
                )
        if input_ids is not None and input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T, _ = inputs_embeds.shape
        if use_cache and past_key_values is None:
            past_key_values = HydraCache(config)
        cache = past_key_values if use_cache else None
        if isinstance(cache, HydraStaticCache):
            # The step count stays a tensor: a compiled decode step reads no Python state that changes per step.
            cache.place(inputs_embeds.device)
            past_len = cache.step_counter
            if not torch.compiler.is_compiling() and int(past_len) + T > cache.max_cache_len:
                raise ValueError(
                    f"The HydraStaticCache holds max_cache_len={cache.max_cache_len} positions; {int(past_len)} are "
                    f"used and {T} more were given. Build it with a larger max_cache_len (generate: max_new_tokens)."
                )
            if output_attentions:
                past_len = int(past_len)
        else:
            past_len = cache.get_seq_length() if cache is not None else 0

        token_valid = None
        if attention_mask is not None:
            if attention_mask.ndim != 2:
                raise ValueError(
                    f"attention_mask must be a 2D (batch, past + seq_len) padding mask, got {attention_mask.ndim}D. "
                    "HYDRA builds its attention masks itself (routing decides per layer which tokens exist, and the "
                    "causal convolutions and value shift read the previous token in sequence order), so custom 4D "
                    "masks (e.g. tree attention) cannot be honoured; for packed sequences pass position_ids that "
                    "restart at 0 for each sequence"
                )
            if attention_mask.shape[1] < T:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} positions but the input has {T} new tokens"
                )
            if isinstance(cache, HydraStaticCache):  # generate pads the mask to max_cache_len (fixed shape)
                idx = (torch.arange(T, device=attention_mask.device) + past_len).clamp(max=attention_mask.shape[1] - 1)
                token_valid = attention_mask.gather(1, idx.unsqueeze(0).expand(B, -1)).bool()
            else:
                token_valid = attention_mask[:, -T:].bool()
            static_decode = T == 1 and cache is not None and cache.max_cache_len is not None
            if not static_decode and bool(token_valid.all()):  # (a static-cache decode step never syncs)
                token_valid = None
        sequence_ids = None
        steps = (torch.arange(T, device=inputs_embeds.device) + past_len).unsqueeze(0).expand(B, -1)  # (B, T)
        if position_ids is None:
            position_ids = self._default_position_ids(attention_mask, steps)
        else:
            if position_ids.ndim == 1:
                position_ids = position_ids.unsqueeze(0)
            position_ids = position_ids.expand(B, -1)
            sequence_ids = sequence_ids_from_positions(position_ids, token_valid)
            if sequence_ids is not None and cache is not None and cache.max_cache_len is not None:
                raise ValueError("packed sequences (position_ids restarting inside a row) need the dynamic HydraCache")

        hidden_states = inputs_embeds
        inputs = HydraLayerInputs(
            position_embeddings=self.rotary_emb(hidden_states, position_ids),  # computed once for every layer
            steps=steps,
            token_valid=token_valid,
            sequence_ids=sequence_ids,
            past_length=past_len,
            input_length=T,
            output_attentions=output_attentions,
        )
        forced = None
        if state.moe_forced is not None and domain_labels is not None and len(self.moe_blocks):
            forced = forced_experts(state.moe_forced, domain_labels.to(hidden_states.device), T)

        record = RoutingRecord()
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        router_logits = ()
        # Exact candidates per row while no padding / packing makes rows differ: expert-choice top-k then has a
        # static size k and the layer gathers with its indices (no data-dependent shape: the training step compiles).
        full_count = T if token_valid is None and sequence_ids is None else None
        R = config.mor_recursions
        bce_weight = state.mod_aux_weight(config) if (self.mod_routers or self.mor_routers) else 0.0
        mod_loss_weights = {"bce": bce_weight}
        mor_loss_weights = {
            "bce": bce_weight, "ponder": state.mor_ponder_loss_coef, "z": state.mor_z_loss_coef,
            "balance": state.mor_balance_loss_coef,
        }
        for plan in self.plan:
            if plan.group < 0 or plan.group_start:
                # A new recursion group (or an unshared layer): every token starts active again.
                mor_active = mor_index = mor_gate = depth = None
                mor_count = full_count
                depth_count = torch.zeros_like(steps) if (config.mor_enabled and plan.group >= 0) else None

            if plan.mor_router is not None:
                out = self.mor_routers[plan.mor_router](
                    hidden_states,
                    RouterInputs(
                        candidates=_and(mor_active, token_valid),
                        token_valid=token_valid,
                        sequence_ids=sequence_ids,
                        candidate_count=mor_count,
                        capacity=mor_layer_capacity(state.mor_capacity, plan.group, self.num_recursion_groups, plan.recursion),
                        routing_on=state.mor_enabled,
                        loss_weights=mor_loss_weights,
                    ),
                )
                mor_gate = out.gate
                if out.depth is not None:  # token choice: every token's depth, decided up front
                    depth = out.depth
                elif out.selected is not None:  # expert choice: the tokens that continue
                    mor_active, mor_index = out.selected, out.index
                    mor_count = None if out.index is None else out.index.shape[1]
                _add_losses(record, "mor", out.losses)

            if depth is not None:  # token choice: depth decided up front
                layer_active, layer_index, layer_count = depth > plan.recursion, None, None
            else:
                layer_active, layer_index, layer_count = mor_active, mor_index, mor_count
            layer_gate = mor_gate if plan.recursion >= 1 else None
            if plan.recursion_start and depth_count is not None:
                depth_count = depth_count + (1 if layer_active is None else layer_active.long())
            candidates = _and(layer_active, token_valid)

            if plan.mod_router is not None:
                out = self.mod_routers[plan.mod_router](
                    hidden_states,
                    RouterInputs(
                        candidates=candidates,
                        token_valid=token_valid,
                        sequence_ids=sequence_ids,
                        candidate_count=layer_count,
                        capacity=state.mod_capacity,
                        routing_on=state.mod_enabled,
                        loss_weights=mod_loss_weights,
                    ),
                )
                _add_losses(record, "mod", out.losses)
                if out.selected is not None:
                    n_candidates = candidates.sum() if candidates is not None else torch.tensor(float(B * T))
                    record.mod_selected_fraction[plan.index] = (
                        out.selected.sum().float() / n_candidates.clamp_min(1)
                    ).detach()
                    candidates, layer_index, layer_gate = out.selected, out.index, _mul(layer_gate, out.gate)

            cache_layer = cache.layers[plan.index] if cache is not None else None
            hidden_states, attn, processed = self._run_layer(
                self.layers[plan.block],
                hidden_states,
                replace(inputs, cache_layer=cache_layer) if cache_layer is not None else inputs,
                active=candidates,
                index=layer_index,
                gate=layer_gate,
                recursion_embedding=None if self.recursion_embedding is None else self.recursion_embedding[plan.recursion],
            )
            record.tokens_processed[plan.index] = processed
            if output_attentions:
                all_attn += (attn,)

            if plan.group_end and depth_count is not None:
                real = token_valid if token_valid is not None else torch.ones_like(depth_count, dtype=torch.bool)
                depths = torch.arange(1, R + 1, device=depth_count.device)
                record.mor_depth_histogram[plan.group] = (
                    ((depth_count.unsqueeze(-1) == depths) & real.unsqueeze(-1)).sum(dim=(0, 1))
                )  # (R,) tokens by final depth

            if plan.moe_block is not None:
                hidden_states, expert_routing, logits = self.moe_blocks[plan.moe_block](
                    hidden_states, state=state, token_valid=token_valid, forced=forced
                )
                _add_losses(record, "moe", expert_routing.losses)
                record.moe_tokens_per_expert[plan.moe_block] = expert_routing.tokens_per_expert
                record.moe_entropy[plan.moe_block] = expert_routing.entropy
                router_logits += (logits,)
            if output_hidden_states:
                all_hidden += (hidden_states,)

        hidden_states = self.norm(hidden_states)
        if cache is not None:
            cache.advance(T)
        self.last_routing = record  # the latest forward's record, for `routing_summary()` and logging callbacks

        if attach_routing_loss is None:
            attach_routing_loss = self.training and torch.is_grad_enabled()
        if attach_routing_loss:
            # A caller that asks for the router logits computes the MoE load-balancing loss from them (the Mixtral
            # contract, followed by TRL), so that one term is left to it.
            skip = ("moe_balance",) if output_router_logits else ()
            aux = record.total_loss(exclude=skip)
            if aux is not None and aux.requires_grad:
                hidden_states = attach_aux_loss(hidden_states, aux, state.attached_aux_loss_scale)
        output = HydraModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=cache,
            hidden_states=all_hidden,
            attentions=all_attn,
            routing=record,
            router_logits=router_logits if output_router_logits and router_logits else None,
        )
        return output if return_dict else output.to_tuple()


class HydraForCausalLM(HydraPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HydraConfig):
        super().__init__(config)
        self.model = HydraModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # a tied lm_head is never saved; listing it lets the Trainer's resume re-tie it quietly instead of
        # warning "There were missing keys in the checkpoint model loaded: ['lm_head.weight']"
        self._keys_to_ignore_on_save = set(self._keys_to_ignore_on_save or ()) | set(self.all_tied_weights_keys)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    # ------------------------------------------------------------------ routing controls
    @property
    def routing_state(self) -> RoutingState:
        """Run-time routing switches and capacities (what the curriculum callbacks change)."""
        return self.model.routing_state

    def set_routing(self, **changes) -> RoutingState:
        """Switch routing components on/off or change capacities without rebuilding the model.

        Keys: `mod_enabled`, `mod_capacity`, `mor_enabled`, `mor_capacity`, `moe_dense`,
        `moe_forced`, `mod_aux_loss_coef`, `mor_ponder_loss_coef`, `router_aux_loss_coef`,
        `moe_z_loss_coef`. See `RoutingState`.
        """
        self.model.routing_state.update(self.config, **changes)
        return self.model.routing_state

    def routing_summary(self, record: RoutingRecord | None = None) -> dict:
        """The last forward's routing losses and statistics as plain Python numbers."""
        record = record if record is not None else getattr(self.model, "last_routing", None)
        return {} if record is None else record.summary()

    # ------------------------------------------------------------------ generation
    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """`generate()` builds the cache here: a `HydraCache`, or a `HydraStaticCache` for `cache_implementation="static"`.

        A user-passed cache is used as is. An assistant (draft) model's cache records its rolling states so that
        `crop` can undo the rejected draft tokens.
        """
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            # a user-passed cache (transformers checks it against `cache_implementation`) or no cache at all
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        implementation = generation_config.cache_implementation
        if implementation in (None, "dynamic"):
            cache = HydraCache(self.config)
        elif implementation == "static":
            max_len = max(max_cache_length, generation_config.max_cache_len or 0)
            cache = HydraStaticCache(self.config, max_cache_len=max_len)
        else:
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by HYDRA: use None / 'dynamic' (HydraCache) "
                "or 'static' (HydraStaticCache, preallocated to max_length)"
            )
        if generation_config.is_assistant:
            cache.activate_past_recording()
        model_kwargs["past_key_values"] = cache

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, past_key_values, **kwargs):
        """`generate()` turns the 2D padding mask into 4D masks for compileable caches; HYDRA builds its own masks
        from the 2D padding mask (routing decides per layer which columns exist), so it keeps the 2D mask, padded
        to `max_cache_len` for the static cache so that its shape is the same at every decode step."""
        if attention_mask is not None and attention_mask.ndim == 2 and isinstance(past_key_values, HydraStaticCache):
            missing = past_key_values.max_cache_len - attention_mask.shape[1]
            if missing > 0:
                attention_mask = F.pad(attention_mask, (0, missing), value=0)
        return attention_mask

    # ------------------------------------------------------------------ loss
    def _use_fused_linear_cross_entropy(self, hidden_states: torch.Tensor) -> bool:
        """Fused lm_head + CE only for training losses; `None` in the config = only where it is really fused."""
        setting = self.config.fused_linear_cross_entropy
        if not self.training or setting is False:
            return False
        if setting is True:
            return True
        return linear_cross_entropy_is_fused(self.config.kernel_backend, hidden_states, self.lm_head.weight)

    def _fused_causal_lm_loss(
        self,
        hidden_states: torch.Tensor,  # (B, T, E)
        labels: torch.LongTensor,  # (B, T)
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Next-token CE exactly as transformers' `ForCausalLMLoss` (shift, ignore -100, mean or sum / items)."""
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, T)
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # (B*T, E)
        targets = shift_labels.reshape(-1).to(hidden.device)  # (B*T,)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = fused_linear_cross_entropy(
            hidden, self.lm_head.weight, targets, ignore_index, self.config.kernel_backend, reduction
        )
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    @staticmethod
    def _aux_loss_per_item(
        aux_loss: torch.Tensor,
        labels: torch.LongTensor,  # (B, T)
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.LongTensor | None = None,
        ignore_index: int = -100,
        **kwargs,
    ) -> torch.Tensor:
        """The routing aux loss as it goes into `loss`, in the units of the cross-entropy.

        Without `num_items_in_batch` the cross-entropy is this micro-batch's mean, and so is the aux loss. With it,
        the cross-entropy is this micro-batch's sum divided by the item count N of the whole accumulated (and, across
        processes, gathered) batch, and the Trainer neither divides by the accumulation steps nor averages the
        processes' losses (DDP averages gradients, the Trainer multiplies the loss by the process count). Counting
        the aux loss per item, `aux * n / N` with n this micro-batch's items, makes the accumulated, all-reduced
        total the item-weighted mean of the micro-batches' aux losses: the same for 1 x 8, 2 x 4 or 2 processes x 4.
        Items are counted as the Trainer counts them: `shift_labels` if given, else `labels[..., 1:]`, not -100.
        """
        if num_items_in_batch is None:
            return aux_loss
        targets = shift_labels if shift_labels is not None else labels[..., 1:]
        n_items = (targets != ignore_index).sum().to(aux_loss.device, aux_loss.dtype)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(aux_loss.device, aux_loss.dtype)
        return aux_loss * n_items / num_items_in_batch

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HydraCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        domain_labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> HydraCausalLMOutputWithPast | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for next-token prediction (shifted inside, -100 = ignored). When given, `loss` is the
            cross-entropy plus every enabled routing component's weighted auxiliary loss. Without labels, a
            training forward attaches the routing losses to the gradient of `logits` (see `attach_aux_loss`).
        domain_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Per-example domain ids used by MoE forced routing (`set_routing(moe_forced=...)`).
        output_router_logits (`bool`, *optional*):
            Also return the MoE router logits (`router_logits`), as Mixtral does.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*, in `kwargs`):
            Passed by the `Trainer`: the number of label items of the whole accumulated (and gathered) batch. The
            cross-entropy is then a sum divided by it, and the routing aux loss is counted per item too
            (see `aux_loss` in `HydraCausalLMOutputWithPast`).

        Example:

        ```python
        >>> import hydra_hf
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_config(hydra_hf.HydraConfig.from_preset("debug", vocab_size=256))
        >>> out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5)
        ```"""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            domain_labels=domain_labels,
            output_router_logits=output_router_logits,
            return_dict=True,
            # With labels the routing losses go into `loss` below; without, whatever loss the caller computes from
            # the logits back-propagates into them (see `HydraModel.forward`).
            attach_routing_loss=False if labels is not None else None,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, E)
        record = outputs.routing
        aux_loss = record.total_loss() if labels is not None else None

        logits, loss = None, None
        if labels is not None and self._use_fused_linear_cross_entropy(hidden_states):
            # lm_head + cross-entropy in one op: the (B*T, V) logits never exist (Liger on CUDA)
            loss = self._fused_causal_lm_loss(hidden_states, labels, **kwargs)
        else:
            slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, slice_indices, :])  # (B, T', V)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if loss is not None and aux_loss is not None:
            aux_loss = self._aux_loss_per_item(aux_loss.to(loss.device), labels, **kwargs)
            loss = loss + aux_loss

        output = HydraCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            routing=record,
            router_logits=outputs.router_logits,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["HydraPreTrainedModel", "HydraModel", "HydraForCausalLM", "HydraCausalLMOutputWithPast", "HydraModelOutput"]
