"""Console progress for training runs: a tqdm bar with a few headline numbers, one line per evaluation.

The Trainer's own `ProgressCallback` writes every log dict into the console (with HYDRA's routing callbacks,
~28 keys / ~1.2 KB every `logging_steps`), and `PrinterCallback` (`disable_tqdm=True`) prints the same dicts.
`CompactProgressCallback` replaces both:

- the bar's postfix shows the headline numbers of the last log: ``loss``, ``lr``, ``tok/s``
  (`train/tokens_per_second`), ``MoD`` (`routing/mod_fraction/mean`) and ``depth``
  (`routing/mor_mean_depth/mean`), those that are logged;
- each evaluation prints one line (eval loss, and the eval-mode MoD fraction and depth);
- with `disable_tqdm=True`, each training log prints one line with the headline numbers instead of a bar;
- when the console is not a terminal (a log file, CI), the bar is redrawn every `1 / file_updates` of the run
  (every 5% by default) instead of ten times a second, so that a log file holds a few lines of progress
  whatever the speed of the machine, not one per step.

Every number stays in `state.log_history`, `trainer_state.json` and the `report_to` integrations (TensorBoard,
W&B); with `log_file`, each log entry is also appended to that JSON-lines file as the run goes (entries
already in the history - a resumed run's - are written first).

```python
from hydra_hf.training.progress import use_compact_progress
use_compact_progress(trainer, log_file="out/log_history.jsonl")
```
"""

from __future__ import annotations

import json
import math
import os
import sys

from transformers.trainer_callback import PrinterCallback, ProgressCallback

# (label, log key, format)
HEADLINE = (
    ("loss", "loss", "{:.4g}"),
    ("lr", "learning_rate", "{:.2e}"),
    ("tok/s", "train/tokens_per_second", "{:,.0f}"),
    ("MoD", "routing/mod_fraction/mean", "{:.2f}"),
    ("depth", "routing/mor_mean_depth/mean", "{:.2f}"),
)
EVAL_HEADLINE = (
    ("MoD", "eval_routing/mod_fraction/mean", "{:.2f}"),
    ("depth", "eval_routing/mor_mean_depth/mean", "{:.2f}"),
)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def headline(logs: dict, fields=HEADLINE) -> str:
    """``loss 2.37 | lr 2.94e-03 | tok/s 784 | MoD 0.75 | depth 1.61`` from a log dict (missing keys skipped)."""
    parts = []
    for label, key, fmt in fields:
        value = logs.get(key)
        if _number(value):
            parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)


def eval_line(logs: dict, step: int) -> str:
    loss = logs.get("eval_loss")
    text = f"eval at step {step}: loss {loss:.4f}" if _number(loss) else f"eval at step {step}:"
    if _number(loss) and loss < 50:
        text += f" (ppl {math.exp(loss):.2f})"
    rest = headline(logs, EVAL_HEADLINE)
    return text + (" | " + rest if rest else "")


class CompactProgressCallback(ProgressCallback):
    """`ProgressCallback` with the headline numbers in the bar's postfix instead of a dict per log line.

    Args:
        log_file: JSON-lines file that receives every log entry as it is logged (optional).
        file_updates: redraws of a bar over its whole length when stderr is not a terminal (the training bar;
            an evaluation bar gets a quarter as many).
    """

    def __init__(self, log_file: str | None = None, file_updates: int = 20):
        super().__init__()
        self.log_file = log_file
        self.file_updates = file_updates
        self.lines = False  # one printed line per training log instead of a bar (disable_tqdm=True)

    def _bar_options(self, total: int, updates: int) -> dict:
        """tqdm's defaults on a terminal; on a file, a redraw every `total / updates` iterations at most."""
        if getattr(sys.stderr, "isatty", lambda: False)():
            return {}
        # maxinterval: tqdm's monitor thread would otherwise drop miniters to 1 after 10 s without a redraw
        return {"miniters": max(1, int(total or 0) // max(1, updates)), "mininterval": 1.0, "maxinterval": 1e9}

    def on_train_begin(self, args, state, control, **kwargs):
        self.lines = bool(args.disable_tqdm)
        self.current_step = 0
        if state.is_world_process_zero and not self.lines:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True,
                                     **self._bar_options(state.max_steps, self.file_updates))
        if state.is_world_process_zero and self.log_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_file)), exist_ok=True)
            with open(self.log_file, "w", encoding="utf-8") as f:
                for entry in state.log_history:
                    f.write(json.dumps(entry, default=str) + "\n")

    def _advance(self, state) -> None:
        if self.training_bar is not None and state.global_step > self.current_step:
            self.training_bar.update(state.global_step - self.current_step)
        self.current_step = max(self.current_step, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log and self.training_bar is not None:
            return  # this step's log comes next: the bar moves in `on_log`, drawn with the new numbers
        self._advance(state)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.lines:
            return
        if state.is_world_process_zero and self.prediction_bar is None and eval_dataloader is not None:
            from tqdm.auto import tqdm
            from transformers.trainer_utils import has_length

            if has_length(eval_dataloader):
                total = len(eval_dataloader)
                self.prediction_bar = tqdm(total=total, leave=self.training_bar is None, dynamic_ncols=True,
                                           **self._bar_options(total, max(1, self.file_updates // 4)))
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def _write(self, text: str) -> None:
        if self.training_bar is not None:
            self.training_bar.write(text)
        else:
            print(text, flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not state.is_world_process_zero:
            return
        if self.log_file:
            entry = state.log_history[-1] if state.log_history else {**logs, "step": state.global_step}
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, default=str) + "\n")
        if "eval_loss" in logs or any(k.startswith("eval_") for k in logs):
            self._advance(state)
            self._write(eval_line(logs, state.global_step))
            return
        if "loss" not in logs:  # the end-of-training summary (train_runtime, ...): in the log history only
            self._advance(state)
            return
        text = headline(logs)
        if self.training_bar is not None:
            self.training_bar.set_postfix_str(text, refresh=False)
            self._advance(state)
        elif self.lines:
            total = f"/{state.max_steps}" if state.max_steps and state.max_steps > 0 else ""
            self._write(f"step {state.global_step}{total}: {text}")

    def on_train_end(self, args, state, control, **kwargs):
        self._advance(state)
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


def use_compact_progress(trainer, log_file: str | None = None, **kwargs) -> CompactProgressCallback:
    """Replace the Trainer's `ProgressCallback` / `PrinterCallback` with a `CompactProgressCallback`
    (added last, so that it sees the entries every other callback adds to the logs)."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    callback = CompactProgressCallback(log_file=log_file, **kwargs)
    trainer.add_callback(callback)
    return callback


__all__ = ["CompactProgressCallback", "EVAL_HEADLINE", "HEADLINE", "eval_line", "headline", "use_compact_progress"]
