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
import inspect
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .cache_hydra import HydraCache, HydraCacheMixin, HydraStaticCache
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
    LayerSelection,
    RoutingPass,
    RoutingRecord,
    RoutingState,
    TokenChoiceRouter,
    attach_aux_loss,
    build_layer_plan,
    build_router,
    num_recursion_groups,
    route_experts,
    router_input,
    sequence_ids_from_positions,
)

logger = logging.get_logger(__name__)

# The keyword under which `generate()` keeps the cache in its model kwargs and passes it to `forward`: `cache` from
# transformers 5.24 on, `past_key_values` before. HYDRA's forwards take both.
GENERATE_CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"
)


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


@dataclass(frozen=True)
class HydraTokens:
    """The (B, K) tokens one effective layer runs on: the forward's token facts, gathered for its `LayerSelection`.

    Made by `HydraModel` for each layer and passed down to attention, which reads it and never changes it.
    """

    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin (B, K, r)
    steps: torch.Tensor  # (B, K) index of each token in the input stream (past + t): causality and the cache
    slot_valid: torch.Tensor | None = None  # (B, K) bool slots whose token is processed, valid first; None = all
    sequence_ids: torch.Tensor | None = None  # (B, K) packed-sequence id; None = one sequence per row
    key_visible: torch.Tensor | None = None  # (B, K) bool keys the others may attend to (static routing); None = all
    past_length: int | torch.Tensor = 0  # input steps before this forward (a 0-dim tensor on the static cache)
    input_length: int = 0  # T, input steps of this forward
    every_step: bool = True  # the K tokens are the forward's T steps in order (in place), not a gathered subset
    cache_every_step: bool = True  # a gathered layer that left out only padding: the cache keeps a column per step
    output_attentions: bool = False  # return weights over input positions (B, H, T, past + T)

    @property
    def key_valid(self) -> torch.Tensor | None:
        """(B, K) new keys that may be attended to: processed slots that are not hidden."""
        if self.key_visible is None:
            return self.slot_valid
        return self.key_visible if self.slot_valid is None else self.slot_valid & self.key_visible


class HydraCCAProjection(nn.Module):
    """The CCGQA projection (arXiv 2510.04476): hidden states -> latent query, key and value heads.

    Queries and keys are down-projected to latent heads (width E/C), their q-k mean kept, mixed over time by causal
    convolutions (a depthwise sequence conv, then a channel conv grouped per head), the mean added back,
    L2-normalised with a learnable per-KV-head key temperature and rotated (partial RoPE). Values are latent too; the
    last `num_value_shift_heads` KV heads take the previous processed token's values (the value shift). The conv and
    value-shift history of a cached decode lives in the cache layer's rolling state.

    `HydraAttention` is this projection plus the attention call; the parameters keep their flat names
    (`self_attn.q_proj`, `self_attn.q_seq_conv`, ...) so every saved checkpoint and PEFT adapter loads unchanged.
    """

    def __init__(self, config: HydraConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.latent_head_dim
        self.num_shift_heads = config.num_value_shift_heads
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
        # Causal convs on latent q and k: depthwise over time, then grouped per head.
        self.q_seq_conv = nn.Parameter(torch.empty(q_width, self.seq_kernel))  # (C, Ks)
        self.k_seq_conv = nn.Parameter(torch.empty(kv_width, self.seq_kernel))
        self.q_chan_conv = nn.Parameter(torch.empty(q_width, self.head_dim, self.chan_kernel))  # (C, h, Kc)
        self.k_chan_conv = nn.Parameter(torch.empty(kv_width, self.head_dim, self.chan_kernel))
        self.key_temperature = nn.Parameter(torch.ones(self.num_key_value_heads))  # (Hk,)

    def project(
        self,
        hidden_states: torch.Tensor,  # (B, K, E) normalised block input
        tokens: HydraTokens,
        cache_layer=None,  # the layer's cache slot: reads and advances its rolling conv / value-shift state
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> query (B, Hq, K, h), key (B, Hk, K, h), value (B, Hk, K, h), post-norm and RoPE."""
        B, K, _ = hidden_states.shape
        Hq, Hk, h, Hs = self.num_heads, self.num_key_value_heads, self.head_dim, self.num_shift_heads
        backend = resolve_backend(self.kernel_backend, hidden_states.device)
        sequence_ids = tokens.sequence_ids

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
            columns = qk if shift_source is None else torch.cat([qk, shift_source], dim=-1)
            counts = None if tokens.slot_valid is None else tokens.slot_valid.sum(dim=1)  # (B,)
            cache_layer.update_rolling_state(columns, tokens.steps, counts)

        cos, sin = tokens.position_embeddings
        q_out, k_out = qk_norm_rope(
            q_conv.view(B, K, Hq, h), k_conv.view(B, K, Hk, h), q_mean, k_mean, self.key_temperature,
            cos, sin, backend=backend,
        )
        return q_out.transpose(1, 2), k_out.transpose(1, 2), v.transpose(1, 2)


class HydraAttention(HydraCCAProjection):
    """Compressed Convolutional Grouped-Query Attention (CCGQA): the `HydraCCAProjection`, causal GQA in the latent
    space through transformers' attention interface, and the up-projection Hq*h -> E."""

    def __init__(self, config: HydraConfig, layer_idx: int):
        super().__init__(config)
        self.config = config
        self.layer_idx = layer_idx
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, K, E) normalised block input
        *,
        tokens: HydraTokens,
        cache: HydraCache | HydraStaticCache | None = None,
        cache_index: int | None = None,  # the effective layer: its cache slot (a shared block has one per pass)
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, K, _ = hidden_states.shape
        cache_layer = cache.layers[cache_index] if cache is not None else None
        query, key, value = self.project(hidden_states, tokens, cache_layer)  # (B, Hq|Hk, K, h)
        key, value, column_steps, key_valid, new_columns_at = self._store(key, value, tokens, cache, cache_index)
        S = key.shape[2]
        key_steps = None  # (B, S) step of each key column, built only when a mask or the weights need it

        attention_mask = None
        need_mask = key_valid is not None or tokens.slot_valid is not None or tokens.sequence_ids is not None
        if need_mask or (K > 1 and S != K):
            key_sequence = tokens.sequence_ids
            if key_sequence is not None and S != K:  # cached columns continue the row's first sequence
                key_sequence = F.pad(key_sequence, (S - K, 0), value=0)
            key_steps = column_steps()
            attention_mask = build_attention_mask(
                tokens.steps, key_steps, key_valid, tokens.slot_valid, tokens.sequence_ids, key_sequence, new_columns_at
            )

        implementation = self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        if K == 1 and implementation == "sdpa" and not tokens.output_attentions and (
            # an exported decode step always takes the grouped matmuls: no branch on the (dynamic) batch size
            torch.compiler.is_exporting()
            or (query.device.type == "cpu" and B * self.num_key_value_heads * S >= DECODE_MATMUL_MIN_KEYS)
        ):
            attention_interface = grouped_decode_attention
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
        )
        attn_output = attn_output.reshape(B, K, -1)  # (B, K, Hq*h)
        if tokens.output_attentions and attn_weights is not None:
            key_steps = key_steps if key_steps is not None else column_steps()
            attn_output, attn_weights = self._weights_over_inputs(attn_weights, value, tokens, key_steps, attn_output)
        return self.o_proj(attn_output), attn_weights

    def _store(
        self,
        key: torch.Tensor,  # (B, Hk, K, h)
        value: torch.Tensor,  # (B, Hk, K, h)
        tokens: HydraTokens,
        cache: HydraCache | HydraStaticCache | None,
        cache_index: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor], torch.Tensor | None, int | None]:
        """Write the new keys/values to the cache as the selection says; -> every key and value the queries may
        see, a function giving each column's step (B, S), the columns' validity (B, S) or None, and where this
        forward's columns start (None: the static layout, where column = step)."""
        key_valid = tokens.key_valid
        if cache is None:
            return key, value, lambda: tokens.steps, key_valid, 0
        B, Hk, K, h = key.shape
        T, past = tokens.input_length, tokens.past_length
        steps: torch.Tensor | int = tokens.steps
        static = isinstance(cache, HydraStaticCache)
        if tokens.every_step and isinstance(past, int):
            steps = past  # the forward's steps in order: a dense layer keeps its steps implicit
        elif not tokens.every_step and tokens.cache_every_step and tokens.sequence_ids is None and not static:
            # Only padding was left out: cache one column per input step (padding invalid), as Llama does (also
            # when some row kept every token, K = T: the layout never depends on the data).
            cols = (tokens.steps - past).long()  # (B, K) unique per row
            spread = cols[:, None, :, None].expand(B, Hk, K, h)
            if key_valid is not None:  # an invalid column holds zeros, whichever slot computed it (no data in it)
                zero = ~key_valid[:, None, :, None]
                key, value = key.masked_fill(zero, 0.0), value.masked_fill(zero, 0.0)
            key = key.new_zeros(B, Hk, T, h).scatter(2, spread, key)
            value = value.new_zeros(B, Hk, T, h).scatter(2, spread, value)
            kept = key_valid if key_valid is not None else torch.ones_like(cols, dtype=torch.bool)
            key_valid = torch.zeros(B, T, dtype=torch.bool, device=cols.device).scatter(1, cols, kept)
            steps = past
        keys, values = cache.update(key, value, cache_index, steps=steps, valid=key_valid)
        layer = cache.layers[cache_index]
        new_columns_at = None if static else keys.shape[2] - key.shape[2]
        return keys, values, layer.column_steps, layer.column_valid(), new_columns_at

    def _weights_over_inputs(self, attn_weights, value, tokens: HydraTokens, key_steps, attn_output):
        """Attention weights over input positions (B, H, T, past + T), zeros where a token was skipped; the output
        is recomputed from the returned weights, as eager attention does, so `retain_grad` on them works."""
        B, K = tokens.steps.shape
        S = key_steps.shape[1]
        past = tokens.past_length if isinstance(tokens.past_length, int) else int(tokens.past_length)
        total = past + tokens.input_length
        if not isinstance(tokens.past_length, int):
            total = S  # the static cache: weights over all max_cache_len columns, as transformers' StaticCache
        expanded = expand_attention_weights(
            attn_weights, tokens.steps, key_steps, tokens.slot_valid, past, tokens.input_length, total
        )
        if expanded is not attn_weights and S <= total:
            Hq = attn_weights.shape[1]
            rows = (tokens.steps - past).long()[:, None, :, None].expand(B, Hq, K, total)
            cols = key_steps.long()[:, None, None, :].expand(B, Hq, K, S)
            back = expanded.gather(2, rows).gather(3, cols)  # (B, Hq, K, S)
            values = repeat_kv(value, self.num_key_value_groups)
            attn_output = torch.matmul(back.to(values.dtype), values).transpose(1, 2).reshape(B, K, -1)
        return attn_output, expanded


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
        tokens: HydraTokens,
        cache: HydraCache | HydraStaticCache | None = None,
        cache_index: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if recursion_embedding is not None:
            hidden_states = hidden_states + recursion_embedding
        attn_out, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states), tokens=tokens, cache=cache, cache_index=cache_index
        )
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


class _CacheNameAlias:
    """`cache` is the output field (transformers >= 5.24 names it so); `past_key_values`, its name before, reads and
    writes the same field on every supported version, as an attribute and as a key (what `generate()` of transformers
    5.20-5.23 looks up), without a deprecation warning."""

    @staticmethod
    def _field_name(key):
        return "cache" if key == "past_key_values" else key

    @property
    def past_key_values(self):
        return self.cache

    @past_key_values.setter
    def past_key_values(self, value):
        self.cache = value

    def __getitem__(self, key):
        return super().__getitem__(self._field_name(key) if isinstance(key, str) else key)

    def __contains__(self, key):
        return super().__contains__(self._field_name(key))

    def get(self, key, default=None):
        return super().get(self._field_name(key), default)


@dataclass
class HydraModelOutput(_CacheNameAlias, ModelOutput):
    """Output of `HydraModel`.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Final-norm hidden states.
        cache (`HydraCache`, *optional*):
            The cache to continue generation from (when `use_cache=True`); also readable as `past_key_values`.
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
    cache: HydraCache | HydraStaticCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    routing: RoutingRecord | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class HydraCausalLMOutputWithPast(_CacheNameAlias, ModelOutput):
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
        cache (`HydraCache`, *optional*):
            The cache to continue generation from; also readable as `past_key_values`.
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
    cache: HydraCache | HydraStaticCache | None = None
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


# bitsandbytes (0.50) runs a 4-bit layer's eval-mode, no-grad CPU forward (on CPUs with AVX512-BF16) on a repacked
# weight (`bitsandbytes.functional._convert_weight_packed_for_cpu`, called by `Linear4bit.forward`): its out_features
# must be a multiple of the packing block (32; else "AssertionError: N must be divisible by block_n") and its
# in_features of the 4-bit quantization block (64, the size transformers' BitsAndBytesConfig always uses; else the
# per-block scales cannot be reshaped to (out, in / 64): "RuntimeError: shape '[N, 0]' is invalid ..."). Checked
# for every out in 8..128 and in 16..320 in tests/test_finetuning.py. HYDRA's latent projections are narrow
# (hidden / compression_factor), so a small model has such layers; they are kept unquantized (in the load dtype).
BNB_4BIT_CPU_OUT_MULTIPLE = 32
BNB_4BIT_CPU_IN_MULTIPLE = 64


def bnb_4bit_cpu_supported(layer: nn.Linear) -> bool:
    """Whether bitsandbytes' 4-bit CPU inference path can run this `Linear` once quantized (see above)."""
    return layer.out_features % BNB_4BIT_CPU_OUT_MULTIPLE == 0 and layer.in_features % BNB_4BIT_CPU_IN_MULTIPLE == 0


def _not_4bit_quantizable_patterns(modules) -> list[str]:
    """Module-name patterns (the router patterns' form) of the `nn.Linear`s in `modules` ((name, module) pairs) that
    bitsandbytes' 4-bit CPU path cannot run."""
    return [
        r"(?:[\w.]+\.)?" + re.escape(name)
        for name, module in modules
        if type(module) is nn.Linear and not bnb_4bit_cpu_supported(module)
    ]


def cache_argument(cache, past_key_values):
    """The cache passed as `cache` (transformers >= 5.24) or as `past_key_values` (the name before): one of them.

    A non-HYDRA cache that already holds positions (PEFT's prefix tuning injects one) is refused first, with the
    reason, whichever name it came under."""
    for given in (cache, past_key_values):
        if given is not None and not isinstance(given, HydraCacheMixin) and given.get_seq_length() > 0:
            raise ValueError(
                f"cache must be a HydraCache or HydraStaticCache, got a {type(given).__name__} holding "
                f"{given.get_seq_length()} positions. HYDRA caches latent, post-convolution keys per routed layer, "
                "so standard key/value prefixes cannot be injected: PEFT's prefix tuning is not supported for "
                "HYDRA (use LoRA, IA3 or prompt tuning, which work on inputs_embeds)"
            )
    if past_key_values is None:
        return cache
    if cache is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once: as `cache` (or `past_key_values`, its name before transformers 5.24)")
    return past_key_values


@dataclass(frozen=True)
class TokenStream:
    """The facts about this forward's (B, T) input tokens that every layer shares: their input steps (past + t),
    which are real (padding mask), their RoPE positions and packed-sequence ids. Built once per forward."""

    steps: torch.Tensor  # (B, T) past + t
    position_ids: torch.Tensor  # (B, T)
    token_valid: torch.Tensor | None  # (B, T) bool real tokens; None = all
    sequence_ids: torch.Tensor | None  # (B, T) packed-sequence ids; None = one sequence per row
    past_length: int | torch.Tensor  # a 0-dim tensor on the static cache (a compiled decode step reads no Python int)
    fixed_shapes: bool  # the static cache or torch.export: no shape or branch depends on the data

    @property
    def batch_size(self) -> int:
        return self.steps.shape[0]

    @property
    def length(self) -> int:
        return self.steps.shape[1]

    @classmethod
    def build(cls, inputs_embeds: torch.Tensor, attention_mask, position_ids, cache) -> "TokenStream":
        B, T, _ = inputs_embeds.shape
        static = isinstance(cache, HydraStaticCache)
        # Fixed shapes (no shape or branch that depends on the data): always on the static cache, and on any cache
        # (or none) while torch.export traces, so that an exported graph serves every input of its shapes.
        fixed = static or torch.compiler.is_exporting()
        if static:
            past = cache.step_counter  # stays a tensor
            if not torch.compiler.is_compiling() and int(past) + T > cache.max_cache_len:
                raise ValueError(
                    f"The HydraStaticCache holds max_cache_len={cache.max_cache_len} positions; {int(past)} are "
                    f"used and {T} more were given. Build it with a larger max_cache_len (generate: max_new_tokens)."
                )
        else:
            past = cache.get_seq_length() if cache is not None else 0
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
            if static:  # generate pads the mask to max_cache_len (fixed shape)
                idx = (torch.arange(T, device=attention_mask.device) + past).clamp(max=attention_mask.shape[1] - 1)
                token_valid = attention_mask.gather(1, idx.unsqueeze(0).expand(B, -1)).bool()
            else:
                token_valid = attention_mask[:, -T:].bool()
            if not fixed and bool(token_valid.all()):  # (fixed shapes never sync)
                token_valid = None
        steps = (torch.arange(T, device=inputs_embeds.device) + past).unsqueeze(0).expand(B, -1)  # (B, T)
        sequence_ids = None
        if position_ids is None:
            position_ids = steps
            if attention_mask is not None:  # left padding: real tokens count from 0, the usual HF convention
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
                position_ids = positions.gather(1, steps.clamp(max=attention_mask.shape[1] - 1))
        else:
            position_ids = (position_ids.unsqueeze(0) if position_ids.ndim == 1 else position_ids).expand(B, -1)
            # (a traced fixed-shape graph takes every row as one sequence: finding restarts is data-dependent)
            if not (fixed and torch.compiler.is_compiling()):
                sequence_ids = sequence_ids_from_positions(position_ids, token_valid)
            if sequence_ids is not None and static:
                raise ValueError("packed sequences (position_ids restarting inside a row) need the dynamic HydraCache")
        return cls(steps, position_ids, token_valid, sequence_ids, past, fixed)

    def tokens_for(
        self, selection: LayerSelection, position_embeddings: tuple[torch.Tensor, torch.Tensor], output_attentions: bool
    ) -> HydraTokens:
        """The tokens a layer runs on: every token in place, or the ones at `selection.index`, gathered."""
        cos, sin = position_embeddings
        index = selection.index
        if index is None:
            slot_valid = selection.slot_valid if selection.slot_valid is not None else self.token_valid
            return HydraTokens(
                position_embeddings=position_embeddings, steps=self.steps, slot_valid=slot_valid,
                sequence_ids=self.sequence_ids, key_visible=selection.key_visible, past_length=self.past_length,
                input_length=self.length, every_step=True, output_attentions=output_attentions,
            )
        r_index = index.unsqueeze(-1).expand(-1, -1, cos.shape[-1])  # (B, K, r)
        return HydraTokens(
            position_embeddings=(torch.gather(cos, 1, r_index), torch.gather(sin, 1, r_index)),
            steps=torch.gather(self.steps, 1, index),
            slot_valid=selection.slot_valid,
            sequence_ids=None if self.sequence_ids is None else torch.gather(self.sequence_ids, 1, index),
            key_visible=selection.key_visible,
            past_length=self.past_length,
            input_length=self.length,
            every_step=False,
            cache_every_step=selection.cache_every_step,
            output_attentions=output_attentions,
        )


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
    _skip_keys_device_placement = ["cache", "past_key_values"]
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

    # Layers bitsandbytes' 4-bit CPU path cannot run (`_not_4bit_quantizable_patterns`). When the model is built for
    # quantized loading (`config.quantization_config`, which `from_pretrained` sets before it builds the model) they
    # are listed in `_keep_in_fp32_modules` too, since that is what transformers' quantizers read as modules not to
    # convert, but left out of the float16 upcast (`_get_dtype_plan`): they are ordinary layers and run in the load
    # dtype. Without quantization `_keep_in_fp32_modules` holds the routers only, and means what it says.
    _not_4bit_quantizable: list[str] = []

    @staticmethod
    def _quantized_loading(config) -> bool:
        return getattr(config, "quantization_config", None) is not None

    def _get_dtype_plan(self, dtype: torch.dtype) -> dict:
        plan = super()._get_dtype_plan(dtype)
        return {k: v for k, v in plan.items() if k not in self._not_4bit_quantizable}

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

    `forward` owns the loop over the effective layers: a `RoutingPass` (routing_hydra.py) decides which tokens each
    layer runs on, `_run_layer` computes it.
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
        self.mod_routers = nn.ModuleList([build_router("mod", config) for _ in range(num_mod)])
        self.mor_routers = nn.ModuleList([build_router("mor", config) for _ in range(num_mor)])
        self.moe_blocks = nn.ModuleList([HydraMoEBlock(config) for _ in range(num_moe)])
        self.norm = HydraRMSNorm(config.hidden_size, config.rms_norm_eps, config.kernel_backend)
        self.rotary_emb = HydraRotaryEmbedding(config)
        self.routing_state = RoutingState.from_config(config)
        self.num_recursion_groups = num_recursion_groups(self.plan)
        routers = re.compile(r"mo[dr]_routers\.|moe_blocks\.\d+\.gate$")  # unquantized already (above)
        self._not_4bit_quantizable = _not_4bit_quantizable_patterns(
            (name, module) for name, module in self.named_modules() if not routers.match(name)
        )
        self._keep_in_fp32_modules = _fp32_router_patterns(num_mod, num_mor, num_moe) + (
            self._not_4bit_quantizable if self._quantized_loading(config) else []
        )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HydraCache | HydraStaticCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        domain_labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        attach_routing_loss: bool | None = None,
        past_key_values: HydraCache | HydraStaticCache | None = None,
        **kwargs,
    ) -> HydraModelOutput | tuple:
        r"""
        cache (`HydraCache` or `HydraStaticCache`, *optional*):
            The cache to read and extend (`past_key_values` is the same argument under its name before transformers
            5.24; both work on every supported version). With `use_cache` and no cache, a new `HydraCache` is made.
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
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        if output_router_logits is None:  # (the config has the attribute only with MoE blocks, see `HydraConfig`;
            # not `getattr(..., False)`: torch.compile would guard on the missing attribute)
            output_router_logits = config.has_moe_blocks and config.output_router_logits
        return_dict = return_dict if return_dict is not None else config.return_dict
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(self._checked_input_ids(input_ids))
        cache = self._prepare_cache(cache_argument(cache, past_key_values), use_cache, inputs_embeds)
        self._check_shapes(inputs_embeds, attention_mask, position_ids, cache)
        stream = TokenStream.build(inputs_embeds, attention_mask, position_ids, cache)
        position_embeddings = self.rotary_emb(inputs_embeds, stream.position_ids)  # once, for every layer
        routing = RoutingPass(
            config, self.routing_state, self.mod_routers, self.mor_routers, self.num_recursion_groups,
            batch_size=stream.batch_size, length=stream.length, token_valid=stream.token_valid,
            sequence_ids=stream.sequence_ids, fixed_shapes=stream.fixed_shapes,
        )
        expert_inputs = routing.expert_inputs(domain_labels, inputs_embeds.device) if len(self.moe_blocks) else {}

        hidden_states = inputs_embeds
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        router_logits = ()
        for plan in self.plan:
            selection = routing.select(plan, hidden_states)
            hidden_states, attn = self._run_layer(
                plan, selection, hidden_states, stream, position_embeddings, cache, output_attentions
            )
            if plan.moe_block is not None:
                hidden_states, expert_routing, logits = self.moe_blocks[plan.moe_block](hidden_states, **expert_inputs)
                routing.record_experts(plan.moe_block, expert_routing)
                router_logits += (logits,)
            if output_attentions:
                all_attn += (attn,)
            if output_hidden_states:
                all_hidden += (hidden_states,)

        hidden_states = self.norm(hidden_states)
        if cache is not None:
            cache.advance(stream.length)
        record = self.last_routing = routing.record  # the latest forward's record, for `routing_summary()`
        hidden_states = self._attach_routing_loss(hidden_states, record, attach_routing_loss, output_router_logits)
        output = HydraModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=all_hidden,
            attentions=all_attn,
            routing=record,
            router_logits=router_logits if output_router_logits and router_logits else None,
        )
        return output if return_dict else output.to_tuple()

    def _run_layer(
        self,
        plan: LayerPlan,
        selection: LayerSelection,
        hidden_states: torch.Tensor,  # (B, T, E)
        stream: TokenStream,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos, sin (B, T, r)
        cache: HydraCache | HydraStaticCache | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the block of `plan` on the tokens `selection` names and add its gated update back: in place, or
        gathered into (B, K, E), computed, and scatter-added (skipped tokens are left unchanged)."""
        if selection.skip:
            return hidden_states, self._no_attention(hidden_states, stream, output_attentions)
        layer = self.layers[plan.block]
        recursion_embedding = None if self.recursion_embedding is None else self.recursion_embedding[plan.recursion]
        tokens = stream.tokens_for(selection, position_embeddings, output_attentions)
        gate = selection.gate
        if selection.index is None:
            update, attn = layer(hidden_states, recursion_embedding, tokens=tokens, cache=cache, cache_index=plan.index)
            if gate is not None:
                update = update * gate.unsqueeze(-1).to(update.dtype)
            return hidden_states + update, attn
        backend = resolve_backend(self.config.kernel_backend, hidden_states.device)
        x = gather_tokens(hidden_states, selection.index, backend=backend)  # (B, K, E)
        update, attn = layer(x, recursion_embedding, tokens=tokens, cache=cache, cache_index=plan.index)
        scale = None if gate is None else gate.to(update.dtype)
        return scatter_gated_add(hidden_states, update, selection.index, scale, backend=backend), attn

    def _no_attention(self, hidden_states: torch.Tensor, stream: TokenStream, output_attentions: bool):
        """The attentions of a layer that processed no token: zeros (when attentions are asked for)."""
        if not output_attentions:
            return None
        B, T = hidden_states.shape[:2]
        return hidden_states.new_zeros(B, self.config.num_attention_heads, T, int(stream.past_length) + T)

    def _checked_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`input_ids` as the embedding needs them, or an error naming the field and what is allowed (instead of an
        index error inside the embedding, or a device-side assert on CUDA)."""
        if not torch.is_tensor(input_ids) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            kind = input_ids.dtype if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise TypeError(f"input_ids must be an integer tensor (torch.long) of token ids, got {kind}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.numel() and not torch.compiler.is_compiling():
            low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one pass, one device sync
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"input_ids holds token id {bad}; ids must be in [0, vocab_size - 1] = [0, {self.config.vocab_size - 1}]"
                    " (a tokenizer larger than the model? resize with model.resize_token_embeddings)"
                )
        return input_ids

    def _check_shapes(self, inputs_embeds: torch.Tensor, attention_mask, position_ids, cache) -> None:
        """Inputs whose shapes cannot work get one error naming the field (not a reshape error deep inside)."""
        B, T = inputs_embeds.shape[:2]
        if B == 0 or T == 0:
            raise ValueError(
                f"the input is empty (batch {B}, seq_len {T}): HYDRA needs at least one token in each of at least one row"
            )
        if attention_mask is not None and attention_mask.shape[0] != B:
            raise ValueError(
                f"attention_mask has batch size {attention_mask.shape[0]} but the input has {B}: they must be equal"
            )
        if position_ids is not None and position_ids.ndim == 2 and position_ids.shape[0] not in (1, B):
            raise ValueError(f"position_ids has batch size {position_ids.shape[0]}; it must be 1 or the input's {B}")
        past = cache.get_seq_length() if cache is not None and not isinstance(cache, HydraStaticCache) else 0
        limit = self.config.max_position_embeddings
        rope_type = (getattr(self.config, "rope_parameters", None) or {}).get("rope_type", "default")
        if past + T > limit and rope_type in ("default", "linear") and not torch.compiler.is_compiling():
            logger.warning_once(
                f"HYDRA got {past + T} positions but max_position_embeddings={limit}: positions past {limit} are "
                "outside what the model was configured (and trained) for, so its outputs there are unreliable. Raise "
                "max_position_embeddings with a RoPE scaling (rope_parameters rope_type 'dynamic' or 'yarn') to use "
                "longer contexts."
            )

    def _prepare_cache(self, cache, use_cache: bool | None, inputs_embeds: torch.Tensor):
        """The cache this forward reads and extends, or None."""
        if cache is not None and not isinstance(cache, HydraCacheMixin):  # (one holding positions: refused above)
            cache = None  # an empty cache of another type (e.g. DynamicCache(config) made by a caller): replaced
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if not use_cache or (self.gradient_checkpointing and self.training):
            return None
        if cache is None:
            return HydraCache(self.config)
        if isinstance(cache, HydraStaticCache):
            cache.place(inputs_embeds.device)
        return cache

    def _attach_routing_loss(self, hidden_states, record: RoutingRecord, attach: bool | None, output_router_logits):
        """Attach the routing losses of a training forward to the gradient of the output (see `attach_aux_loss`)."""
        if attach is None:
            attach = self.training and torch.is_grad_enabled()
        if not attach:
            return hidden_states
        # A caller that asks for the router logits computes the MoE load-balancing loss from them (the Mixtral
        # contract, followed by TRL), so that one term is left to it.
        aux = record.total_loss(exclude=("moe_balance",) if output_router_logits else ())
        if aux is None or not aux.requires_grad:
            return hidden_states
        return attach_aux_loss(hidden_states, aux, self.routing_state.attached_aux_loss_scale)


class HydraForCausalLM(HydraPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HydraConfig):
        super().__init__(config)
        self.model = HydraModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # (transformers never quantizes lm_head unless llm_int8_skip_modules replaces its default skips)
        self._not_4bit_quantizable = self.model._not_4bit_quantizable + _not_4bit_quantizable_patterns(
            [("lm_head", self.lm_head)]
        )
        # (post_init adds the backbone's list: its routers, and its narrow layers when loading quantized)
        self._keep_in_fp32_modules = list(self._not_4bit_quantizable) if self._quantized_loading(config) else []
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
        if model_kwargs.get(GENERATE_CACHE_KWARG) is not None or generation_config.use_cache is False:
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
            cache.activate_past_recording(generation_config.num_assistant_tokens)
        model_kwargs[GENERATE_CACHE_KWARG] = cache

    def create_masks_for_generate(
        self, config, inputs_embeds, attention_mask, cache=None, past_key_values=None, **kwargs
    ):
        """`generate()` turns the 2D padding mask into 4D masks for compileable caches; HYDRA builds its own masks
        from the 2D padding mask (routing decides per layer which columns exist), so it keeps the 2D mask, padded
        to `max_cache_len` for the static cache so that its shape is the same at every decode step. (The cache comes
        as `cache` from transformers >= 5.24 and as `past_key_values` before.)"""
        cache = cache_argument(cache, past_key_values)
        if attention_mask is not None and attention_mask.ndim == 2 and isinstance(cache, HydraStaticCache):
            missing = cache.max_cache_len - attention_mask.shape[1]
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
        cache: HydraCache | HydraStaticCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        domain_labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        past_key_values: HydraCache | HydraStaticCache | None = None,
        **kwargs,
    ) -> HydraCausalLMOutputWithPast | tuple:
        r"""
        cache (`HydraCache` or `HydraStaticCache`, *optional*):
            The cache to read and extend; `past_key_values` is the same argument under its name before transformers
            5.24 (both work on every supported version).
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
            cache=cache_argument(cache, past_key_values),
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
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            routing=record,
            router_logits=outputs.router_logits,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["HydraPreTrainedModel", "HydraModel", "HydraForCausalLM", "HydraCausalLMOutputWithPast", "HydraModelOutput"]
