"""Whole-run figures that survive checkpoint / resume: mean training loss, wall clock, segments.

The Trainer's own `train_loss` and `train_runtime` after `trainer.train(resume_from_checkpoint=...)` cover
only the part of the run done in that call. `RunTotalsCallback` keeps running totals in the checkpoints
(through the Trainer's `stateful_callbacks`, like the routing curriculum), so that after any number of
resumes `totals(...)` gives figures for the whole run:

- `train_loss`: mean per-step training loss over every optimizer step of the run whose loss was logged
  (the Trainer's `loss` entries, each the mean since the previous log) plus the final call's unlogged tail;
- `wall_clock_s`: the wall clock of every segment up to the checkpoint the next segment resumed from,
  plus the current segment. Work done after a segment's last checkpoint (lost when it was killed and redone
  after the resume) is not counted, nor are the setup seconds (tokenizer, data) of a resumed segment before
  its first training step;
- `train_seconds`: the same, counting only time inside `trainer.train`;
- `segments`: how many `train` calls (1 = never resumed).
"""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class RunTotalsCallback(TrainerCallback, ExportableState):
    """Running totals of the whole run, checkpointed with the Trainer's state.

    `started_at`: the `time.time()` the process started its work (e.g. before tokenizer training), so a
    fresh run's wall clock includes that setup; default: the start of `trainer.train`.
    """

    def __init__(self, started_at: float | None = None):
        self.started_at = started_at
        self.prior_wall_clock_s = 0.0
        self.prior_train_seconds = 0.0
        self.loss_sum = 0.0
        self.loss_steps = 0
        self.segments = 0
        self._train_begin = None
        self._last_logged_step = self._begin_step = 0
        self._call_loss = (0.0, 0)  # (sum, steps) logged during this process's `train` call

    def state(self) -> dict:
        now = time.time()
        return {
            "args": {},
            "attributes": {
                "prior_wall_clock_s": self.prior_wall_clock_s + (now - self.started_at if self.started_at else 0.0),
                "prior_train_seconds": self.prior_train_seconds + (now - self._train_begin if self._train_begin
                                                                   else 0.0),
                "loss_sum": self.loss_sum,
                "loss_steps": self.loss_steps,
                "segments": self.segments + (1 if self._train_begin else 0),
            },
        }

    def on_train_begin(self, args, state, control, **kwargs):
        # on resume the TrainerState read from the checkpoint holds the totals saved with it (the Trainer
        # restores callback objects only with `restore_callback_states_from_checkpoint`, so read them here)
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        stored = stored[0] if isinstance(stored, list) and stored else stored
        if state.global_step > 0 and isinstance(stored, dict):
            for key, value in (stored.get("attributes") or {}).items():
                setattr(self, key, value)
        self._train_begin = time.time()
        if self.started_at is None:
            self.started_at = self._train_begin
        self._last_logged_step = self._begin_step = state.global_step
        self._call_loss = (0.0, 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or any(k.startswith("eval_") for k in logs):
            return
        steps = state.global_step - self._last_logged_step
        if steps > 0 and isinstance(logs["loss"], (int, float)):
            self.loss_sum += float(logs["loss"]) * steps
            self.loss_steps += steps
            self._call_loss = (self._call_loss[0] + float(logs["loss"]) * steps, self._call_loss[1] + steps)
            self._last_logged_step = state.global_step

    def totals(self, segment_train_loss: float | None = None, global_step: int | None = None,
               now: float | None = None) -> dict:
        """Whole-run figures at the end of a `train` call.

        `segment_train_loss`: the Trainer's `train_loss` metric of this call, `global_step` the step it ended
        at; together they replace this call's logged steps so that its unlogged tail is counted too.
        """
        now = time.time() if now is None else now
        segment_steps = global_step - self._begin_step if global_step is not None else 0
        loss_sum, loss_steps = self.loss_sum, self.loss_steps
        if segment_train_loss is not None and segment_steps:
            # this call's logged steps are inside loss_sum: replace them by its exact mean over all its steps
            loss_sum += segment_train_loss * segment_steps - self._call_loss[0]
            loss_steps += segment_steps - self._call_loss[1]
        return {
            "train_loss": loss_sum / loss_steps if loss_steps else None,
            "train_loss_steps": loss_steps,
            "wall_clock_s": self.prior_wall_clock_s + (now - self.started_at if self.started_at else 0.0),
            "train_seconds": self.prior_train_seconds + (now - self._train_begin if self._train_begin else 0.0),
            "segments": self.segments + (1 if self._train_begin else 0),
        }


__all__ = ["RunTotalsCallback"]
