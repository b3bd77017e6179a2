"""HYDRA routing: Mixture-of-Depths, Mixture-of-Recursions and Mixture-of-Experts.

- `build_layer_plan` lays the effective layers out over the weight-shared blocks
  (`mor_sharing` "sequence" or "middle_cycle") and says which routers and MoE blocks act where.
- `MoDRouter` (arXiv 2404.02258): expert-choice top-k per sequence in training; a BCE loss
  teaches the logit the causal inference rule "process iff logit > 0", where the logit is the
  projection minus a running estimate of the training top-k boundary (`update_running_threshold`).
- `MoRRouter` (arXiv 2507.10524): expert choice (hierarchical top-k per recursion, same BCE
  rule) or token choice (depth chosen up front from the token's own state, balancing loss).
- `HydraMoEBlock`: Mixtral-style top-k FFN experts, dispatch by sorting tokens per expert.
- `run_layer_stack` runs the plan: each layer gets the set of tokens it processes and a gate,
  and `HydraModel.run_block` gathers exactly those tokens, so skipped compute is really skipped.
- `RoutingState` holds the run-time switches (curricula flip them without rebuilding the model);
  `RoutingRecord` collects each forward's losses and statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .ops_hydra import (
    moe_permute,
    moe_unpermute,
    resolve_backend,
)

# ---------------------------------------------------------------------------- layout


@dataclass
class LayerPlan:
    """What happens at one effective layer."""

    index: int  # effective layer index (= cache slot)
    block: int  # which unique block's weights run
    recursion: int  # recursion step of that block (0 = first pass)
    group: int  # recursion group: a block ("sequence") or the middle stack ("middle_cycle"); -1 = unshared
    group_start: bool  # first layer of its group (recursion 0)
    recursion_start: bool  # first layer of this recursion step inside its group
    group_end: bool  # last layer of its group
    mod_router: int | None = None  # index into HydraModel.mod_routers
    mor_router: int | None = None  # router deciding at this layer (into HydraModel.mor_routers)
    moe_block: int | None = None  # MoE block applied after this layer (into HydraModel.moe_blocks)


def build_layer_plan(config) -> list[LayerPlan]:
    U, R = config.num_unique_blocks, config.mor_recursions
    raw: list[tuple[int, int, int]] = []  # (block, recursion, group)
    if config.mor_sharing == "middle_cycle":
        raw.append((0, 0, -1))
        for r in range(R):
            for b in range(1, U - 1):
                raw.append((b, r, 0))
        raw.append((U - 1, 0, -1))
    else:
        for b in range(U):
            for r in range(R):
                raw.append((b, r, b))
    plans = []
    for i, (b, r, g) in enumerate(raw):
        prev = raw[i - 1] if i > 0 else None
        nxt = raw[i + 1] if i + 1 < len(raw) else None
        plans.append(
            LayerPlan(
                index=i, block=b, recursion=r, group=g,
                group_start=g >= 0 and (prev is None or prev[2] != g),
                recursion_start=g >= 0 and (prev is None or prev[2] != g or prev[1] != r),
                group_end=g >= 0 and (nxt is None or nxt[2] != g),
            )
        )
    L = len(plans)
    if config.mod_enabled:
        n = 0
        for p in plans:
            if p.index % config.mod_every == config.mod_every - 1:
                p.mod_router, n = n, n + 1
    if config.mor_enabled and R > 1:
        n = 0
        for p in plans:
            if config.mor_routing == "expert_choice" and p.recursion_start and p.recursion >= 1:
                p.mor_router, n = n, n + 1
            elif config.mor_routing == "token_choice" and p.group_start:
                p.mor_router, n = n, n + 1
    if config.moe_enabled and config.moe_num_layers > 0:
        M = config.moe_num_layers
        after = sorted({min(L - 1, max(0, round((j + 1) * L / (M + 1)) - 1)) for j in range(M)})
        if len(after) < M:  # more MoE blocks than gaps: one after each of the last M layers
            after = list(range(max(0, L - M), L))
        for j, li in enumerate(after):
            plans[li].moe_block = j
    return plans


def num_recursion_groups(plan: list[LayerPlan]) -> int:
    return len({p.group for p in plan if p.group >= 0})


def mor_layer_capacity(cap, group: int, num_groups: int, recursion: int) -> float:
    """Fraction of the still-active tokens that continue at `recursion` (>= 1) of `group`.

    `cap` is the `mor_capacity` setting: a float, a list (one per recursion step), or None for
    the layer-aware default: early groups keep ~40%, late ones ~80%.
    """
    if isinstance(cap, list):
        return float(cap[recursion - 1])
    if cap is not None:
        return float(cap)
    if num_groups <= 1:
        return 0.6
    return 0.4 + 0.4 * group / (num_groups - 1)


# ---------------------------------------------------------------------------- state & record


@dataclass
class RoutingState:
    """Run-time routing switches; the architecture (which routers exist) is fixed by the config.

    A component that is switched off still trains its router on its auxiliary objective (so no
    parameter is left without a gradient and the router is ready when it is switched on), but
    every token is processed and no gate is applied.
    """

    mod_enabled: bool = False
    mod_capacity: float = 0.75
    mor_enabled: bool = False
    mor_capacity: float | list | None = None
    moe_dense: bool = False
    moe_forced: dict | None = None
    mod_aux_loss_coef: float | None = None
    mor_ponder_loss_coef: float = 0.001
    mor_z_loss_coef: float = 0.0
    mor_balance_loss_coef: float = 0.01
    router_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.001
    # Weight of the aux losses `HydraModel` attaches to its output's gradient when it runs as a backbone under
    # another library's LM head and loss (see `attach_aux_loss`); the callbacks set 1 / gradient accumulation steps.
    attached_aux_loss_scale: float = 1.0

    @classmethod
    def from_config(cls, config) -> "RoutingState":
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})

    def update(self, config, **changes):
        allowed = {f.name for f in fields(self)}
        for key, value in changes.items():
            if key not in allowed:
                raise ValueError(f"Unknown routing setting {key!r}; allowed: {sorted(allowed)}")
            if key == "mod_enabled" and value and not config.mod_enabled:
                raise ValueError("mod_enabled: this model was built without MoD routers (config.mod_enabled=False)")
            if key == "mor_enabled" and value and not config.mor_enabled:
                raise ValueError("mor_enabled: this model was built without MoR routers (config.mor_enabled=False)")
            if key == "mod_capacity" and not 0.0 < value <= 1.0:
                raise ValueError(f"mod_capacity must be in (0, 1], got {value}")
            if key == "mor_capacity" and value is not None:
                for v in value if isinstance(value, list) else [value]:
                    if not 0.0 < v <= 1.0:
                        raise ValueError(f"mor_capacity values must be in (0, 1], got {value}")
            if key == "attached_aux_loss_scale" and not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"attached_aux_loss_scale must be a number >= 0, got {value!r}")
            if key == "moe_forced" and value is not None and not isinstance(value, dict):
                raise ValueError("moe_forced must be a dict {domain_label: expert_index} or None")
            setattr(self, key, value)

    def mod_aux_weight(self, config) -> float:
        """BCE weight of the expert-choice routers (MoD and MoR): the coef, or the spec's auto rule."""
        if self.mod_aux_loss_coef is not None:
            return float(self.mod_aux_loss_coef)
        return 0.01 * (config.num_hidden_layers / 32) * math.sqrt(config.hidden_size / 768)


@dataclass
class RoutingRecord:
    """Losses and statistics of one forward pass (tensors; `summary()` gives Python numbers).

    - `losses`: name -> weighted loss tensor (summed into `aux_loss`), e.g. "mod_bce", "mor_ponder",
      "moe_balance", "moe_z".
    - `mod_selected_fraction`: effective layer -> fraction of the candidate tokens processed.
    - `mor_depth_histogram`: recursion group -> (R,) token counts by final depth 1..R.
    - `moe_tokens_per_expert`: MoE block -> (X,) token-slot counts; `moe_entropy`: block -> entropy.
    - `tokens_processed`: effective layer -> token slots the block ran on (B * K).
    """

    losses: dict = field(default_factory=dict)
    mod_selected_fraction: dict = field(default_factory=dict)
    mor_depth_histogram: dict = field(default_factory=dict)
    moe_tokens_per_expert: dict = field(default_factory=dict)
    moe_entropy: dict = field(default_factory=dict)
    moe_router_logits: list = field(default_factory=list)
    tokens_processed: dict = field(default_factory=dict)
    hidden_states: list = field(default_factory=list)
    attentions: list = field(default_factory=list)

    def add_loss(self, name: str, value: torch.Tensor):
        self.losses[name] = self.losses[name] + value if name in self.losses else value

    def total_loss(self, exclude: tuple = ()) -> torch.Tensor | None:
        values = [v for name, v in self.losses.items() if name not in exclude]
        if not values:
            return None
        return sum(values)

    def pop_hidden(self):
        out, self.hidden_states = tuple(self.hidden_states), []
        return out

    def pop_attentions(self):
        out, self.attentions = tuple(self.attentions), []
        return out

    def summary(self) -> dict:
        """Flat dict of floats / lists for logging (e.g. `routing/mod_fraction/layer_3`)."""
        out = {}
        for name, value in self.losses.items():
            out[f"routing/loss/{name}"] = float(value.detach())
        for layer, frac in self.mod_selected_fraction.items():
            out[f"routing/mod_fraction/layer_{layer}"] = float(frac)
        if self.mod_selected_fraction:
            out["routing/mod_fraction/mean"] = sum(float(f) for f in self.mod_selected_fraction.values()) / len(
                self.mod_selected_fraction
            )
        depths = []
        for group, hist in self.mor_depth_histogram.items():
            hist = hist.detach().float()
            total = float(hist.sum().clamp_min(1))
            mean_depth = float((hist * torch.arange(1, len(hist) + 1, device=hist.device)).sum()) / total
            out[f"routing/mor_mean_depth/block_{group}"] = mean_depth
            out[f"routing/mor_depth_hist/block_{group}"] = [float(v) / total for v in hist.tolist()]
            depths.append(mean_depth)
        if depths:
            out["routing/mor_mean_depth/mean"] = sum(depths) / len(depths)
        for block, counts in self.moe_tokens_per_expert.items():
            counts = counts.detach().float()
            out[f"routing/moe_tokens/block_{block}"] = counts.tolist()
            out[f"routing/moe_utilisation/block_{block}"] = float((counts > 0).float().mean())
        for block, ent in self.moe_entropy.items():
            out[f"routing/moe_entropy/block_{block}"] = float(ent)
        return out


# ---------------------------------------------------------------------------- helpers


def compact_selection(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool -> index (B, K), valid (B, K) with K = max tokens selected in a row.

    Each row lists its selected tokens first, in sequence order, then unselected ones as
    padding slots (valid=False). Indices in a row are unique, so scatter needs no atomics.
    """
    counts = active.sum(dim=1)  # (B,)
    K = int(counts.max()) if active.numel() else 0
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :K]  # (B, K)
    valid = torch.gather(active, 1, order)
    return order, valid


def topk_mask(scores: torch.Tensor, candidates: torch.Tensor | None, capacity: float) -> torch.Tensor:
    """(B, T) scores -> bool mask of the top ceil(capacity * n_candidates) candidates of each row."""
    B, T = scores.shape
    if candidates is None:
        k = max(1, math.ceil(capacity * T - 1e-6))
        idx = scores.topk(k, dim=1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    n = candidates.sum(dim=1)  # (B,)
    k = torch.ceil(n.float() * capacity - 1e-6).long().clamp(min=1)
    k = torch.minimum(k, n)
    masked = scores.detach().masked_fill(~candidates, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=scores.device).expand(B, -1))
    return (rank < k.unsqueeze(1)) & candidates


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


@torch.no_grad()
def update_running_threshold(
    threshold: torch.Tensor,  # () buffer, in raw-logit units
    logits: torch.Tensor,  # (B, T) logits with the current threshold already subtracted
    selected: torch.Tensor,  # (B, T) bool, the training top-k
    candidates: torch.Tensor | None,  # (B, T) bool or None = all
    momentum: float,
) -> None:
    """Move `threshold` towards the top-k boundary of this batch (midway between the lowest selected
    and the highest unselected logit, averaged over the rows that have both)."""
    if momentum <= 0:
        return
    valid = candidates if candidates is not None else torch.ones_like(selected)
    lowest_selected = logits.masked_fill(~selected, float("inf")).amin(dim=-1)  # (B,)
    highest_skipped = logits.masked_fill(selected | ~valid, float("-inf")).amax(dim=-1)  # (B,)
    both = torch.isfinite(lowest_selected) & torch.isfinite(highest_skipped)  # (B,)
    boundary = torch.where(both, (lowest_selected + highest_skipped) / 2, torch.zeros_like(lowest_selected))
    mean_boundary = boundary.sum() / both.sum().clamp_min(1)  # 0 when no row has both
    threshold.add_(momentum * mean_boundary.to(threshold.dtype))


def router_input(x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """`x` in the dtype of a router's floating-point weight. Routers stay in float32 when the model is loaded in
    float16 or quantized (`_keep_in_fp32_modules`), while the hidden states are in the model's dtype."""
    weight = getattr(linear, "weight", None)
    if weight is not None and weight.is_floating_point() and weight.dtype != x.dtype and not torch.is_autocast_enabled():
        return x.to(weight.dtype)
    return x


def _is_trained(proj: nn.Module) -> bool:
    """A router moves its running threshold only while its own weight is trained. Frozen routers (LoRA / QLoRA
    fine-tuning, where an adapter on `proj` trains the adapter but not the weight, e.g. `target_modules="all-linear"`)
    keep the threshold they were saved with, so base model + adapter reproduce the tuned model. A router copied into
    `modules_to_save` trains its weight, moves its threshold, and PEFT saves both."""
    return proj.weight.requires_grad


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `hidden`; its backward also sends `scale` as the gradient of the scalar `aux`."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.aux_like = (aux.shape, aux.dtype, aux.device)
        ctx.scale = scale
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        shape, dtype, device = ctx.aux_like
        return grad_output, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def attach_aux_loss(hidden: torch.Tensor, aux: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Return `hidden` unchanged, with `scale * aux` attached to the backward pass.

    Any loss computed from the result back-propagates into `aux` as if `scale * aux` had been added to it. This is
    how the routing losses reach the routers when `HydraModel` is used as a backbone and another library computes
    the loss from its hidden states without adding `aux_loss` (TRL's fused LM head does exactly that). The loss value
    itself does not contain the aux term. `scale` should be 1 / (gradient accumulation steps): DDP already averages
    over processes, and the caller's cross-entropy is normalised over the accumulated batch.
    """
    return _AttachAuxLoss.apply(hidden, aux, float(scale))


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


# ---------------------------------------------------------------------------- routers


class MoDRouter(nn.Module):
    """Mixture-of-Depths router of one routed layer: a linear score per token (+ optional predictor)."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, 1, bias=True)
        # running top-k boundary in logit units (see update_running_threshold); saved with the weights
        self.register_buffer("threshold", torch.zeros(()), persistent=True)
        self.threshold_momentum = config.router_threshold_momentum
        self.predictor = None
        if config.mod_use_predictor:
            width = max(8, config.hidden_size // 8)
            self.predictor = nn.Sequential(
                nn.Linear(config.hidden_size, width), nn.SiLU(), nn.Linear(width, 1)
            )

    def reset_parameters(self, std: float):
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)
        if self.predictor is not None:
            for m in self.predictor:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=std)
                    nn.init.zeros_(m.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, E)
        candidates: torch.Tensor | None,  # (B, T) tokens that may be processed; None = all
        state: RoutingState,
        config,
        record: RoutingRecord,
        layer_index: int,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return (tokens to process (B, T) bool or None = all candidates, gate (B, T) or None)."""
        raw_logits = self.proj(router_input(hidden_states, self.proj)).squeeze(-1).float()  # (B, T); the gate sees these
        logits = raw_logits - self.threshold  # (B, T) calibrated: decisions and the BCE use these
        pred_logits = None
        if self.predictor is not None:
            pred_logits = self.predictor(router_input(hidden_states.detach(), self.predictor[0])).squeeze(-1).float()
        if self.training or not state.mod_enabled:
            target = topk_mask(logits, candidates, state.mod_capacity)
            if self.training and _is_trained(self.proj):
                update_running_threshold(self.threshold, logits, target, candidates, self.threshold_momentum)
        else:
            decider = pred_logits if pred_logits is not None else logits
            target = decider > 0
            if candidates is not None:
                target = target & candidates
        weight = state.mod_aux_weight(config)
        if self.training and weight > 0:
            bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
            loss = _masked_mean(bce, candidates)
            if pred_logits is not None:
                loss = loss + _masked_mean(
                    F.binary_cross_entropy_with_logits(pred_logits, target.float(), reduction="none"), candidates
                )
            record.add_loss("mod_bce", weight * loss)
        if not state.mod_enabled:
            return None, None
        n_cand = candidates.sum() if candidates is not None else torch.tensor(float(target.numel()))
        record.mod_selected_fraction[layer_index] = (target.sum().float() / n_cand.clamp_min(1)).detach()
        return target, torch.sigmoid(raw_logits)


class MoRRouter(nn.Module):
    """Mixture-of-Recursions router.

    Expert choice: one router per (group, recursion >= 1), a linear score deciding which of the
    still-active tokens continue. Token choice: one router per group scoring depths 1..R up front.
    """

    def __init__(self, config):
        super().__init__()
        out = 1 if config.mor_routing == "expert_choice" else config.mor_recursions
        self.proj = nn.Linear(config.hidden_size, out, bias=True)
        self.mode = config.mor_routing
        # expert choice: running top-k boundary in logit units (see update_running_threshold)
        self.register_buffer("threshold", torch.zeros(()), persistent=True)
        self.threshold_momentum = config.router_threshold_momentum

    def reset_parameters(self, std: float):
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)

    def expert_choice(self, hidden_states, candidates, capacity, state, config, record):
        """-> (continuing tokens (B, T) bool or None, gate (B, T) or None)."""
        raw_logits = self.proj(router_input(hidden_states, self.proj)).squeeze(-1).float()  # (B, T); the gate sees these
        logits = raw_logits - self.threshold  # (B, T) calibrated: decisions and the BCE use these
        if self.training or not state.mor_enabled:
            target = topk_mask(logits, candidates, capacity)
            if self.training and _is_trained(self.proj):
                update_running_threshold(self.threshold, logits, target, candidates, self.threshold_momentum)
        else:
            target = logits > 0
            if candidates is not None:
                target = target & candidates
        if self.training:
            bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
            record.add_loss("mor_bce", state.mod_aux_weight(config) * _masked_mean(bce, candidates))
            if state.mor_ponder_loss_coef > 0:
                record.add_loss("mor_ponder", state.mor_ponder_loss_coef * _masked_mean(torch.sigmoid(raw_logits), candidates))
            if state.mor_z_loss_coef > 0:
                record.add_loss("mor_z", state.mor_z_loss_coef * _masked_mean(raw_logits.pow(2), candidates))
        if not state.mor_enabled:
            return candidates, None
        return target, torch.sigmoid(raw_logits)

    def token_choice(self, hidden_states, token_valid, num_recursions, state, record):
        """-> (depth (B, T) long in 1..R or None = full depth, gate (B, T) or None)."""
        logits = self.proj(router_input(hidden_states, self.proj)).float()  # (B, T, R)
        probs = logits.softmax(dim=-1)
        choice = probs.argmax(dim=-1)  # (B, T) in 0..R-1
        if self.training:
            R = num_recursions
            onehot = F.one_hot(choice, R).float()
            mask = token_valid
            if mask is None:
                frac, mean_p = onehot.mean(dim=(0, 1)), probs.mean(dim=(0, 1))
            else:
                m = mask.float().unsqueeze(-1)
                denom = m.sum().clamp_min(1)
                frac, mean_p = (onehot * m).sum((0, 1)) / denom, (probs * m).sum((0, 1)) / denom
            record.add_loss("mor_balance", state.mor_balance_loss_coef * R * (frac * mean_p).sum())
            depth_frac = (probs * torch.arange(1, R + 1, device=probs.device)).sum(-1) / R
            if state.mor_ponder_loss_coef > 0:
                record.add_loss("mor_ponder", state.mor_ponder_loss_coef * _masked_mean(depth_frac, mask))
            if state.mor_z_loss_coef > 0:
                z = torch.logsumexp(logits, dim=-1).pow(2)
                record.add_loss("mor_z", state.mor_z_loss_coef * _masked_mean(z, mask))
        if not state.mor_enabled:
            return None, None
        gate = probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)  # router weight of the chosen depth
        return choice + 1, gate


# ---------------------------------------------------------------------------- MoE


class HydraMoEBlock(nn.Module):
    """FFN-only Mixture-of-Experts residual block (Mixtral router: softmax, top-k, renormalised)."""

    def __init__(self, config):
        super().__init__()
        from .modeling_hydra import HydraMLP, HydraRMSNorm

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
        token_valid: torch.Tensor | None,
        domain_labels: torch.LongTensor | None,
        state: RoutingState,
        record: RoutingRecord,
        block_index: int,
    ) -> torch.Tensor:
        B, T, E = hidden_states.shape
        X, k = self.num_experts, self.top_k
        x = self.norm(hidden_states).reshape(B * T, E)  # (N, E)
        router_in = x
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            router_in = x * noise
        logits = self.gate(router_input(router_in, self.gate)).float()  # (N, X)
        probs = logits.softmax(dim=-1)
        backend = resolve_backend(self.kernel_backend, x.device)

        if state.moe_dense:
            # Dense warmup: every token through every expert, softmax-weighted.
            weights = probs
            expert_index = torch.arange(X, device=x.device).expand(B * T, X)
        elif state.moe_forced is not None and domain_labels is not None:
            forced = torch.tensor(
                [state.moe_forced.get(int(d), -1) for d in domain_labels.tolist()], device=x.device
            )  # (B,)
            top_w, top_i = probs.topk(k, dim=-1)
            forced_tok = forced.repeat_interleave(T)  # (N,)
            use = forced_tok >= 0
            top_i = torch.where(use.unsqueeze(-1), forced_tok.clamp(min=0).unsqueeze(-1).expand(-1, k), top_i)
            weights = top_w / top_w.sum(-1, keepdim=True)
            weights = torch.where(use.unsqueeze(-1), torch.full_like(weights, 1.0 / k), weights)
            expert_index = top_i
            if k > 1:  # forced tokens use the forced expert once, weight 1
                weights = torch.where(
                    use.unsqueeze(-1), F.one_hot(torch.zeros_like(forced_tok), k).float(), weights
                )
        else:
            top_w, expert_index = probs.topk(k, dim=-1)  # (N, k)
            weights = top_w / top_w.sum(dim=-1, keepdim=True)

        permuted, tokens_per_expert, sorted_pairs = moe_permute(
            x, expert_index, X, backend=backend
        )  # (N*k', E), (X,), (N*k',)
        outputs = []
        start = 0
        for e, count in enumerate(tokens_per_expert.tolist()):
            if count:
                outputs.append(self.experts[e](permuted[start : start + count]))
            start += count
        expert_out = torch.cat(outputs, dim=0) if outputs else permuted[:0]
        y = moe_unpermute(expert_out, sorted_pairs, weights.to(expert_out.dtype), backend=backend)  # (N, E)

        # Losses and statistics over real (non-padding) tokens.
        valid = None if token_valid is None else token_valid.reshape(-1)
        assign = F.one_hot(expert_index, X).sum(dim=1).float()  # (N, X)
        if valid is not None:
            assign = assign[valid]
            probs_v, logits_v = probs[valid], logits[valid]
        else:
            probs_v, logits_v = probs, logits
        counts = assign.sum(dim=0)  # (X,)
        if self.training:
            frac = counts / counts.sum().clamp_min(1)
            balance = X * (frac * probs_v.mean(dim=0)).sum()
            record.add_loss("moe_balance", state.router_aux_loss_coef * balance)
            if state.moe_z_loss_coef > 0:
                z = torch.logsumexp(logits_v, dim=-1).pow(2).mean()
                record.add_loss("moe_z", state.moe_z_loss_coef * z)
        frac = counts / counts.sum().clamp_min(1)
        entropy = -(frac * frac.clamp_min(1e-12).log()).sum()
        record.moe_tokens_per_expert[block_index] = counts.detach()
        record.moe_entropy[block_index] = entropy.detach()
        record.moe_router_logits.append(logits.view(B, T, X))
        return hidden_states + y.view(B, T, E).to(hidden_states.dtype)


# ---------------------------------------------------------------------------- the stack


def run_layer_stack(
    model, hidden_states, positions, token_valid, cache, past_len, record, all_hidden, all_attn, domain_labels
):
    """Run every effective layer of `model.plan`, routing as configured. Returns hidden states."""
    config, state = model.config, model.routing_state
    num_groups = num_recursion_groups(model.plan)
    R = config.mor_recursions
    mor_active = mor_gate = depth = depth_count = None
    for plan in model.plan:
        if plan.group < 0 or plan.group_start:
            # A new recursion group (or an unshared layer): every token starts active again.
            mor_active = mor_gate = depth = None
            depth_count = torch.zeros_like(positions) if (config.mor_enabled and plan.group >= 0) else None

        if plan.mor_router is not None:
            router = model.mor_routers[plan.mor_router]
            if config.mor_routing == "expert_choice":
                cap = mor_layer_capacity(state.mor_capacity, plan.group, num_groups, plan.recursion)
                mor_active, mor_gate = router.expert_choice(
                    hidden_states, _and(mor_active, token_valid), cap, state, config, record
                )
            else:
                depth, mor_gate = router.token_choice(hidden_states, token_valid, R, state, record)

        layer_active = (depth > plan.recursion) if depth is not None else mor_active
        layer_gate = mor_gate if plan.recursion >= 1 else None
        if plan.recursion_start and depth_count is not None:
            depth_count = depth_count + (1 if layer_active is None else layer_active.long())
        candidates = _and(layer_active, token_valid)

        if plan.mod_router is not None:
            sel, gate = model.mod_routers[plan.mod_router](
                hidden_states, candidates, state, config, record, plan.index
            )
            if sel is not None:
                candidates = sel
                layer_gate = _mul(layer_gate, gate)

        rec_emb = model.recursion_embedding[plan.recursion] if model.recursion_embedding is not None else None
        block = model.layers[plan.block]
        if config.static_routing and candidates is not None:
            # Fixed shapes: every token is computed, unselected ones get weight 0 and are hidden as keys.
            weight = candidates.to(hidden_states.dtype)
            hidden_states, attn, n = model.run_block(
                hidden_states, plan.index, block, positions, token_valid, _mul(layer_gate, weight), cache,
                past_len, rec_emb, key_visible=candidates,
            )
        else:
            hidden_states, attn, n = model.run_block(
                hidden_states, plan.index, block, positions, candidates, layer_gate, cache, past_len, rec_emb
            )
        record.tokens_processed[plan.index] = n
        if all_attn is not None:
            record.attentions.append(attn)

        if plan.group_end and depth_count is not None:
            valid = token_valid if token_valid is not None else torch.ones_like(depth_count, dtype=torch.bool)
            record.mor_depth_histogram[plan.group] = torch.bincount(depth_count[valid], minlength=R + 1)[1 : R + 1]

        if plan.moe_block is not None:
            hidden_states = model.moe_blocks[plan.moe_block](
                hidden_states, token_valid, domain_labels, state, record, plan.moe_block
            )
        if all_hidden is not None:
            record.hidden_states.append(hidden_states)
    if all_hidden is not None:
        record.hidden_states.insert(0, all_hidden[0])
    return hidden_states
