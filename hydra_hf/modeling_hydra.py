"""PyTorch HYDRA model: CCGQA latent attention, weight-shared recursive blocks and routing.

Reads like transformers' own modeling files: RMSNorm, rotary embedding, MLP, attention,
decoder block, `PreTrainedModel`, `HydraModel`, `HydraForCausalLM`. Routing (MoD, MoR, MoE)
lives in `routing_hydra.py`; this file calls it.

Every effective layer runs either densely on all tokens, or on a *compact* sequence: the
tokens it processes (routing-selected and not padding) are gathered into (B, K, E) in their
original order, the block runs on them only (true RoPE positions, causal mask among them,
convolutions and value shift over that sub-sequence), and its output is scatter-added back,
gated. Padding is handled by the same mechanism, which is why pad tokens can never leak into
the convolutions or the value shift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .cache_hydra import HydraCache, HydraCacheLayer
from .configuration_hydra import HydraConfig
from .peft_hydra import register_peft_defaults
from .ops_hydra import (
    causal_conv,
    causal_conv_state_len,
    check_kernel_backend,
    fused_linear_cross_entropy,
    gather_tokens,
    linear_cross_entropy_is_fused,
    qk_mean,
    qk_norm_rope,
    resolve_backend,
    rms_norm,
    scatter_gated_add,
    swiglu,
)
from .routing_hydra import (
    HydraMoEBlock,
    LayerPlan,
    MoDRouter,
    MoRRouter,
    RoutingRecord,
    RoutingState,
    attach_aux_loss,
    build_layer_plan,
    compact_selection,
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
    """RoPE for the first `config.rotary_dim` channels of each latent head."""

    def __init__(self, config: HydraConfig):
        super().__init__()
        self.dim = config.rotary_dim
        self.base = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        compiling = torch.compiler.is_compiling()
        if not compiling:
            # Every dense layer of one eager forward asks for the same positions: reuse the last
            # result when it is the very same (unmodified) position tensor, dtype and device.
            key = (position_ids._version, x.dtype, x.device)
            last = getattr(self, "_last", None)
            if last is not None and last[0] is position_ids and last[1] == key:
                return last[2]
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, r/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, r)
        result = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        if not compiling:
            self._last = (position_ids, key, result)
        return result


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


def build_attention_mask(
    query_len: int,
    past_valid: torch.Tensor | None,  # (B, S_past) bool validity of cached columns
    new_valid: torch.Tensor | None,  # (B, K) bool validity of the new columns
    batch_size: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean (B, 1, K, S_past + K) mask: cached valid columns, causal among the new ones.

    Order inside the new (compact) sequence is causal order; positions are only used for RoPE,
    so packed sequences with position resets still get a correct causal mask. Each query may
    always see its own column, so no row is ever empty (no NaN from padding slots). Returns
    None when the plain causal rule with no past is enough (the SDPA fast path).
    """
    past_len = 0 if past_valid is None else past_valid.shape[1]
    if past_len == 0 and new_valid is None:
        return None
    causal = torch.ones(query_len, query_len, dtype=torch.bool, device=device).tril()  # (K, K)
    new_part = causal.unsqueeze(0).expand(batch_size, -1, -1)  # (B, K, K)
    if new_valid is not None:
        new_part = new_part & new_valid[:, None, :]
        new_part = new_part | torch.eye(query_len, dtype=torch.bool, device=device)
    if past_len == 0:
        return new_part.unsqueeze(1)
    past_part = past_valid[:, None, :].expand(-1, query_len, -1)  # (B, K, S_past)
    return torch.cat([past_part, new_part], dim=-1).unsqueeze(1)  # (B, 1, K, S)


def _shift_in(
    x: torch.Tensor,  # (B, K, C) new columns, valid ones first
    state: torch.Tensor | None,  # (B, P, C) previous columns or None (sequence start)
    counts: torch.Tensor | None,  # (B,) valid columns per row, None = all K
    P: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend the rolling state and return (state ++ x, the new last-P-valid-columns state)."""
    B, K, C = x.shape
    if state is None:
        state = x.new_zeros(B, P, C)
    full = torch.cat([state.to(x.dtype), x], dim=1)  # (B, P + K, C)
    if counts is None:
        return full, full[:, K:]
    idx = counts.view(B, 1) + torch.arange(P, device=x.device).view(1, P)  # (B, P)
    new_state = torch.gather(full, 1, idx.unsqueeze(-1).expand(-1, -1, C))
    return full, new_state


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
        position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos, sin (B, K, r)
        valid: torch.Tensor | None = None,  # (B, K) bool real slots (valid first); None = all
        cache_layer: HydraCacheLayer | None = None,
        cache_step: int = 0,
        positions: torch.Tensor | None = None,  # (B, K) true positions, stored with cached keys
        key_visible: torch.Tensor | None = None,  # (B, K) bool keys others may see (static routing)
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, K, _ = hidden_states.shape
        Hq, Hk, h, Hs = self.num_heads, self.num_key_value_heads, self.head_dim, self.num_shift_heads
        backend = resolve_backend(self.kernel_backend, hidden_states.device)

        q = self.q_proj(hidden_states)  # (B, K, Hq*h)
        k = self.k_proj(hidden_states)  # (B, K, Hk*h)
        v = self.v_proj(hidden_states).view(B, K, Hk, h)  # (B, K, Hk, h)

        q_mean = k_mean = None
        if self.use_qk_mean:
            q_mean, k_mean = qk_mean(q.view(B, K, Hq, h), k.view(B, K, Hk, h), backend=backend)

        counts = None if valid is None else valid.sum(dim=1)  # (B,)
        conv_q_state = conv_k_state = value_prev = None
        if cache_layer is not None:
            conv_q_state, conv_k_state, value_prev = cache_layer.conv_q, cache_layer.conv_k, cache_layer.value_prev

        P = self.conv_state_len
        q_conv = causal_conv(q, self.q_seq_conv, self.q_chan_conv, Hq, state=conv_q_state, backend=backend)
        k_conv = causal_conv(k, self.k_seq_conv, self.k_chan_conv, Hk, state=conv_k_state, backend=backend)

        # Value shift: the last Hs KV heads read the previous processed token's values.
        new_value_prev = None
        if Hs > 0:
            shifted_src = v[:, :, Hk - Hs :].reshape(B, K, Hs * h)  # (B, K, Hs*h)
            prev = None if value_prev is None else value_prev.unsqueeze(1)
            full, new_prev = _shift_in(shifted_src, prev, counts, 1)  # (B, 1 + K, Hs*h)
            shifted = full[:, :K].view(B, K, Hs, h)
            v = torch.cat([v[:, :, : Hk - Hs], shifted], dim=2)  # (B, K, Hk, h)
            new_value_prev = new_prev.squeeze(1)

        if cache_layer is not None:
            new_conv_q = new_conv_k = None
            if P > 0:
                _, new_conv_q = _shift_in(q, conv_q_state, counts, P)
                _, new_conv_k = _shift_in(k, conv_k_state, counts, P)
            cache_layer.set_rolling_state(new_conv_q, new_conv_k, new_value_prev, cache_step)

        cos, sin = position_embeddings
        q_out, k_out = qk_norm_rope(
            q_conv.view(B, K, Hq, h), k_conv.view(B, K, Hk, h), q_mean, k_mean, self.key_temperature,
            cos, sin, backend=backend,
        )
        query_states = q_out.transpose(1, 2)  # (B, Hq, K, h)
        key_states = k_out.transpose(1, 2)  # (B, Hk, K, h)
        value_states = v.transpose(1, 2)  # (B, Hk, K, h)

        new_visible = valid if key_visible is None else (key_visible if valid is None else valid & key_visible)
        past_valid = None
        if cache_layer is not None:
            past_valid = cache_layer.key_valid
            stored_valid = new_visible if new_visible is not None else torch.ones(B, K, dtype=torch.bool, device=q.device)
            key_states, value_states, _, _ = cache_layer.update(
                key_states, value_states, positions, stored_valid, cache_step
            )
        attention_mask = build_attention_mask(K, past_valid, new_visible, B, q.device)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
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
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,  # (B, K)
        valid: torch.Tensor | None = None,
        cache_layer: HydraCacheLayer | None = None,
        cache_step: int = 0,
        recursion_embedding: torch.Tensor | None = None,  # (E,)
        key_visible: torch.Tensor | None = None,  # (B, K) bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if recursion_embedding is not None:
            hidden_states = hidden_states + recursion_embedding
        attn_out, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings,
            valid=valid,
            cache_layer=cache_layer,
            cache_step=cache_step,
            positions=positions,
            key_visible=key_visible,
        )
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states + attn_out))
        return attn_out + mlp_out, attn_weights


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
            Attention probabilities of every effective layer, eager attention only; for routed layers they
            cover only the tokens the layer processed (when `output_attentions=True`).
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


class HydraPreTrainedModel(PreTrainedModel):
    config_class = HydraConfig
    config: HydraConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HydraDecoderLayer", "HydraMoEBlock"]
    # Routers (MoD / MoR `proj` and predictor, MoE `gate`) are tiny, some only 1 wide, and their top-k and
    # threshold decisions are precision-sensitive: bitsandbytes 4/8-bit loading never quantizes them (these patterns
    # are transformers' modules-not-to-convert), and a float16 load keeps them in float32.
    _keep_in_fp32_modules = [r".*_routers\.\d+", r".*moe_blocks\.\d+\.gate"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _is_stateful = False

    def __init__(self, config: HydraConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        register_peft_defaults()  # PEFT's default target modules for model_type "hydra" (see peft_hydra.py)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # HYDRA builds its own HydraCache inside forward.
        return False

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
            # Non-persistent buffer: rebuilt here because from_pretrained materialises modules from meta.
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
        elif isinstance(module, HydraModel):
            if module.recursion_embedding is not None:
                init.zeros_(module.recursion_embedding)
        elif isinstance(module, (MoDRouter, MoRRouter)):
            module.reset_parameters(std)
            init.zeros_(module.threshold)  # running top-k boundary; a loaded value is kept


class HydraModel(HydraPreTrainedModel):
    """The HYDRA decoder stack: embeddings, blocks laid out by `build_layer_plan`, final norm."""

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
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _positions(self, attention_mask, batch_size, seq_len, past_len, device):
        if attention_mask is not None:
            # Left padding: real tokens count from 0 (the usual HF convention).
            pos = attention_mask.long().cumsum(-1) - 1
            return pos.clamp(min=0)[:, -seq_len:]
        return (torch.arange(seq_len, device=device) + past_len).unsqueeze(0).expand(batch_size, -1)

    def run_block(
        self,
        hidden_states: torch.Tensor,  # (B, T, E)
        layer_idx: int,
        block: HydraDecoderLayer,
        positions: torch.Tensor,  # (B, T)
        active: torch.Tensor | None,  # (B, T) bool tokens this layer processes; None = all
        gate: torch.Tensor | None,  # (B, T) multiplier of the update; None = 1
        cache: HydraCache | None,
        cache_step: int,
        recursion_embedding: torch.Tensor | None,
        key_visible: torch.Tensor | None = None,  # (B, T) static routing: keys that stay visible
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Run `block` on the active tokens only and add its gated update back.

        Returns the new hidden states, the attention weights and the number of token slots the
        block ran on (B * K), which the routing statistics and the FLOP tests read.
        """
        cache_layer = cache.layers[layer_idx] if cache is not None else None
        backend = resolve_backend(self.config.kernel_backend, hidden_states.device)
        B, T, _ = hidden_states.shape
        if active is None:
            pos_emb = self.rotary_emb(hidden_states, positions)
            update, attn = block(
                hidden_states, pos_emb, positions, None, cache_layer, cache_step, recursion_embedding, key_visible
            )
            if gate is not None:
                update = update * gate.unsqueeze(-1).to(update.dtype)
            return hidden_states + update, attn, B * T

        index, valid = compact_selection(active)  # (B, K), (B, K)
        K = index.shape[1]
        if K == 0:
            return hidden_states, None, 0
        x = gather_tokens(hidden_states, index, backend=backend)  # (B, K, E)
        sel_positions = torch.gather(positions, 1, index)  # (B, K)
        pos_emb = self.rotary_emb(x, sel_positions)
        all_valid = bool(valid.all())
        sel_visible = None if key_visible is None else torch.gather(key_visible, 1, index)
        update, attn = block(
            x, pos_emb, sel_positions, None if all_valid else valid, cache_layer, cache_step, recursion_embedding,
            sel_visible,
        )
        scale = valid.to(update.dtype)
        if gate is not None:
            scale = scale * torch.gather(gate, 1, index).to(update.dtype)
        hidden_states = scatter_gated_add(hidden_states, update, index, scale, backend=backend)
        return hidden_states, attn, B * K

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
        domain_labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        attach_routing_loss: bool | None = None,
        **kwargs,
    ) -> HydraModelOutput:
        r"""
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
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        if past_key_values is not None and not isinstance(past_key_values, HydraCache):
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
            past_key_values = HydraCache(self.config)
        cache = past_key_values if use_cache else None
        past_len = cache.get_seq_length() if cache is not None else 0

        token_valid = None
        if attention_mask is not None:
            if attention_mask.ndim != 2:
                raise ValueError(
                    f"attention_mask must be a 2D (batch, past + seq_len) padding mask, got {attention_mask.ndim}D"
                )
            if attention_mask.shape[1] < T:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} positions but the input has {T} new tokens"
                )
            token_valid = attention_mask[:, -T:].bool()
            if bool(token_valid.all()):
                token_valid = None
        if position_ids is None:
            position_ids = self._positions(attention_mask, B, T, past_len, inputs_embeds.device)
        elif position_ids.ndim == 1:
            position_ids = position_ids.unsqueeze(0)
        position_ids = position_ids.expand(B, -1)

        record = RoutingRecord()
        hidden_states = inputs_embeds
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn = () if output_attentions else None

        from .routing_hydra import run_layer_stack

        hidden_states = run_layer_stack(
            self, hidden_states, position_ids, token_valid, cache, past_len, record,
            all_hidden, all_attn, domain_labels,
        )
        if output_hidden_states:
            all_hidden = record.pop_hidden()
        if output_attentions:
            all_attn = record.pop_attentions()

        hidden_states = self.norm(hidden_states)
        if cache is not None:
            cache.seen_tokens += T
        self.last_routing = record

        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        router_logits = None
        if output_router_logits and record.moe_router_logits:
            router_logits = tuple(logits.reshape(B * T, -1) for logits in record.moe_router_logits)
        if attach_routing_loss is None:
            attach_routing_loss = self.training and torch.is_grad_enabled()
        if attach_routing_loss:
            # A caller that asks for the router logits computes the MoE load-balancing loss from them (the Mixtral
            # contract, followed by TRL), so that one term is left to it.
            skip = ("moe_balance",) if output_router_logits else ()
            aux = record.total_loss(exclude=skip)
            if aux is not None and aux.requires_grad:
                hidden_states = attach_aux_loss(hidden_states, aux, self.routing_state.attached_aux_loss_scale)
        return HydraModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=cache,
            hidden_states=all_hidden,
            attentions=all_attn,
            routing=record,
            router_logits=router_logits,
        )


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
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
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
