"""`transformers.TrainerCallback`s for training HYDRA with the stock `transformers.Trainer`.

- `RoutingCurriculumCallback`: MoD / MoR / MoE curriculum applied with `model.set_routing` each step;
  its state (CE-loss EMA, gate step) is checkpointed through the Trainer's `stateful_callbacks`.
- `RoutingMetricsCallback`: routing losses and statistics, tokens/s, into the Trainer's logs.
- `HealthCallback`: parameters that do not train, loss spikes, gradient-norm outliers, collapsed routers
  (logged, and recorded in `<output_dir>/health.json`); loss-spike LR cooldown, dynamic grad-norm clipping.
- `SampleGenerationCallback`: generations from fixed prompts every N steps.
- `BestCheckpointCallback`: keeps a record of the global best checkpoint next to the checkpoints and
  restores it into `TrainerState` on resume if the state lost it.

Logs: callbacks that add entries do it in `on_log`, both to the `logs` dict (seen by every callback
after them, e.g. the console progress bar) and to `state.log_history[-1]` (the run's history). For
`report_to` integrations (TensorBoard, W&B) to see them too, the callbacks must run *before* the
integration callbacks: add them with `add_callbacks(trainer, [...])` (as `hydra-train` does with the list
`hydra_hf.cli.train.build_callbacks` makes) rather than `Trainer(callbacks=...)`, which appends after the integrations.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback, ExportableState

from . import schedules

logger = logging.getLogger("hydra_hf.training")


# ---------------------------------------------------------------------------- helpers


class LossProbe:
    """Forward hook on the model that collects each training micro-batch's cross-entropy and routing aux loss.

    Shared by the callbacks (one hook per model). Every micro-batch is recorded as (CE sum, aux x items, items),
    so that `step_value()` returns the item-weighted means over the whole optimizer step: all its accumulated
    micro-batches and, under `torch.distributed`, all processes (one all-reduce per step, so every process makes
    the same curriculum decision). This holds whichever loss convention the forward used:

    - HYDRA's own output without `num_items_in_batch`: `loss` is the micro-batch mean CE plus `aux_loss`;
    - with `num_items_in_batch` = N (the Trainer's convention under gradient accumulation): `loss` is the CE sum / N
      plus `aux_loss` = aux * items / N (see `HydraForCausalLM.forward`);
    - TRL's fused LM head (`log_probs`, `label_mask`): the CE sum is read from the log-probabilities, and the aux
      loss from the routing record of the forward.

    Items are counted like the Trainer: `shift_labels`, else `labels[..., 1:]`, not -100. Forwards in eval mode or
    without gradients are not training micro-batches and are ignored. Values stay tensors until `step_value()`.
    """

    def __init__(self, model):
        self.model = model
        self._records = []
        self.tokens = 0
        self._cached_step = None
        self._cached = None
        self._device = None
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    @classmethod
    def attach(cls, model) -> "LossProbe":
        probe = getattr(model, "_hydra_loss_probe", None)
        if probe is None:
            probe = cls(model)
            object.__setattr__(model, "_hydra_loss_probe", probe)
        return probe

    def _routing_record(self, output):
        record = getattr(output, "routing", None)
        if record is not None:
            return record
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return getattr(getattr(base, "model", None), "last_routing", None)

    def _hook(self, module, args, kwargs, output):
        if not module.training or not torch.is_grad_enabled():
            return
        loss = getattr(output, "loss", None)
        if loss is None:
            return
        loss = loss.detach().float().reshape(-1).mean()
        device = loss.device
        self._device = device
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        if shift_labels is not None:
            items = (shift_labels != -100).sum()
        elif labels is not None:
            items = (labels[..., 1:] != -100).sum()
        else:
            items = torch.ones((), device=device)
        items = items.to(device, torch.float32)
        record = self._routing_record(output)
        aux_total = record.total_loss() if record is not None else None
        aux = aux_total.detach().float().to(device) if aux_total is not None else torch.zeros((), device=device)
        log_probs, label_mask = getattr(output, "log_probs", None), getattr(output, "label_mask", None)
        if log_probs is not None and label_mask is not None:  # TRL's fused LM head: no aux inside `loss`
            ce_sum = -log_probs.detach().float().sum().to(device)
            items = label_mask.sum().to(device, torch.float32)
        else:
            aux_in_loss = getattr(output, "aux_loss", None)
            ce = loss - (aux_in_loss.detach().float().to(device) if torch.is_tensor(aux_in_loss) else 0.0)
            num_items = kwargs.get("num_items_in_batch")
            if num_items is not None:
                ce_sum = ce * (num_items.to(device, torch.float32) if torch.is_tensor(num_items) else float(num_items))
            else:
                ce_sum = ce * items
        self._records.append(torch.stack([ce_sum.reshape(()), (aux * items).reshape(()), items.reshape(())]))
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            mask = kwargs.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else ids.numel()

    def _all_reduce(self, totals: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl" and totals.device.type != "cuda":
                totals = totals.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        return totals

    def step_value(self, step: int) -> tuple[float, float] | None:
        """(loss, aux loss) of optimizer step `step` (the Trainer's `global_step` after the update), or None:
        loss = CE + aux, each the item-weighted mean over the step's micro-batches and processes. Every callback
        asking about the same step gets the same value; the pending micro-batches are consumed on the first call
        for a new step (under `torch.distributed` that call all-reduces, on every process)."""
        if self._cached_step == step:
            return self._cached
        device = self._device if self._device is not None else torch.device("cpu")
        totals = torch.stack(self._records).sum(dim=0) if self._records else torch.zeros(3, device=device)
        self._records = []
        ce_sum, aux_sum, items = (float(v) for v in self._all_reduce(totals).tolist())
        if items <= 0:
            return None
        ce, aux = ce_sum / items, aux_sum / items
        self._cached_step, self._cached = step, (ce + aux, aux)
        return self._cached


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def set_attached_aux_loss_scale(model, args) -> None:
    """Weight of the routing aux losses attached to the backbone's gradient (used when another library, e.g. TRL's
    fused LM head, computes the loss from `HydraModel`'s hidden states): one micro-batch's share of the step,
    1 / gradient accumulation steps, like the Trainer's own loss normalisation (DDP averages the processes)."""
    if hasattr(model, "set_routing"):
        model.set_routing(attached_aux_loss_scale=1.0 / max(1, int(args.gradient_accumulation_steps)))


def _stored_state(state, name: str):
    if state.stateful_callbacks is None:
        state.stateful_callbacks = {}
    data = state.stateful_callbacks.get(name)
    if isinstance(data, list):
        data = data[0] if data else None
    return data


def add_to_logs(state, logs: dict, extra: dict):
    """Add `extra` to the logs being dispatched and to the entry already written to `state.log_history`."""
    logs.update(extra)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(extra)


def flatten_numbers(summary: dict) -> dict:
    """Lists -> per-index scalars (1-based for depth histograms), non-numbers dropped."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, (list, tuple)):
            label = "depth" if "depth_hist" in key else "expert"
            base = 1 if label == "depth" else 0
            for i, v in enumerate(value):
                out[f"{key}/{label}_{i + base}"] = float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, bool):
            out[key] = float(value)
    return out


def add_callbacks(trainer, callbacks) -> None:
    """Insert callbacks right after the Trainer's `DefaultFlowCallback`, before `report_to` integrations,
    so the entries they add in `on_log` reach TensorBoard / W&B as well as the console and log history."""
    handler = trainer.callback_handler
    index = 0
    for i, cb in enumerate(handler.callbacks):
        if isinstance(cb, DefaultFlowCallback):
            index = i + 1
    for cb in callbacks:
        cb = cb() if isinstance(cb, type) else cb
        handler.callbacks.insert(index, cb)
        index += 1
        if isinstance(cb, ExportableState) and trainer.state.stateful_callbacks is not None:
            trainer.state.stateful_callbacks.setdefault(cb.__class__.__name__, cb.state())


# ---------------------------------------------------------------------------- curriculum


class RoutingCurriculumCallback(TrainerCallback, ExportableState):
    """Routing curriculum applied through `model.set_routing(...)` before every optimizer step.

    Args:
        mod_off_fraction: MoD is off for the first fraction of `max_steps`.
        mod_force_fraction: MoD is forced on from this fraction, whatever the loss.
        mod_loss_gate: between the two, MoD switches on from the step after the CE-loss EMA first falls
            below this value.
        ema_beta: EMA factor of the CE loss (`ema = beta * ema + (1 - beta) * ce`).
        mod_capacity: target MoD capacity (None = the model config's `mod_capacity`).
        mod_capacity_start: optional starting capacity ramped to `mod_capacity` over
            [`mod_off_fraction`, `mor_full_fraction`] (None = constant).
        mor_start_fraction / mor_full_fraction: MoR is at full depth (off) until the first, switched on at
            it with capacity 1.0 and ramped down to `mor_capacity` by the second.
        mor_capacity: target MoR capacity (float, per-recursion list, or None = the config's value).
        moe_dense_steps: MoE dense warmup (every expert on every token) for this many steps.
        moe_forced_steps / moe_forced_map: forced MoE routing {domain label: expert} for the first steps
            (the data collator must pass `domain_labels`).

    Components the model was built without are left alone. The state (`ce_ema`, `gate_open_step`) is saved
    in every checkpoint through `TrainerState.stateful_callbacks` and restored in `on_train_begin` when
    training resumes (independently of `restore_callback_states_from_checkpoint`; with that flag on the
    Trainer rebuilds the callback from the same JSON, which also works because every argument is JSON).
    """

    def __init__(
        self,
        mod_off_fraction: float = 0.10,
        mod_force_fraction: float = 0.175,
        mod_loss_gate: float = 5.0,
        ema_beta: float = 0.9,
        mod_capacity: float | None = None,
        mod_capacity_start: float | None = None,
        mor_start_fraction: float = 0.20,
        mor_full_fraction: float = 0.30,
        mor_capacity: float | list | None = None,
        moe_dense_steps: int = 0,
        moe_forced_steps: int = 0,
        moe_forced_map: dict | None = None,
    ):
        for name, value in (("mod_off_fraction", mod_off_fraction), ("mod_force_fraction", mod_force_fraction),
                            ("mor_start_fraction", mor_start_fraction), ("mor_full_fraction", mor_full_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if mod_force_fraction < mod_off_fraction:
            raise ValueError("mod_force_fraction must be >= mod_off_fraction")
        if mor_full_fraction < mor_start_fraction:
            raise ValueError("mor_full_fraction must be >= mor_start_fraction")
        if not 0.0 <= ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta}")
        self.mod_off_fraction = mod_off_fraction
        self.mod_force_fraction = mod_force_fraction
        self.mod_loss_gate = mod_loss_gate
        self.ema_beta = ema_beta
        self.mod_capacity = mod_capacity
        self.mod_capacity_start = mod_capacity_start
        self.mor_start_fraction = mor_start_fraction
        self.mor_full_fraction = mor_full_fraction
        self.mor_capacity = mor_capacity
        self.moe_dense_steps = int(moe_dense_steps)
        self.moe_forced_steps = int(moe_forced_steps)
        self.moe_forced_map = {int(k): int(v) for k, v in (moe_forced_map or {}).items()} or None
        # state
        self.ce_ema: float | None = None
        self.gate_open_step: int | None = None
        self.last_settings: dict = {}
        self._probe = None
        self._model = None

    # ---- ExportableState
    def state(self) -> dict:
        return {
            "args": {
                "mod_off_fraction": self.mod_off_fraction,
                "mod_force_fraction": self.mod_force_fraction,
                "mod_loss_gate": self.mod_loss_gate,
                "ema_beta": self.ema_beta,
                "mod_capacity": self.mod_capacity,
                "mod_capacity_start": self.mod_capacity_start,
                "mor_start_fraction": self.mor_start_fraction,
                "mor_full_fraction": self.mor_full_fraction,
                "mor_capacity": self.mor_capacity,
                "moe_dense_steps": self.moe_dense_steps,
                "moe_forced_steps": self.moe_forced_steps,
                "moe_forced_map": {str(k): v for k, v in (self.moe_forced_map or {}).items()},
            },
            "attributes": {"ce_ema": self.ce_ema, "gate_open_step": self.gate_open_step},
        }

    # ---- pure schedule for a step
    def settings_at(self, step: int, max_steps: int, config) -> dict:
        """The `set_routing` keyword arguments for `step` (depends only on step, run length and gate step)."""
        out = {}
        if config.mod_enabled:
            target = self.mod_capacity if self.mod_capacity is not None else config.mod_capacity
            out["mod_enabled"] = schedules.mod_enabled_at(
                step, max_steps, self.mod_off_fraction, self.mod_force_fraction, self.gate_open_step
            )
            out["mod_capacity"] = schedules.mod_capacity_at(
                step, max_steps, target, self.mod_capacity_start, self.mod_off_fraction, self.mor_full_fraction
            )
        if config.mor_enabled:
            target = self.mor_capacity if self.mor_capacity is not None else config.mor_capacity
            enabled, capacity = schedules.mor_setting_at(
                step, max_steps, self.mor_start_fraction, self.mor_full_fraction, target
            )
            out["mor_enabled"] = enabled
            out["mor_capacity"] = capacity
        if config.moe_enabled and config.moe_num_layers > 0:
            out["moe_dense"] = schedules.moe_dense_at(step, self.moe_dense_steps)
            out["moe_forced"] = schedules.moe_forced_at(step, self.moe_forced_steps, self.moe_forced_map)
        return out

    def apply(self, model, step: int, max_steps: int) -> dict:
        model = unwrap(model)
        settings = self.settings_at(step, max_steps, model.config)
        if settings:
            model.set_routing(**settings)
        self.last_settings = settings
        return settings

    # ---- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        stored = _stored_state(state, type(self).__name__)
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        if state.global_step > 0 and stored:
            attrs = stored.get("attributes", {})
            self.ce_ema = attrs.get("ce_ema")
            self.gate_open_step = attrs.get("gate_open_step")
        self._model = unwrap(model)
        self._probe = LossProbe.attach(self._model)
        set_attached_aux_loss_scale(self._model, args)
        self.apply(self._model, state.global_step, state.max_steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.apply(self._model if self._model is not None else model, state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        taken = self._probe.step_value(state.global_step) if self._probe is not None else None
        if taken is None:
            return
        loss, aux = taken
        ce = loss - aux
        if math.isfinite(ce):
            self.ce_ema = ce if self.ce_ema is None else self.ema_beta * self.ce_ema + (1 - self.ema_beta) * ce
        # `state.global_step` steps are done; the gate opens for the next step.
        start = schedules.fraction_to_step(self.mod_off_fraction, state.max_steps)
        if (
            self.gate_open_step is None
            and self.ce_ema is not None
            and state.global_step >= start
            and self.ce_ema < self.mod_loss_gate
        ):
            self.gate_open_step = state.global_step
            logger.info(f"MoD loss gate opened at step {state.global_step} (CE EMA {self.ce_ema:.3f})")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or any(k.startswith("eval_") for k in logs):
            return
        extra = {}
        if self.ce_ema is not None:
            extra["curriculum/ce_ema"] = float(self.ce_ema)
        extra["curriculum/gate_open_step"] = float(-1 if self.gate_open_step is None else self.gate_open_step)
        for key, value in self.last_settings.items():
            if isinstance(value, bool):
                extra[f"curriculum/{key}"] = float(value)
            elif isinstance(value, (int, float)):
                extra[f"curriculum/{key}"] = float(value)
            elif isinstance(value, list):
                for i, v in enumerate(value):
                    extra[f"curriculum/{key}/recursion_{i + 2}"] = float(v)
            elif key == "moe_forced":
                extra["curriculum/moe_forced"] = float(bool(value))
        add_to_logs(state, logs, extra)


# ---------------------------------------------------------------------------- metrics


class RoutingMetricsCallback(TrainerCallback):
    """Adds routing losses and statistics, the CE part of the loss, and tokens/s to the Trainer's logs.

    Every step's `model.routing_summary()` is averaged over the logging interval (`every_step=True`,
    one host sync per step) or only the last step before a log is reported (`every_step=False`).
    Keys: `routing/loss/<name>`, `routing/mod_fraction/layer_<i>` and `/mean`,
    `routing/mor_mean_depth/block_<b>`, `routing/mor_depth_hist/block_<b>/depth_<d>`,
    `routing/moe_tokens/block_<b>/expert_<e>`, `routing/moe_utilisation/block_<b>`,
    `routing/moe_entropy/block_<b>`, `train/ce_loss`, `train/aux_loss`, `train/tokens_per_second`.
    The Trainer itself logs `loss`, `grad_norm` (before clipping) and `learning_rate`.

    With an evaluation, the eval log also gets `eval_routing/...`: the statistics of the last eval
    batch, i.e. of the *causal inference* rule (MoD / MoR expert choice process a token iff its router
    logit > 0). Far from the training capacity means the routers' running threshold has not caught up
    (`router_threshold_momentum`; see docs/routing.md).
    """

    def __init__(self, every_step: bool = True):
        self.every_step = every_step
        self._sums: dict = {}
        self._count = 0
        self._losses: list = []
        self._model = None
        self._probe = None
        self._t0 = None
        self._tokens0 = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = unwrap(model)
        self._probe = LossProbe.attach(self._model)
        set_attached_aux_loss_scale(self._model, args)
        self._t0 = time.perf_counter()
        self._tokens0 = self._probe.tokens

    def _accumulate(self):
        summary = flatten_numbers(self._model.routing_summary())
        for k, v in summary.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self._model is None:
            return
        if self.every_step or control.should_log:
            self._accumulate()
        taken = self._probe.step_value(state.global_step)
        if taken is not None:
            self._losses.append(taken)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "eval_loss" in logs and self._model is not None:
            summary = flatten_numbers(self._model.routing_summary())  # the last eval batch (causal rule)
            extra = {"eval_" + k: v for k, v in summary.items() if k.startswith("routing/") and "/loss/" not in k}
            add_to_logs(state, logs, extra)
            return
        if any(k.startswith("eval_") for k in logs) or "loss" not in logs:
            return
        extra = {}
        if self._count:
            extra.update({k: v / self._count for k, v in self._sums.items()})
        if self._losses:
            extra["train/ce_loss"] = sum(l - a for l, a in self._losses) / len(self._losses)
            extra["train/aux_loss"] = sum(a for _, a in self._losses) / len(self._losses)
        now = time.perf_counter()
        if self._probe is not None and self._t0 is not None and now > self._t0:
            tokens = self._probe.tokens - self._tokens0
            extra["train/tokens_per_second"] = tokens / (now - self._t0)
            self._t0, self._tokens0 = now, self._probe.tokens
        self._sums, self._count, self._losses = {}, 0, []
        add_to_logs(state, logs, extra)


# ---------------------------------------------------------------------------- health


PARAMETER_GROUPS = ("embeddings", "attention", "mlp", "norms", "routers", "experts", "adapters", "other")


def parameter_group(name: str, owner=None) -> str:
    """The group of parameter `name` in health reports: one of `PARAMETER_GROUPS`. `owner` (the module holding it)
    lets any `*Norm` class count as a norm; PEFT adapter weights are "adapters", their frozen base weights keep the
    base layer's group."""
    dotted = "." + name
    if re.search(r"\.(lora_|ia3_|vera_|oft_|boft_|adaption_|prompt_encoder|prefix_encoder)", dotted):
        return "adapters"
    if (owner is not None and "norm" in type(owner).__name__.lower()) or re.search(r"norm\.(weight|bias)$", name):
        return "norms"
    if re.search(r"\.(mod_routers|mor_routers)\.|\.moe_blocks\.\d+\.gate\.", dotted):
        return "routers"
    if re.search(r"\.moe_blocks\.\d+\.experts\.", dotted):
        return "experts"
    if re.search(r"\.(embed_tokens|lm_head|recursion_embedding)(\.|$)", dotted):
        return "embeddings"
    if ".self_attn." in dotted:
        return "attention"
    if ".mlp." in dotted:
        return "mlp"
    return "other"


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") or any(
        parameter_group(n) == "adapters" for n, p in model.named_parameters() if p.requires_grad
    )


class HealthCallback(TrainerCallback, ExportableState):
    """Training health: parameters that do not train, loss spikes, gradient-norm outliers, collapsed routers;
    optional loss-spike LR cooldown and dynamic gradient clipping.

    What it finds goes to three places: the `hydra_hf.training` logger (warnings), the Trainer's logs
    (`log_history`, hence TensorBoard / `report_to`: numbers under `health/...`), and `<output_dir>/health.json`
    (the full record, rewritten when it changes; `hydra-report` turns it into its "Health" section).

    - **Parameters that do not train**, by group (`parameter_group`: embeddings, attention, mlp, norms, routers,
      experts, adapters, other): at train begin, every parameter with `requires_grad=False` ("trainable": false;
      under PEFT the frozen base model is expected and not an alert); after `frozen_check_steps` optimizer steps,
      every trainable parameter whose values did not change ("trainable": true, e.g. left out of the optimizer or
      with lr 0). Logged once as `health/frozen/<group>` / `health/not_updating/<group>` (parameter counts).
    - **Loss spikes**: a step whose loss exceeds mean + `spike_k` x std of the last `spike_window` non-spike
      losses (or is not finite). Always recorded (`health/spikes`, cumulative); with `spike_cooldown_steps` > 0
      the learning rate of every param group is also multiplied by `spike_lr_factor` for that many steps.
    - **Gradient-norm outliers**: a logged `grad_norm` (the Trainer's pre-clip norm of the step it logs) that is
      not finite or above `grad_outlier_factor` x the median of the last `grad_window` logged norms (once 5 are
      known). `health/grad_norm_outliers` (cumulative).
    - **Collapsed routers** (all-or-nothing), checked at every training log on the last training forward and at
      every evaluation on its last batch (the causal inference rule that generation uses; training's top-k keeps
      MoD and expert-choice MoR at their capacity, so that is where they collapse): a MoD layer selecting <=
      `collapse_tol` or
      >= 1 - `collapse_tol` of its candidate tokens (while MoD is on, the latter only below capacity 1); a MoR
      block sending >= 1 - `collapse_tol` of the tokens to one depth (while MoR is on; at capacity 1 all at full depth is
      expected); a MoE
      block giving >= 1 - `collapse_tol` of its token slots to its `num_experts_per_tok` busiest experts (not in
      dense warmup or forced routing). `health/collapsed_routers` / `eval_health/collapsed_routers` (count at
      that log). The record keeps every router that collapsed (first / last step, checks); only the ones still
      collapsed at the latest check of their mode are alerts (early in training, before the routers' running
      thresholds catch up, the inference rule often processes every token or none for a while).

    Args:
        frozen_check_steps: when the not-updating check runs (None/0 = off).
        frozen_action: "warn" (log a warning), "stop" (log an error and stop training at the check) or "raise"
            (raise `RuntimeError` at the check), for parameters that do not train (not-updating ones, and
            `requires_grad=False` ones outside PEFT).
        spike_window / spike_k / spike_lr_factor / spike_cooldown_steps: see above (cooldown 0 = off).
        grad_window / grad_outlier_factor: see above.
        collapse_tol: see above.
        dynamic_clip: set the Trainer's clipping threshold every step from the recent pre-clip gradient
            norms: `mean + clip_k * std` (or the `clip_percentile`-th percentile when given) of the last
            `clip_window` steps, clamped to [`clip_min`, `clip_max`]. Until `clip_window // 2` norms are
            known the threshold stays at the initial `args.max_grad_norm`.

    How the clipping is changed: the stock Trainer clips with `args.max_grad_norm` right before
    `optimizer.step()`; this callback assigns `args.max_grad_norm` in `on_step_begin`, so the very next
    clip uses it. Pre-clip norms are measured with `register_post_accumulate_grad_hook` on each parameter
    (the local gradient, before any DDP all-reduce). Requires `max_grad_norm > 0` in the arguments
    (0 disables clipping in the Trainer, so the callback then refuses to start).

    The LR cooldown scales `param_group["lr"]` after the scheduler has set it (in `on_step_end`), which is
    exact for transformers' `LambdaLR`-based schedules (they recompute the LR from the base each step).
    """

    FILE = "health.json"
    MAX_EVENTS = 100  # spikes / gradient-norm outliers kept in the record (the latest)

    def __init__(
        self,
        frozen_check_steps: int | None = 20,
        frozen_action: str = "warn",
        spike_window: int = 50,
        spike_k: float = 4.0,
        spike_lr_factor: float = 0.5,
        spike_cooldown_steps: int = 0,
        grad_window: int = 50,
        grad_outlier_factor: float = 4.0,
        collapse_tol: float = 0.01,
        dynamic_clip: bool = False,
        clip_window: int = 100,
        clip_k: float = 2.0,
        clip_percentile: float | None = None,
        clip_min: float = 0.1,
        clip_max: float = 10.0,
    ):
        if frozen_action not in ("warn", "stop", "raise"):
            raise ValueError(f"frozen_action must be one of 'warn', 'stop', 'raise', got {frozen_action!r}")
        if not 0.0 < spike_lr_factor <= 1.0:
            raise ValueError(f"spike_lr_factor must be in (0, 1], got {spike_lr_factor}")
        if clip_percentile is not None and not 0.0 < clip_percentile <= 100.0:
            raise ValueError(f"clip_percentile must be in (0, 100], got {clip_percentile}")
        if clip_min <= 0 or clip_max < clip_min:
            raise ValueError(f"need 0 < clip_min <= clip_max, got clip_min={clip_min}, clip_max={clip_max}")
        if grad_outlier_factor <= 1.0:
            raise ValueError(f"grad_outlier_factor must be > 1, got {grad_outlier_factor}")
        if not 0.0 <= collapse_tol < 0.5:
            raise ValueError(f"collapse_tol must be in [0, 0.5), got {collapse_tol}")
        self.frozen_check_steps = frozen_check_steps
        self.frozen_action = frozen_action
        self.spike_window = int(spike_window)
        self.spike_k = float(spike_k)
        self.spike_lr_factor = float(spike_lr_factor)
        self.spike_cooldown_steps = int(spike_cooldown_steps)
        self.grad_window = int(grad_window)
        self.grad_outlier_factor = float(grad_outlier_factor)
        self.collapse_tol = float(collapse_tol)
        self.dynamic_clip = bool(dynamic_clip)
        self.clip_window = int(clip_window)
        self.clip_k = float(clip_k)
        self.clip_percentile = clip_percentile
        self.clip_min = float(clip_min)
        self.clip_max = float(clip_max)
        # state (saved)
        self.loss_window: list = []
        self.grad_norm_window: list = []
        self.cooldown_left = 0
        self.spike_steps: list = []
        self.clip_threshold: float | None = None
        self.spikes: list = []  # {"step", "loss", "limit"}
        self.logged_grad_norms: list = []
        self.grad_norm_outliers: list = []  # {"step", "grad_norm", "median"}
        self.collapsed_routers: dict = {}  # "<mode> <router>" -> {"router", "mode", "what", "value", steps, count}
        self.frozen_parameters: list = []  # trainable, not changed by the check step
        # run-time
        self.requires_grad_false: list = []
        self.groups: dict = {}  # parameter name -> group
        self.peft = False
        self._snapshots = {}
        self._hooks = []
        self._sq = {}
        self._model = None
        self._probe = None
        self._last_grad_norm = None
        self._logged_frozen = False
        self._pending: dict = {}
        self._written = None

    def state(self) -> dict:
        return {
            "args": {
                "frozen_check_steps": self.frozen_check_steps,
                "frozen_action": self.frozen_action,
                "spike_window": self.spike_window,
                "spike_k": self.spike_k,
                "spike_lr_factor": self.spike_lr_factor,
                "spike_cooldown_steps": self.spike_cooldown_steps,
                "grad_window": self.grad_window,
                "grad_outlier_factor": self.grad_outlier_factor,
                "collapse_tol": self.collapse_tol,
                "dynamic_clip": self.dynamic_clip,
                "clip_window": self.clip_window,
                "clip_k": self.clip_k,
                "clip_percentile": self.clip_percentile,
                "clip_min": self.clip_min,
                "clip_max": self.clip_max,
            },
            "attributes": {
                "loss_window": list(self.loss_window),
                "grad_norm_window": list(self.grad_norm_window),
                "cooldown_left": self.cooldown_left,
                "spike_steps": list(self.spike_steps),
                "clip_threshold": self.clip_threshold,
                "spikes": list(self.spikes),
                "logged_grad_norms": list(self.logged_grad_norms),
                "grad_norm_outliers": list(self.grad_norm_outliers),
                "collapsed_routers": dict(self.collapsed_routers),
                "frozen_parameters": list(self.frozen_parameters),
            },
        }

    # ---- parameters that do not train
    @staticmethod
    def _fingerprint(p: torch.Tensor):
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        return flat[::stride].to("cpu", torch.float64, copy=True), float(flat.double().sum())

    def check_frozen(self, model) -> list:
        """Names of trainable parameters unchanged since the snapshot taken at train begin."""
        frozen = []
        for name, p in model.named_parameters():
            if not p.requires_grad or name not in self._snapshots:
                continue
            sample, total = self._snapshots[name]
            now_sample, now_total = self._fingerprint(p)
            if torch.equal(sample, now_sample) and total == now_total:
                frozen.append(name)
        return frozen

    def _census(self, model) -> None:
        modules = dict(model.named_modules())
        self.groups = {
            name: parameter_group(name, modules.get(name.rpartition(".")[0])) for name, _ in model.named_parameters()
        }
        self.requires_grad_false = [n for n, p in model.named_parameters() if not p.requires_grad]
        self.peft = _is_peft(model)

    def _by_group(self, names: list, trainable: bool, issue: str) -> list:
        out = {}
        for name in names:
            group = self.groups.get(name) or parameter_group(name)
            out.setdefault(group, []).append(name)
        total = {}  # the group's parameters (requires_grad=False entries) or its trainable ones (not-updating)
        frozen = set(self.requires_grad_false)
        for name, group in self.groups.items():
            if not trainable or name not in frozen:
                total[group] = total.get(group, 0) + 1
        return [
            {"group": g, "trainable": trainable, "issue": issue, "count": len(ns), "of": total.get(g, len(ns)),
             "names": ns}
            for g, ns in sorted(out.items(), key=lambda kv: PARAMETER_GROUPS.index(kv[0]))
        ]

    def _frozen_message(self, entries: list) -> str:
        return "; ".join(
            f"{e['group']}: {e['count']} of {e['of']} (e.g. {e['names'][0]})" for e in entries
        )

    # ---- collapsed routers
    def _collapses(self, summary: dict, model) -> list:
        """(key, router, what, value) for every router the summary shows collapsed to all-or-nothing."""
        state = getattr(model, "routing_state", None)
        config = getattr(model, "config", None)
        if state is None or config is None:
            return []
        tol, found = self.collapse_tol, []
        if state.mod_enabled:
            for key, value in summary.items():
                m = re.fullmatch(r"routing/mod_fraction/layer_(\d+)", key)
                if m and (value <= tol or (value >= 1 - tol and state.mod_capacity < 1 - tol)):
                    what = "selects no token" if value <= tol else "selects every token"
                    found.append((f"mod layer {m.group(1)}", f"MoD layer {m.group(1)}", what, value))
        caps = state.mor_capacity if isinstance(state.mor_capacity, list) else [state.mor_capacity]
        every_token_continues = all(c is not None and c >= 1 - tol for c in caps)  # capacity 1: all at full depth
        if state.mor_enabled:
            for key, hist in summary.items():
                m = re.fullmatch(r"routing/mor_depth_hist/block_(\d+)", key)
                if m and isinstance(hist, list) and hist and max(hist) >= 1 - tol:
                    depth = hist.index(max(hist)) + 1
                    if depth == len(hist) and every_token_continues:
                        continue
                    found.append((f"mor block {m.group(1)}", f"MoR block {m.group(1)}",
                                  f"sends every token to depth {depth}", max(hist)))
        top_k = getattr(config, "num_experts_per_tok", 1)
        if not state.moe_dense and state.moe_forced is None:
            for key, counts in summary.items():
                m = re.fullmatch(r"routing/moe_tokens/block_(\d+)", key)
                if not (m and isinstance(counts, list) and len(counts) > top_k and sum(counts) > 0):
                    continue
                busiest = sorted(range(len(counts)), key=lambda e: -counts[e])[:top_k]
                share = sum(counts[e] for e in busiest) / sum(counts)
                if share >= 1 - tol:
                    experts = ", ".join(str(e) for e in sorted(busiest))
                    found.append((f"moe block {m.group(1)}", f"MoE block {m.group(1)}",
                                  f"sends every token to expert(s) {experts}", share))
        return found

    def check_routers(self, model, step: int, mode: str) -> int:
        """Record the routers collapsed in the model's last forward; returns how many."""
        if model is None or not hasattr(model, "routing_summary"):
            return 0
        found = self._collapses(model.routing_summary(), model)
        now = set()
        for key, router, what, value in found:
            now.add(f"{mode} {key}")
            entry = self.collapsed_routers.get(f"{mode} {key}")
            if entry is None or not entry["collapsed_now"]:
                logger.warning(f"Health: {router} {what} ({mode} mode, value {value:.3f}) at step {step}")
            if entry is None:
                entry = self.collapsed_routers[f"{mode} {key}"] = {
                    "router": router, "mode": mode, "first_step": step, "count": 0}
            entry.update(what=what, value=float(value), last_step=step, count=entry["count"] + 1)
        for key, entry in self.collapsed_routers.items():  # at the latest check of this mode: still collapsed?
            if entry["mode"] == mode:
                entry["collapsed_now"], entry["checked_step"] = key in now, step
        return len(found)

    # ---- gradient-norm outliers
    def check_grad_norm(self, grad_norm: float, step: int) -> bool:
        window = [g for g in self.logged_grad_norms if math.isfinite(g)]
        median = float(torch.tensor(window, dtype=torch.float64).median()) if window else None
        outlier = not math.isfinite(grad_norm) or (
            len(window) >= 5 and median is not None and grad_norm > self.grad_outlier_factor * median
        )
        if outlier:
            self.grad_norm_outliers = (self.grad_norm_outliers + [
                {"step": step, "grad_norm": grad_norm if math.isfinite(grad_norm) else str(grad_norm),
                 "median": median}
            ])[-self.MAX_EVENTS:]
            logger.warning(
                f"Health: gradient norm {grad_norm:.4g} at step {step} "
                + (f"({grad_norm / median:.1f}x the median {median:.4g} of the last {len(window)} logged)"
                   if median and math.isfinite(grad_norm) else "(not finite)")
            )
        else:
            self.logged_grad_norms = (self.logged_grad_norms + [grad_norm])[-self.grad_window:]
        return outlier

    # ---- the record
    def report(self) -> dict:
        """The health record written to `health.json`: findings, and `alerts` (one line each) for the ones that
        need a look (an empty list = nothing alarming)."""
        frozen = self._by_group(self.requires_grad_false, False, "requires_grad=False")
        not_updating = self._by_group(self.frozen_parameters, True, f"unchanged after {self.frozen_check_steps} steps")
        alerts = []
        if frozen and not self.peft:
            alerts += [f"{e['group']}: {e['count']} of {e['of']} parameters have requires_grad=False" for e in frozen]
        alerts += [f"{e['group']}: {e['count']} of {e['of']} trainable parameters did not change in "
                   f"{self.frozen_check_steps} steps" for e in not_updating]
        if self.spikes:
            alerts.append(f"{len(self.spikes)} loss spike(s), steps {', '.join(str(s['step']) for s in self.spikes)}")
        if self.grad_norm_outliers:
            alerts.append(f"{len(self.grad_norm_outliers)} gradient-norm outlier(s), steps "
                          f"{', '.join(str(g['step']) for g in self.grad_norm_outliers)}")
        alerts += [f"{e['router']} {e['what']} ({e['mode']} mode: collapsed at {e['count']} check(s) from step "
                   f"{e['first_step']}, still at step {e['last_step']})"
                   for e in self.collapsed_routers.values() if e["collapsed_now"]]
        return {
            "alerts": alerts,
            "peft": self.peft,
            "parameters": {
                "groups": {g: sum(1 for v in self.groups.values() if v == g)
                           for g in PARAMETER_GROUPS if g in self.groups.values()},
                "requires_grad_false": frozen,
                "not_updating": not_updating,
                "not_updating_checked": bool(self.frozen_check_steps) and not self._snapshots,
            },
            "loss_spikes": list(self.spikes),
            "grad_norm_outliers": list(self.grad_norm_outliers),
            "collapsed_routers": list(self.collapsed_routers.values()),
            "settings": self.state()["args"],
        }

    def write(self, args, state) -> None:
        if not getattr(args, "output_dir", None) or not state.is_world_process_zero:
            return
        text = json.dumps(self.report(), indent=2)
        if text == self._written:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, self.FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        self._written = text

    # ---- clipping
    def compute_clip_threshold(self) -> float | None:
        norms = [g for g in self.grad_norm_window if math.isfinite(g)]
        if len(norms) < max(2, self.clip_window // 2):
            return None
        t = torch.tensor(norms, dtype=torch.float64)
        if self.clip_percentile is not None:
            value = float(torch.quantile(t, self.clip_percentile / 100.0))
        else:
            value = float(t.mean() + self.clip_k * t.std())
        return min(self.clip_max, max(self.clip_min, value))

    def _grad_hook(self, name):
        def hook(p):
            if p.grad is not None:
                self._sq[name] = p.grad.detach().float().pow(2).sum()
        return hook

    # ---- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        stored = _stored_state(state, type(self).__name__)
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        if state.global_step > 0 and stored:
            for key, value in stored.get("attributes", {}).items():
                setattr(self, key, value)
        self._model = unwrap(model)
        self._probe = LossProbe.attach(self._model)
        self._census(self._model)
        if self.requires_grad_false and not self.peft:
            entries = self._by_group(self.requires_grad_false, False, "requires_grad=False")
            logger.warning(
                f"Health: {len(self.requires_grad_false)} parameter(s) have requires_grad=False and will not "
                f"train: {self._frozen_message(entries)}"
            )
        self._snapshots = {}
        if self.frozen_check_steps and state.global_step < self.frozen_check_steps:
            self._snapshots = {
                n: self._fingerprint(p) for n, p in self._model.named_parameters() if p.requires_grad
            }
        if self.dynamic_clip:
            if not args.max_grad_norm or args.max_grad_norm <= 0:
                raise ValueError(
                    "HealthCallback(dynamic_clip=True) needs TrainingArguments.max_grad_norm > 0 (the Trainer "
                    "does not clip at all when it is 0); set it to the initial threshold, e.g. 1.0"
                )
            for h in self._hooks:
                h.remove()
            self._hooks = [
                p.register_post_accumulate_grad_hook(self._grad_hook(n))
                for n, p in self._model.named_parameters() if p.requires_grad
            ]
            if self.clip_threshold is not None:
                args.max_grad_norm = self.clip_threshold
        self.write(args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.dynamic_clip:
            threshold = self.compute_clip_threshold()
            if threshold is not None:
                self.clip_threshold = threshold
                args.max_grad_norm = threshold
        self._sq = {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.dynamic_clip and self._sq:
            total = math.sqrt(float(torch.stack([v.to("cpu") for v in self._sq.values()]).sum()))
            self._last_grad_norm = total
            if math.isfinite(total):
                self.grad_norm_window.append(total)
                self.grad_norm_window = self.grad_norm_window[-self.clip_window:]

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        taken = self._probe.step_value(state.global_step) if self._probe is not None else None
        if taken is not None:
            loss = taken[0]
            window = self.loss_window
            is_spike, limit = False, None
            if len(window) >= max(5, self.spike_window // 2) and math.isfinite(loss):
                t = torch.tensor(window, dtype=torch.float64)
                limit = float(t.mean() + self.spike_k * t.std())
                is_spike = loss > limit
            if not math.isfinite(loss):
                is_spike = True
            if is_spike:
                self.spike_steps.append(state.global_step)
                self.spikes = (self.spikes + [{"step": state.global_step,
                                               "loss": loss if math.isfinite(loss) else str(loss),
                                               "limit": limit}])[-self.MAX_EVENTS:]
                action = ""
                if self.spike_cooldown_steps > 0:
                    self.cooldown_left = self.spike_cooldown_steps
                    action = f"; LR x{self.spike_lr_factor} for {self.spike_cooldown_steps} steps"
                logger.warning(
                    f"Loss spike at step {state.global_step} (loss {loss:.4f}"
                    + (f" > {limit:.4f}" if limit is not None else "") + f"){action}"
                )
            else:
                window.append(loss)
                self.loss_window = window[-self.spike_window:]
        if self.cooldown_left > 0 and optimizer is not None:
            for group in optimizer.param_groups:
                if group.get("lr") is not None:
                    group["lr"] = group["lr"] * self.spike_lr_factor
            self.cooldown_left -= 1
        if self.frozen_check_steps and state.global_step == self.frozen_check_steps and self._snapshots:
            self.frozen_parameters = self.check_frozen(self._model)
            self._snapshots = {}
            unexpected = [] if self.peft else self.requires_grad_false
            if self.frozen_parameters:
                self._pending.update({
                    f"health/not_updating/{e['group']}": float(e["count"])
                    for e in self._by_group(self.frozen_parameters, True, "")
                })
            if self.frozen_parameters or unexpected:
                parts = []
                if self.frozen_parameters:
                    parts.append(
                        f"{len(self.frozen_parameters)} trainable parameter(s) did not change in the first "
                        f"{self.frozen_check_steps} steps: {', '.join(self.frozen_parameters)}"
                    )
                if unexpected:
                    parts.append(f"{len(unexpected)} parameter(s) have requires_grad=False: "
                                 + self._frozen_message(self._by_group(unexpected, False, "")))
                message = "; ".join(parts)
                self.write(args, state)
                if self.frozen_action == "raise":
                    raise RuntimeError(message)
                if self.frozen_action == "stop":
                    logger.error(message + " - stopping training")
                    control.should_training_stop = True
                elif self.frozen_parameters:
                    logger.warning(message)
            else:
                logger.info(f"Health: every trainable parameter moved in the first {self.frozen_check_steps} steps")
            self.write(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "eval_loss" in logs:
            n = self.check_routers(self._model, state.global_step, "eval")
            add_to_logs(state, logs, {"eval_health/collapsed_routers": float(n)})
            self.write(args, state)
            return
        if any(k.startswith("eval_") for k in logs) or "loss" not in logs:
            return
        extra = {"health/lr_cooldown_left": float(self.cooldown_left), "health/spikes": float(len(self.spike_steps))}
        if not self._logged_frozen:
            self._logged_frozen = True
            for e in self._by_group(self.requires_grad_false, False, ""):
                extra[f"health/frozen/{e['group']}"] = float(e["count"])
        extra.update(self._pending)
        self._pending = {}
        grad_norm = logs.get("grad_norm")
        if grad_norm is not None:
            self.check_grad_norm(float(grad_norm), state.global_step)
        extra["health/grad_norm_outliers"] = float(len(self.grad_norm_outliers))
        extra["health/collapsed_routers"] = float(self.check_routers(self._model, state.global_step, "train"))
        if self.dynamic_clip:
            extra["health/clip_threshold"] = float(args.max_grad_norm)
            if self._last_grad_norm is not None:
                extra["health/grad_norm_preclip"] = float(self._last_grad_norm)
        add_to_logs(state, logs, extra)
        self.write(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.write(args, state)


# ---------------------------------------------------------------------------- samples


class SampleGenerationCallback(TrainerCallback):
    """Generate from fixed prompts every `every_steps` steps and log the text.

    The text goes to the `hydra_hf.training` logger, to `self.samples` and to `<output_dir>/samples.jsonl`.
    Generation runs under `torch.random.fork_rng` so sampling never changes the training RNG stream
    (a resumed run stays identical). Needs a tokenizer: pass it here or to the Trainer (`processing_class`).
    """

    def __init__(self, prompts, every_steps: int = 500, max_new_tokens: int = 64, do_sample: bool = True,
                 temperature: float = 0.8, top_k: int | None = 50, seed: int = 0, tokenizer=None,
                 at_end: bool = True):
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("SampleGenerationCallback needs at least one prompt")
        self.prompts = list(prompts)
        self.every_steps = int(every_steps)
        self.max_new_tokens = int(max_new_tokens)
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.tokenizer = tokenizer
        self.at_end = at_end
        self.samples: list = []

    def generate(self, model, tokenizer, step: int) -> list:
        model = unwrap(model)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        texts = []
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(self.seed)
            for prompt in self.prompts:
                ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
                if ids.shape[1] == 0 and tokenizer.bos_token_id is not None:
                    ids = torch.tensor([[tokenizer.bos_token_id]], device=device)
                kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else tokenizer.eos_token_id)
                if self.do_sample:
                    kwargs.update(temperature=self.temperature, top_k=self.top_k)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
                texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
        if was_training:
            model.train()
        return texts

    def _run(self, args, state, model, tokenizer):
        tokenizer = self.tokenizer or tokenizer
        if tokenizer is None or model is None or not state.is_world_process_zero:
            return
        texts = self.generate(model, tokenizer, state.global_step)
        for prompt, text in zip(self.prompts, texts):
            record = {"step": state.global_step, "prompt": prompt, "text": text}
            self.samples.append(record)
            logger.info(f"[sample step {state.global_step}] {text!r}")
            if args.output_dir:
                os.makedirs(args.output_dir, exist_ok=True)
                with open(os.path.join(args.output_dir, "samples.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every_steps > 0 and state.global_step % self.every_steps == 0:
            self._run(args, state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.at_end and not (self.every_steps > 0 and state.global_step % self.every_steps == 0):
            self._run(args, state, model, processing_class)


# ---------------------------------------------------------------------------- best checkpoint


class BestCheckpointCallback(TrainerCallback):
    """Guards the *global* best checkpoint across resumes.

    transformers 5.23 keeps `best_metric`, `best_global_step` and `best_model_checkpoint` in
    `trainer_state.json` and restores them on resume, and its checkpoint rotation never deletes the best
    one (`test_global_best_checkpoint_survives_resume` in `tests/test_training.py` checks the best surviving a
    resume and a `save_total_limit=1` rotation, with this callback). This callback adds a belt to those braces: on every save
    it writes `<output_dir>/best_checkpoint.json` with the global best (metric, step, path); on a resumed
    start whose `TrainerState` has no best (e.g. resuming from a checkpoint copied without its state, or
    from one saved before the best was known while a later best exists on disk), it restores the better of
    the two so later, worse evaluations can never displace the best from before the resume.
    """

    FILE = "best_checkpoint.json"

    def on_train_begin(self, args, state, control, **kwargs):
        if args.metric_for_best_model is None:
            return
        path = os.path.join(args.output_dir, self.FILE)
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        better = (lambda a, b: a > b) if args.greater_is_better else (lambda a, b: a < b)
        if not os.path.isdir(record.get("checkpoint") or ""):
            return
        if state.best_metric is None or better(record["metric"], state.best_metric):
            state.best_metric = record["metric"]
            state.best_global_step = record["step"]
            state.best_model_checkpoint = record["checkpoint"]
            logger.info(f"Restored global best checkpoint {record['checkpoint']} ({record['metric']})")

    def on_save(self, args, state, control, **kwargs):
        if state.best_metric is None or state.best_model_checkpoint is None or not state.is_world_process_zero:
            return
        record = {"metric": state.best_metric, "step": state.best_global_step,
                  "checkpoint": state.best_model_checkpoint, "metric_name": args.metric_for_best_model}
        with open(os.path.join(args.output_dir, self.FILE), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)


__all__ = [
    "RoutingCurriculumCallback",
    "RoutingMetricsCallback",
    "HealthCallback",
    "PARAMETER_GROUPS",
    "parameter_group",
    "SampleGenerationCallback",
    "BestCheckpointCallback",
    "LossProbe",
    "add_callbacks",
    "flatten_numbers",
]
