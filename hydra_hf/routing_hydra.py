"""HYDRA routing decisions: Mixture-of-Depths, Mixture-of-Recursions and Mixture-of-Experts.

This file decides; `modeling_hydra.py` computes. It imports nothing from the modeling file.

- `build_layer_plan` lays the effective layers out over the weight-shared blocks (`mor_sharing`
  "sequence" or "middle_cycle") and says which router and MoE block act at each layer.
- `ExpertChoiceRouter` is the one expert-choice router, used by Mixture-of-Depths (arXiv 2404.02258,
  `MoDRouter`) and by MoR expert choice (arXiv 2507.10524, `MoRRouter`): top-k per sequence in training;
  a BCE loss teaches the logit the causal inference rule "process iff logit > 0", where the logit is
  the projection minus a running estimate of the training top-k boundary (`update_running_threshold`).
- `TokenChoiceRouter` (MoR token choice): each token's depth is chosen up front from its own state,
  with a balancing loss.
- `route_experts`: Mixtral's top-k expert choice for the MoE blocks (softmax, top-k, renormalised),
  with the dense warm-up and forced-expert modes and the balance / z losses.
- Routers return a small `RouterOutput` (selected tokens, gate, logits, losses). `RoutingPass`, made once
  per forward by `HydraModel.forward`, calls them layer by layer, keeps the MoR/MoD state between layers,
  hands each layer an immutable `LayerSelection` (which tokens run, their gate, which keys they show, how
  the cache stores them) and assembles the `RoutingRecord`.
- `RoutingState` holds the run-time switches (curricula flip them without rebuilding the model).

Adding a routing mode means a router class here and an entry in `ROUTING_MODES` (the config validates
`mod_routing` / `mor_routing` against it); nothing in the modeling file changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_hydra import ROUTING_MODE_NAMES

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
            decides_depth = config.mor_routing in DEPTH_ROUTING_MODES
            if (p.group_start if decides_depth else (p.recursion_start and p.recursion >= 1)):
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

    Written only by `RoutingPass`, from the routers' `RouterOutput`s and the MoE blocks'
    `ExpertRouting`s; routers never see it.

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
    tokens_processed: dict = field(default_factory=dict)

    def add_loss(self, name: str, value: torch.Tensor):
        self.losses[name] = self.losses[name] + value if name in self.losses else value

    def total_loss(self, exclude: tuple = ()) -> torch.Tensor | None:
        values = [v for name, v in self.losses.items() if name not in exclude]
        if not values:
            return None
        return sum(values)

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




# ---------------------------------------------------------------------------- selection helpers


def sequence_ids_from_positions(
    position_ids: torch.Tensor,  # (B, T)
    token_valid: torch.Tensor | None,  # (B, T) bool or None = all real
) -> torch.Tensor | None:
    """(B, T) id of the packed sequence each token belongs to, or None when every row is one sequence.

    A new sequence starts where a real token's position is not its real predecessor's + 1 (the convention of
    `DataCollatorWithFlattening` and TRL's `padding_free`: positions restart at 0 inside a row). Padding never
    starts a sequence, so left- or right-padded batches stay on the single-sequence fast path.
    """
    if position_ids.shape[1] < 2:
        return None
    restart = position_ids[:, 1:] != position_ids[:, :-1] + 1  # (B, T-1)
    if token_valid is not None:
        restart = restart & token_valid[:, 1:] & token_valid[:, :-1]
    if not bool(restart.any()):
        return None
    return F.pad(restart.long(), (1, 0)).cumsum(dim=1)  # (B, T), 0 for the first sequence of each row


def compact_selection(active: torch.Tensor, fixed_shape: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) bool -> index (B, K), valid (B, K) with K = max tokens selected in a row (K = T with `fixed_shape`:
    no data-dependent size, for the static cache, which compiles and exports).

    Each row lists its selected tokens first, in sequence order, then unselected ones as
    padding slots (valid=False). Indices in a row are unique, so scatter needs no atomics.
    The order is built from ranks (a cumsum and a scatter, no sort), which every export backend lowers.
    """
    B, T = active.shape
    selected = active.long()
    counts = selected.sum(dim=1, keepdim=True)  # (B, 1)
    K = T if fixed_shape else (int(counts.max()) if active.numel() else 0)
    # slot of each token: selected ones at 0 .. count-1, the others after them, both in sequence order
    rank = torch.where(active, selected.cumsum(dim=1) - 1, counts + (1 - selected).cumsum(dim=1) - 1)  # (B, T)
    positions = torch.arange(T, device=active.device).expand(B, T)
    order = torch.zeros_like(rank).scatter_(1, rank, positions)[:, :K]  # (B, K)
    valid = torch.gather(active, 1, order)
    return order, valid


def topk_count(capacity: float, n: int) -> int:
    """Tokens kept out of `n` at `capacity`: ceil(capacity * n), at least 1, at most n."""
    return min(n, max(1, math.ceil(capacity * n - 1e-6)))


def topk_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T) scores -> (B, k) indices of each row's top k, in sequence order (a static shape: compiles)."""
    return scores.detach().topk(k, dim=1).indices.sort(dim=1).values


def topk_mask(
    scores: torch.Tensor,  # (B, T)
    candidates: torch.Tensor | None,  # (B, T) bool or None = all
    capacity: float,
    sequence_ids: torch.Tensor | None = None,  # (B, T) packed-sequence ids or None = one per row
) -> torch.Tensor:
    """Bool mask of the top ceil(capacity * n) candidates of each sequence (n = its candidate count)."""
    B, T = scores.shape
    if candidates is None and sequence_ids is None:
        idx = topk_index(scores, topk_count(capacity, T))
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    if candidates is None:
        candidates = torch.ones_like(scores, dtype=torch.bool)
    if sequence_ids is None:
        sequence_ids = torch.zeros_like(scores, dtype=torch.long)
    masked = scores.detach().masked_fill(~candidates, float("-inf"))
    # Sort by (sequence id ascending, score descending): two stable sorts.
    order = masked.argsort(dim=1, descending=True, stable=True)  # (B, T)
    order = order.gather(1, sequence_ids.gather(1, order).argsort(dim=1, stable=True))
    sorted_seq = sequence_ids.gather(1, order)  # (B, T) ascending
    per_seq_tokens = torch.zeros_like(sequence_ids).scatter_add_(1, sequence_ids, torch.ones_like(sequence_ids))
    seq_start = per_seq_tokens.cumsum(dim=1) - per_seq_tokens  # (B, T) first sorted slot of each sequence id
    arange = torch.arange(T, device=scores.device).expand(B, -1)
    rank = torch.empty_like(order).scatter_(1, order, arange - seq_start.gather(1, sorted_seq))  # rank in its sequence
    n = torch.zeros_like(sequence_ids).scatter_add_(1, sequence_ids, candidates.long())  # (B, T) candidates per id
    k = torch.minimum(torch.ceil(n.float() * capacity - 1e-6).long().clamp(min=1), n)
    return (rank < k.gather(1, sequence_ids)) & candidates


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




# ---------------------------------------------------------------------------- routers


@dataclass
class RouterOutput:
    """What a router decided for one layer; the layer loop turns it into compute and a `RoutingRecord`.

    - `selected`: (B, T) bool tokens that are processed (expert choice), or None = every candidate.
    - `index`: (B, k) the same tokens as indices in sequence order, when every row keeps the same static
      count k (training without padding or packing); the loop gathers with it directly (no data-dependent
      shape, so the training step compiles).
    - `depth`: (B, T) long chosen depth 1..R (token choice), or None.
    - `gate`: (B, T) multiplier of the processed tokens' updates (router weight), or None = 1.
    - `logits`: the router's raw logits ((B, T) or (B, T, R)).
    - `losses`: unweighted-name -> weighted loss ("bce", "ponder", "z", "balance"); the loop prefixes the component.
    """

    selected: torch.Tensor | None = None
    index: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    losses: dict = field(default_factory=dict)


@dataclass
class RouterInputs:
    """What the layer loop gives every router besides the hidden states (one name per concept).

    - `candidates`: (B, T) bool tokens that may be processed at this layer; None = all.
    - `token_valid`: (B, T) bool real (non-padding) tokens; None = all.
    - `sequence_ids`: (B, T) packed-sequence id (top-k per sequence); None = one sequence per row.
    - `candidate_count`: every row has exactly this many candidates (static top-k size), or None.
    - `capacity`: fraction of the candidates an expert-choice router keeps.
    - `routing_on`: the component is switched on (`RoutingState`); off, a router still computes its losses.
    - `loss_weights`: weight of each auxiliary loss ("bce", "ponder", "z", "balance"); a router reads its own.
    """

    candidates: torch.Tensor | None = None
    token_valid: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None
    candidate_count: int | None = None
    capacity: float = 1.0
    routing_on: bool = False
    loss_weights: dict = field(default_factory=dict)


class ExpertChoiceRouter(nn.Module):
    """Expert-choice router (MoD and MoR expert choice): a linear score per token, + an optional predictor.

    Training (and a switched-off router): the top `capacity` of each sequence's candidates, as a BCE target for
    the calibrated logit. Inference: "logit > 0" (causal: a token's decision never looks at later tokens).
    """

    def __init__(self, hidden_size: int, threshold_momentum: float, use_predictor: bool = False):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, bias=True)
        # running top-k boundary in logit units (see update_running_threshold); saved with the weights
        self.register_buffer("threshold", torch.zeros(()), persistent=True)
        self.threshold_momentum = threshold_momentum
        self.predictor = None
        if use_predictor:
            width = max(8, hidden_size // 8)
            self.predictor = nn.Sequential(nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, 1))

    def reset_parameters(self, std: float):
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)
        if self.predictor is not None:
            for m in self.predictor:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=std)
                    nn.init.zeros_(m.bias)

    def forward(self, hidden_states: torch.Tensor, inputs: RouterInputs) -> RouterOutput:  # hidden (B, T, E)
        candidates, sequence_ids, candidate_count = inputs.candidates, inputs.sequence_ids, inputs.candidate_count
        capacity, routing_on = inputs.capacity, inputs.routing_on
        bce_weight = inputs.loss_weights.get("bce", 0.0)
        ponder_weight = inputs.loss_weights.get("ponder", 0.0)
        z_weight = inputs.loss_weights.get("z", 0.0)
        raw_logits = self.proj(router_input(hidden_states, self.proj)).squeeze(-1).float()  # (B, T); the gate sees these
        logits = raw_logits - self.threshold  # (B, T) calibrated: decisions and the BCE use these
        pred_logits = None
        if self.predictor is not None:
            pred_logits = self.predictor(router_input(hidden_states.detach(), self.predictor[0])).squeeze(-1).float()
        index = None
        if self.training or not routing_on:
            if candidate_count is not None and sequence_ids is None:
                k = topk_count(capacity, candidate_count)
                scores = logits if candidates is None else logits.masked_fill(~candidates, float("-inf"))
                index = topk_index(scores, k)  # (B, k)
                target = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, index, True)
            else:
                target = topk_mask(logits, candidates, capacity, sequence_ids)
            if self.training and _is_trained(self.proj):
                update_running_threshold(self.threshold, logits, target, candidates, self.threshold_momentum)
        else:
            decider = pred_logits if pred_logits is not None else logits
            target = decider > 0
            if candidates is not None:
                target = target & candidates
        losses = {}
        if self.training:
            if bce_weight > 0:
                bce = _masked_mean(F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none"), candidates)
                if pred_logits is not None:
                    bce = bce + _masked_mean(
                        F.binary_cross_entropy_with_logits(pred_logits, target.float(), reduction="none"), candidates
                    )
                losses["bce"] = bce_weight * bce
            if ponder_weight > 0:
                losses["ponder"] = ponder_weight * _masked_mean(torch.sigmoid(raw_logits), candidates)
            if z_weight > 0:
                losses["z"] = z_weight * _masked_mean(raw_logits.pow(2), candidates)
        if not routing_on:
            return RouterOutput(logits=raw_logits, losses=losses)
        return RouterOutput(selected=target, index=index, gate=torch.sigmoid(raw_logits), logits=raw_logits, losses=losses)


class TokenChoiceRouter(nn.Module):
    """MoR token choice: one router per recursion group scores depths 1..R from the token's state up front."""

    def __init__(self, hidden_size: int, num_recursions: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_recursions, bias=True)
        self.num_recursions = num_recursions

    def reset_parameters(self, std: float):
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden_states: torch.Tensor, inputs: RouterInputs) -> RouterOutput:  # hidden (B, T, E)
        token_valid, routing_on = inputs.token_valid, inputs.routing_on
        balance_weight = inputs.loss_weights.get("balance", 0.0)
        ponder_weight = inputs.loss_weights.get("ponder", 0.0)
        z_weight = inputs.loss_weights.get("z", 0.0)
        R = self.num_recursions
        logits = self.proj(router_input(hidden_states, self.proj)).float()  # (B, T, R)
        probs = logits.softmax(dim=-1)
        choice = probs.argmax(dim=-1)  # (B, T) in 0..R-1
        losses = {}
        if self.training:
            onehot = F.one_hot(choice, R).float()
            if token_valid is None:
                frac, mean_p = onehot.mean(dim=(0, 1)), probs.mean(dim=(0, 1))
            else:
                m = token_valid.float().unsqueeze(-1)
                denom = m.sum().clamp_min(1)
                frac, mean_p = (onehot * m).sum((0, 1)) / denom, (probs * m).sum((0, 1)) / denom
            losses["balance"] = balance_weight * R * (frac * mean_p).sum()
            depth_frac = (probs * torch.arange(1, R + 1, device=probs.device)).sum(-1) / R
            if ponder_weight > 0:
                losses["ponder"] = ponder_weight * _masked_mean(depth_frac, token_valid)
            if z_weight > 0:
                losses["z"] = z_weight * _masked_mean(torch.logsumexp(logits, dim=-1).pow(2), token_valid)
        if not routing_on:
            return RouterOutput(logits=logits, losses=losses)
        gate = probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)  # router weight of the chosen depth
        return RouterOutput(depth=choice + 1, gate=gate, logits=logits, losses=losses)


class MoDRouter(ExpertChoiceRouter):
    """Mixture-of-Depths router of one routed layer (an `ExpertChoiceRouter` built from the config)."""

    def __init__(self, config):
        super().__init__(config.hidden_size, config.router_threshold_momentum, config.mod_use_predictor)


class MoRExpertChoiceRouter(ExpertChoiceRouter):
    """MoR expert-choice router of one recursion step: which still-active tokens continue."""

    def __init__(self, config):
        super().__init__(config.hidden_size, config.router_threshold_momentum)


class MoRTokenChoiceRouter(TokenChoiceRouter):
    """MoR token-choice router of one recursion group: each token's depth, decided up front."""

    def __init__(self, config):
        super().__init__(config.hidden_size, config.mor_recursions)


# Routing modes: component -> {config value -> router class built from the config}. The config field naming the mode
# is `<component>_routing` (`mod_routing`, `mor_routing`); the config validates it against the same names
# (configuration_hydra.ROUTING_MODE_NAMES, kept equal to this table). A new mode is a router
# class here (returning a `RouterOutput`) and an entry in this table: the layer loop and `RoutingPass` only read
# `RouterOutput`s. (`register_routing_mode` adds one from outside, e.g. in a test.)
ROUTING_MODES: dict[str, dict[str, type]] = {
    "mod": {"expert_choice": MoDRouter},
    "mor": {"expert_choice": MoRExpertChoiceRouter, "token_choice": MoRTokenChoiceRouter},
}
# Modes whose router decides each token's depth once per recursion group ("depth" in its output) instead of
# selecting tokens at every recursion step.
DEPTH_ROUTING_MODES = {"token_choice"}


def register_routing_mode(component: str, name: str, router_class: type, decides_depth: bool = False) -> None:
    """Add routing mode `name` for `component` ("mod" or "mor"): `<component>_routing=name` then builds `router_class`."""
    if component not in ROUTING_MODES:
        raise ValueError(f"component must be one of {sorted(ROUTING_MODES)}, got {component!r}")
    ROUTING_MODES[component][name] = router_class
    if name not in ROUTING_MODE_NAMES[component]:
        ROUTING_MODE_NAMES[component].append(name)
    if decides_depth:
        DEPTH_ROUTING_MODES.add(name)


def build_router(component: str, config) -> nn.Module:
    """The router of one decision point of `component` for the mode the config names."""
    mode = getattr(config, f"{component}_routing")
    modes = ROUTING_MODES[component]
    if mode not in modes:
        raise ValueError(f"{component}_routing must be one of {tuple(modes)}, got {mode!r}")
    return modes[mode](config)


def MoRRouter(config) -> nn.Module:
    """The MoR router of one decision point for `config.mor_routing`."""
    return build_router("mor", config)


# ---------------------------------------------------------------------------- MoE


@dataclass
class ExpertRouting:
    """Mixtral-style expert choice of one MoE block over N flattened tokens."""

    expert_index: torch.Tensor  # (N, k') experts each token goes to
    weights: torch.Tensor  # (N, k') their mixing weights
    losses: dict  # "balance", "z" (weighted)
    tokens_per_expert: torch.Tensor  # (X,) real-token slots per expert (statistics)
    entropy: torch.Tensor  # () entropy of the expert load


def forced_experts(moe_forced: dict, domain_labels: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B,) domain labels -> (B * T,) forced expert per token, -1 where the domain is not forced."""
    forced = torch.tensor([moe_forced.get(int(d), -1) for d in domain_labels.tolist()], device=domain_labels.device)
    return forced.repeat_interleave(seq_len)


def route_experts(
    logits: torch.Tensor,  # (N, X) router logits
    top_k: int,
    *,
    dense: bool,
    forced: torch.Tensor | None,  # (N,) forced expert or -1, or None
    token_valid: torch.Tensor | None,  # (N,) bool real tokens, or None = all
    training: bool,
    balance_weight: float,
    z_weight: float,
) -> ExpertRouting:
    N, X = logits.shape
    k = top_k
    probs = logits.softmax(dim=-1)
    if dense:
        # Dense warm-up: every token through every expert, softmax-weighted.
        weights = probs
        expert_index = torch.arange(X, device=logits.device).expand(N, X)
    elif forced is not None:
        top_w, top_i = probs.topk(k, dim=-1)
        use = forced >= 0
        expert_index = torch.where(use.unsqueeze(-1), forced.clamp(min=0).unsqueeze(-1).expand(-1, k), top_i)
        weights = top_w / top_w.sum(-1, keepdim=True)
        # forced tokens use the forced expert once, weight 1
        forced_w = F.one_hot(torch.zeros_like(forced), k).float() if k > 1 else torch.ones_like(weights)
        weights = torch.where(use.unsqueeze(-1), forced_w, weights)
    else:
        top_w, expert_index = probs.topk(k, dim=-1)  # (N, k)
        weights = top_w / top_w.sum(dim=-1, keepdim=True)

    # Losses and statistics over real (non-padding) tokens.
    assign = F.one_hot(expert_index, X).sum(dim=1).float()  # (N, X)
    m = None if token_valid is None else token_valid.float().unsqueeze(-1)  # (N, 1)
    if m is not None:
        assign = assign * m
    counts = assign.sum(dim=0)  # (X,)
    frac = counts / counts.sum().clamp_min(1)
    losses = {}
    if training:
        mean_p = probs.mean(dim=0) if m is None else (probs * m).sum(0) / m.sum().clamp_min(1)
        losses["balance"] = balance_weight * X * (frac * mean_p).sum()
        if z_weight > 0:
            z = torch.logsumexp(logits, dim=-1).pow(2)
            losses["z"] = z_weight * (z.mean() if m is None else (z * m.squeeze(-1)).sum() / m.sum().clamp_min(1))
    entropy = -(frac * frac.clamp_min(1e-12).log()).sum()
    return ExpertRouting(expert_index, weights, losses, counts.detach(), entropy.detach())


# ---------------------------------------------------------------------------- one forward's routing


@dataclass(frozen=True)
class LayerSelection:
    """What one effective layer runs on, as `RoutingPass.select` decided it (immutable; the layer only reads it).

    - `index`: (B, K) the tokens that run, gathered in sequence order; None = every token of the forward, in place.
    - `slot_valid`: (B, K) (or (B, T) in place) slots whose token is really processed: its update is added and its
      key stored valid; None = all. Invalid slots are padding of the gather, or rows that skip in a decode step.
    - `gate`: (B, K) (or (B, T)) multiplier of each slot's update, zero on invalid slots; None = 1.
    - `key_visible`: (B, K) tokens whose keys the others may attend to (static routing computes unselected tokens
      but hides them); None = every valid slot.
    - `cache_every_step`: the cache stores one column per input step of this forward (the tokens left out are
      invalid columns), as a Llama layer does; False = it stores the processed tokens only (routed layers).
    - `skip`: no token runs: the layer is not called at all.
    """

    index: torch.Tensor | None = None
    slot_valid: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    key_visible: torch.Tensor | None = None
    cache_every_step: bool = True
    skip: bool = False

    def slots(self, batch: int, length: int) -> int:
        """Token slots the layer computes (statistics and the FLOP tests)."""
        if self.skip:
            return 0
        return batch * (length if self.index is None else self.index.shape[1])


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


def _mul(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a * b


class RoutingPass:
    """The routing of one forward: calls the routers layer by layer, keeps the MoR/MoD state between layers, turns
    each decision into a `LayerSelection`, and assembles the `RoutingRecord` (losses and statistics).

    Made once per forward by `HydraModel.forward`; the model asks `select(plan, hidden_states)` before each effective
    layer and hands MoE routings to `record_experts`. Nothing here computes a block.
    """

    def __init__(
        self,
        config,
        state: RoutingState,
        mod_routers: nn.ModuleList,
        mor_routers: nn.ModuleList,
        num_recursion_groups: int,
        *,
        batch_size: int,
        length: int,
        token_valid: torch.Tensor | None,  # (B, T) real tokens; None = all
        sequence_ids: torch.Tensor | None,  # (B, T) packed-sequence ids; None = one sequence per row
        fixed_shapes: bool = False,  # the static cache: no data-dependent shape (compiles with fullgraph, exports)
    ):
        self.config, self.state = config, state
        self.mod_routers, self.mor_routers = mod_routers, mor_routers
        self.num_recursion_groups = num_recursion_groups
        self.B, self.T = batch_size, length
        self.token_valid, self.sequence_ids = token_valid, sequence_ids
        self.fixed_shapes = fixed_shapes
        self.fixed_shape_decode = fixed_shapes and length == 1  # a decode step: every row computes its token
        self.record = RoutingRecord()
        bce = state.mod_aux_weight(config) if (len(mod_routers) or len(mor_routers)) else 0.0
        self.mod_loss_weights = {"bce": bce}
        self.mor_loss_weights = {
            "bce": bce, "ponder": state.mor_ponder_loss_coef, "z": state.mor_z_loss_coef,
            "balance": state.mor_balance_loss_coef,
        }
        # Exact candidates per row while no padding / packing makes rows differ: expert-choice top-k then has a
        # static size k and the layer gathers with its indices (no data-dependent shape: the training step compiles).
        self.full_count = length if token_valid is None and sequence_ids is None else None
        self._start_group(track_depth=False)

    # ------------------------------------------------------------------ MoR state of the current recursion group
    def _start_group(self, track_depth: bool) -> None:
        self.mor_active = self.mor_index = self.mor_gate = self.depth = None  # (B, T) / (B, k) / (B, T) / (B, T)
        self.mor_count = self.full_count
        device = self.token_valid.device if self.token_valid is not None else None
        self.depth_count = torch.zeros(self.B, self.T, dtype=torch.long, device=device) if track_depth else None

    def _router_inputs(self, candidates, count, capacity, on, weights) -> RouterInputs:
        return RouterInputs(
            candidates=candidates, token_valid=self.token_valid, sequence_ids=self.sequence_ids,
            candidate_count=count, capacity=capacity, routing_on=on, loss_weights=weights,
        )

    def _add_losses(self, component: str, losses: dict) -> None:
        for name, value in losses.items():
            self.record.add_loss(f"{component}_{name}", value)

    def select(self, plan: LayerPlan, hidden_states: torch.Tensor) -> LayerSelection:
        """Route `hidden_states` (B, T, E) at effective layer `plan`: which tokens run, with which gate."""
        if plan.group < 0 or plan.group_start:  # a new recursion group (or an unshared layer): all tokens active again
            self._start_group(track_depth=self.config.mor_enabled and plan.group >= 0)
            if self.depth_count is not None:
                self.depth_count = self.depth_count.to(hidden_states.device)
        if plan.mor_router is not None:
            capacity = mor_layer_capacity(self.state.mor_capacity, plan.group, self.num_recursion_groups, plan.recursion)
            out = self.mor_routers[plan.mor_router](
                hidden_states,
                self._router_inputs(
                    _and(self.mor_active, self.token_valid), self.mor_count, capacity, self.state.mor_enabled,
                    self.mor_loss_weights,
                ),
            )
            self.mor_gate = out.gate
            if out.depth is not None:  # the router chose every token's depth up front
                self.depth = out.depth
            elif out.selected is not None:  # the tokens that continue
                self.mor_active, self.mor_index = out.selected, out.index
                self.mor_count = None if out.index is None else out.index.shape[1]
            self._add_losses("mor", out.losses)

        if self.depth is not None:
            active, index, count = self.depth > plan.recursion, None, None
        else:
            active, index, count = self.mor_active, self.mor_index, self.mor_count
        gate = self.mor_gate if plan.recursion >= 1 else None
        if plan.recursion_start and self.depth_count is not None:
            self.depth_count = self.depth_count + (1 if active is None else active.long())
        candidates = _and(active, self.token_valid)
        routed = active is not None

        if plan.mod_router is not None:
            out = self.mod_routers[plan.mod_router](
                hidden_states,
                self._router_inputs(candidates, count, self.state.mod_capacity, self.state.mod_enabled, self.mod_loss_weights),
            )
            self._add_losses("mod", out.losses)
            if out.selected is not None:
                n = candidates.sum() if candidates is not None else torch.tensor(float(self.B * self.T))
                self.record.mod_selected_fraction[plan.index] = (out.selected.sum().float() / n.clamp_min(1)).detach()
                candidates, index, gate, routed = out.selected, out.index, _mul(gate, out.gate), True

        selection = self._selection(candidates, index, gate, routed)
        self.record.tokens_processed[plan.index] = selection.slots(self.B, self.T)
        if plan.group_end and self.depth_count is not None:
            real = self.token_valid if self.token_valid is not None else torch.ones_like(self.depth_count, dtype=torch.bool)
            depths = torch.arange(1, self.config.mor_recursions + 1, device=self.depth_count.device)
            self.record.mor_depth_histogram[plan.group] = (
                (self.depth_count.unsqueeze(-1) == depths) & real.unsqueeze(-1)
            ).sum(dim=(0, 1))  # (R,) tokens by final depth
        return selection

    def _selection(
        self,
        active: torch.Tensor | None,  # (B, T) tokens to process (routing and padding); None = all
        index: torch.Tensor | None,  # (B, k) the same as indices when every row keeps k (static shape)
        gate: torch.Tensor | None,  # (B, T)
        routed: bool,  # a router (not only padding) left tokens out
    ) -> LayerSelection:
        """Turn a decision into how the layer runs: in place, gathered, or not at all."""
        if active is None:
            return LayerSelection(gate=gate)
        if self.config.static_routing and routed:
            # Fixed shapes: every real token is computed (its conv / value-shift state advances), unselected ones get
            # weight 0 and are hidden as keys. (Also a decode step on the static cache: the token is not skipped.)
            if self.fixed_shape_decode:
                return LayerSelection(
                    slot_valid=self.token_valid, gate=_mul(gate, active.to(_dtype(gate))), key_visible=active
                )
            return self._gathered(self.token_valid, None, _mul(gate, active.float()), key_visible=active, routed=False)
        if self.fixed_shape_decode:
            # Decode step on the static cache: fixed shapes for torch.compile. Every row computes its token; a row
            # whose token is skipped (routing) or padding adds nothing, stores an invalid column, keeps its state.
            return LayerSelection(slot_valid=active, gate=_mul(gate, active.to(_dtype(gate))), cache_every_step=True)
        if self.T == 1:
            # One token per row (decoding): skip the layer when no row processes it, else run it in place.
            rows = int(active[:, 0].sum())
            if rows == 0:
                return LayerSelection(skip=True)
            if rows == self.B:
                return LayerSelection(gate=gate)
            return LayerSelection(slot_valid=active, gate=_mul(gate, active.float()), cache_every_step=not routed)
        return self._gathered(active, index, gate, key_visible=None, routed=routed)

    def _gathered(self, active, index, gate, key_visible, routed: bool) -> LayerSelection:
        if active is None:  # static routing without padding: every token, in place
            return LayerSelection(gate=gate, key_visible=key_visible)
        valid = None
        if index is None:
            # On the static cache every row keeps T slots (its processed tokens first, the others invalid): the
            # same result as the compact K = max count, with no shape that depends on the data.
            index, valid = compact_selection(active, fixed_shape=self.fixed_shapes)  # (B, K), (B, K)
            if index.shape[1] == 0:
                return LayerSelection(skip=True)
            if not self.fixed_shapes and bool(valid.all()):
                valid = None
        slot_gate = None if gate is None else torch.gather(gate, 1, index)
        if valid is not None:
            slot_gate = _mul(slot_gate, valid.float())
        return LayerSelection(
            index=index,
            slot_valid=valid,
            gate=slot_gate,
            key_visible=None if key_visible is None else torch.gather(key_visible, 1, index),
            cache_every_step=not routed,
        )

    # ------------------------------------------------------------------ MoE blocks and the result
    def expert_inputs(self, domain_labels: torch.Tensor | None, device) -> dict:
        """Keyword arguments of a MoE block's call: the run-time state, real tokens, forced experts."""
        forced = None
        if self.state.moe_forced is not None and domain_labels is not None:
            forced = forced_experts(self.state.moe_forced, domain_labels.to(device), self.T)
        return {"state": self.state, "token_valid": self.token_valid, "forced": forced}

    def record_experts(self, block: int, routing: ExpertRouting) -> None:
        self._add_losses("moe", routing.losses)
        self.record.moe_tokens_per_expert[block] = routing.tokens_per_expert
        self.record.moe_entropy[block] = routing.entropy


def _dtype(gate: torch.Tensor | None) -> torch.dtype:
    return gate.dtype if gate is not None else torch.float32
