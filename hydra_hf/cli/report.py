"""`hydra-report RUN_DIR`: a Markdown report and PNG plots of a HYDRA training run.

Reads the run's log history (`log_history.jsonl` written by `hydra-train`, else `trainer_state.json` in the
folder or its newest `checkpoint-*`) and `final_metrics.json` when present, and writes
`RUN_DIR/report/report.md` with: key metrics, best/final loss, loss at milestones (10/25/50/75/100% of
the steps), a MoD table per layer, a MoR table per block ("Layer | Avg depth | Depth histogram") and a MoE
balance table; plus `loss.png` (train + eval loss), `lr.png`, `grad_norm.png`, `mod_fraction.png`,
`mor_depth.png`, `moe_utilisation.png` (matplotlib, Agg backend; plots without data are skipped).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

from .errors import ArgumentParser, UsageError, run_cli


def load_history(run_dir: str) -> list[dict]:
    """The run's `log_history` entries (dicts with `step`)."""
    path = os.path.join(run_dir, "log_history.jsonl")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    candidates = [os.path.join(run_dir, "trainer_state.json")]
    checkpoints = sorted(glob.glob(os.path.join(run_dir, "checkpoint-*")),
                         key=lambda p: int(re.findall(r"(\d+)$", p)[0]) if re.findall(r"(\d+)$", p) else -1)
    candidates += [os.path.join(c, "trainer_state.json") for c in reversed(checkpoints)]
    for c in candidates:
        if os.path.isfile(c):
            with open(c, encoding="utf-8") as f:
                return json.load(f).get("log_history", [])
    raise FileNotFoundError(
        f"{run_dir!r} has no log_history.jsonl nor trainer_state.json (in it or in a checkpoint-* folder)"
    )


def series(history: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for entry in history:
        if key in entry and isinstance(entry[key], (int, float)):
            xs.append(entry.get("step", len(xs)))
            ys.append(float(entry[key]))
    return xs, ys


def last_values(history: list[dict], prefix: str) -> dict:
    out = {}
    for entry in history:
        for k, v in entry.items():
            if k.startswith(prefix) and isinstance(v, (int, float)):
                out[k] = float(v)
    return out


LAYER_RE = r"layer_(\d+)$"
BLOCK_RE = r"block_(\d+)$"


def _num(key: str, pattern: str):
    m = re.search(pattern, key)
    return int(m.group(1)) if m else None


def _fmt(v, digits=4):
    return "-" if v is None else f"{v:.{digits}f}"


def _names(names: list, shown: int = 3) -> str:
    text = ", ".join(f"`{n}`" for n in names[:shown])
    return text + (f" (+{len(names) - shown} more)" if len(names) > shown else "")


def health_section(run_dir: str) -> list[str]:
    """The "Health" section: `RUN_DIR/health.json`, written by `HealthCallback` (parameters that do not train,
    loss spikes, gradient-norm outliers, collapsed routers)."""
    lines = ["## Health", ""]
    path = os.path.join(run_dir, "health.json")
    if not os.path.isfile(path):
        return lines + ["No health record (`health.json`): the run had no `HealthCallback`.", ""]
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    alerts = record.get("alerts", [])
    if alerts:
        lines += ["**Alerts**", ""] + [f"- {a}" for a in alerts] + [""]
    else:
        lines += ["No alerts: every parameter trains, no loss spike, no gradient-norm outlier, no router collapsed "
                  "at its latest check.", ""]
    params = record.get("parameters", {})
    rows = params.get("requires_grad_false", []) + params.get("not_updating", [])
    if rows:
        lines += ["### Parameters that do not train", "",
                  "| Group | Trainable | Issue | Parameters | Names |", "|---|---|---|---|---|"]
        lines += [f"| {e['group']} | {'yes' if e['trainable'] else 'no'} | {e['issue']} | {e['count']} of {e['of']} | "
                  f"{_names(e['names'])} |" for e in rows]
        if record.get("peft") and params.get("requires_grad_false"):
            lines.append("\nPEFT run: the base model's `requires_grad=False` parameters are expected (not alerts).")
        lines.append("")
    if not params.get("not_updating_checked", True):
        lines += ["The not-updating check (`frozen_check_steps`) did not run.", ""]
    spikes = record.get("loss_spikes", [])
    if spikes:
        lines += ["### Loss spikes", "", "| Step | Loss | Limit (mean + k std) |", "|---|---|---|"]
        lines += [f"| {e['step']} | {e['loss']} | {e['limit']} |" for e in spikes] + [""]
    outliers = record.get("grad_norm_outliers", [])
    if outliers:
        lines += ["### Gradient-norm outliers", "", "| Step | Grad norm | Median of the window |", "|---|---|---|"]
        lines += [f"| {e['step']} | {e['grad_norm']} | {e['median']} |" for e in outliers] + [""]
    routers = record.get("collapsed_routers", [])
    if routers:
        lines += ["### Routers collapsed to all-or-nothing", "",
                  "| Router | Mode | What | Value | First step | Last step | Checks | Latest check |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in routers:
            now = "still collapsed" if e.get("collapsed_now") else f"recovered (step {e.get('checked_step')})"
            lines.append(f"| {e['router']} | {e['mode']} | {e['what']} | {e['value']:.3f} | {e['first_step']} | "
                         f"{e['last_step']} | {e['count']} | {now} |")
        lines.append("")
    return lines


def _legend(ax, **kwargs) -> None:
    """`ax.legend(...)` when the axes have labelled artists (matplotlib warns "No artists with labels found to
    put in legend" otherwise, e.g. a MoR histogram without depth data)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _config_mod_capacity(run_dir: str):
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        value = json.load(f).get("mod_capacity")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def build_report(run_dir: str, out_dir: str | None = None) -> str:
    """Write the report and plots; returns the Markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = load_history(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    metrics = {}
    mpath = os.path.join(run_dir, "final_metrics.json")
    if os.path.isfile(mpath):
        with open(mpath, encoding="utf-8") as f:
            metrics = json.load(f)

    steps, loss = series(history, "loss")
    esteps, eloss = series(history, "eval_loss")
    lsteps, lr = series(history, "learning_rate")
    gsteps, gnorm = series(history, "grad_norm")
    max_step = max([e.get("step", 0) for e in history] or [0])

    lines = [f"# HYDRA training report: `{os.path.abspath(run_dir)}`", ""]
    lines += ["## Key metrics", "", "| Metric | Value |", "|---|---|"]
    lines.append(f"| Steps | {max_step} |")
    if "num_parameters" in metrics:
        lines.append(f"| Parameters | {metrics['num_parameters'] / 1e6:.2f}M |")
    lines.append(f"| Final train loss | {_fmt(loss[-1] if loss else None)} |")
    lines.append(f"| Final eval loss | {_fmt(eloss[-1] if eloss else None)} |")
    if eloss:
        i = min(range(len(eloss)), key=lambda j: eloss[j])
        lines.append(f"| Best eval loss | {_fmt(eloss[i])} (step {esteps[i]}) |")
    if loss:
        lines.append(f"| Best train loss | {_fmt(min(loss))} |")
    _, tps = series(history, "train/tokens_per_second")
    if tps:
        lines.append(f"| Mean tokens/s | {sum(tps) / len(tps):,.0f} |")
    if "wall_clock_s" in metrics:
        lines.append(f"| Wall clock | {metrics['wall_clock_s']:.0f} s |")
    if metrics.get("best_model_checkpoint"):
        lines.append(f"| Best checkpoint | `{metrics['best_model_checkpoint']}` |")
    lines.append("")

    if loss:
        lines += ["## Loss at milestones", "",
                  "Train loss at the logged step nearest to each milestone; eval loss of the last evaluation at "
                  "or before that step, with the step it ran at.", "",
                  "| Progress | Step | Train loss | Eval loss | Eval step |", "|---|---|---|---|---|"]
        for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
            target = frac * max_step
            i = min(range(len(steps)), key=lambda j: abs(steps[j] - target))
            done = [k for k in range(len(esteps)) if esteps[k] <= steps[i]]
            ev, estep = (eloss[done[-1]], esteps[done[-1]]) if done else (None, None)
            lines.append(f"| {int(frac * 100)}% | {steps[i]} | {_fmt(loss[i])} | {_fmt(ev)} | "
                         f"{'-' if estep is None else estep} |")
        lines.append("")

    # MoD
    mod_keys = sorted({k for e in history for k in e if k.startswith("routing/mod_fraction/layer_")},
                      key=lambda k: _num(k, r"layer_(\d+)$"))
    lines += ["## Mixture-of-Depths", ""]
    if mod_keys:
        lines += ["Training fraction: top-k selection (pinned near the capacity while MoD is on). Eval mode: the "
                  "causal rule (router logit > 0) that generation uses, measured on the last eval batch.", "",
                  "| Layer | Training fraction (last) | Training mean over run | Eval-mode fraction (last eval) |",
                  "|---|---|---|---|"]
        for k in mod_keys:
            _, ys = series(history, k)
            _, eys = series(history, "eval_" + k)
            lines.append(f"| {_num(k, LAYER_RE)} | {ys[-1]:.3f} | {sum(ys) / len(ys):.3f} | "
                         f"{_fmt(eys[-1] if eys else None, 3)} |")
    else:
        lines.append("No MoD statistics were logged (model built without MoD, or no RoutingMetricsCallback).")
    lines.append("")

    # MoR
    lines += ["## Mixture-of-Recursions", ""]
    depth_keys = sorted({k for e in history for k in e if re.match(r"routing/mor_mean_depth/block_\d+$", k)},
                        key=lambda k: _num(k, r"block_(\d+)$"))
    last = last_values(history, "routing/mor_depth_hist/")
    if depth_keys:
        lines += ["| Layer | Avg depth | Depth histogram | Eval-mode avg depth (last eval) |", "|---|---|---|---|"]
        for k in depth_keys:
            b = _num(k, r"block_(\d+)$")
            _, ys = series(history, k)
            _, eys = series(history, "eval_" + k)
            hist = sorted(((int(_num(h, r"depth_(\d+)$")), v) for h, v in last.items()
                           if h.startswith(f"routing/mor_depth_hist/block_{b}/")))
            text = " · ".join(f"d{d}: {'█' * int(round(v * 10))}{'░' * (10 - int(round(v * 10)))} {v * 100:.0f}%"
                              for d, v in hist)
            lines.append(f"| block {b} | {ys[-1]:.2f} | {text} | {_fmt(eys[-1] if eys else None, 2)} |")
    else:
        lines.append("No MoR statistics were logged.")
    lines.append("")

    # MoE
    lines += ["## Mixture-of-Experts balance", ""]
    util = last_values(history, "routing/moe_utilisation/")
    ent = last_values(history, "routing/moe_entropy/")
    toks = last_values(history, "routing/moe_tokens/")
    if util:
        lines += ["| Block | Utilisation | Entropy | Token share per expert |", "|---|---|---|---|"]
        for k in sorted(util, key=lambda k: _num(k, r"block_(\d+)$")):
            b = _num(k, r"block_(\d+)$")
            counts = sorted(((int(_num(t, r"expert_(\d+)$")), v) for t, v in toks.items()
                             if t.startswith(f"routing/moe_tokens/block_{b}/")))
            total = sum(v for _, v in counts) or 1.0
            share = ", ".join(f"e{e}: {v / total * 100:.0f}%" for e, v in counts)
            lines.append(f"| {b} | {util[k]:.2f} | {_fmt(ent.get(f'routing/moe_entropy/block_{b}'), 3)} | {share} |")
    else:
        lines.append("No MoE statistics were logged.")
    lines.append("")

    lines += health_section(run_dir)

    # plots
    plots = []

    def save(fig, name, title):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots.append((title, name))

    if loss or eloss:
        fig, ax = plt.subplots(figsize=(7, 4))
        if loss:
            ax.plot(steps, loss, label="train loss")
        if eloss:
            ax.plot(esteps, eloss, "o-", label="eval loss")
        ax.set_xlabel("step"), ax.set_ylabel("loss"), _legend(ax), ax.grid(alpha=0.3)
        save(fig, "loss.png", "Loss")
    if lr:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(lsteps, lr)
        ax.set_xlabel("step"), ax.set_ylabel("learning rate"), ax.grid(alpha=0.3)
        save(fig, "lr.png", "Learning rate")
    if gnorm:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(gsteps, gnorm, label="grad norm (pre-clip)")
        cs, cv = series(history, "health/clip_threshold")
        if cv:
            ax.plot(cs, cv, "--", label="clip threshold")
        ax.set_xlabel("step"), ax.set_ylabel("grad norm"), _legend(ax), ax.grid(alpha=0.3)
        save(fig, "grad_norm.png", "Gradient norm")
    if mod_keys:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for k in mod_keys:
            xs, ys = series(history, k)
            line, = ax.plot(xs, ys, label=f"layer {_num(k, LAYER_RE)} training (top-k)")
            exs, eys = series(history, "eval_" + k)
            if eys:
                ax.plot(exs, eys, "o--", color=line.get_color(), label=f"layer {_num(k, LAYER_RE)} eval mode")
        # the capacity the top-k selection targets (the curriculum's, else the config's), on the whole 0-1 range:
        # a zoomed axis makes ordinary noise around the target look dramatic
        cxs, cys = series(history, "curriculum/mod_capacity")
        capacity = _config_mod_capacity(run_dir)
        if cys:
            ax.plot(cxs, cys, "k:", linewidth=1.2, label="capacity target")
        elif capacity is not None:
            ax.axhline(capacity, color="k", linestyle=":", linewidth=1.2, label="capacity target")
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("step"), ax.set_ylabel("MoD selected fraction"), _legend(ax, fontsize=7), ax.grid(alpha=0.3)
        save(fig, "mod_fraction.png", "MoD selected fraction per layer: training (top-k) and eval mode (causal rule)")
    if depth_keys:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for k in depth_keys:
            xs, ys = series(history, k)
            line, = axes[0].plot(xs, ys, label=f"block {_num(k, BLOCK_RE)} training")
            exs, eys = series(history, "eval_" + k)
            if eys:
                axes[0].plot(exs, eys, "o--", color=line.get_color(), label=f"block {_num(k, BLOCK_RE)} eval mode")
        axes[0].set_xlabel("step"), axes[0].set_ylabel("mean depth"), _legend(axes[0], fontsize=7)
        blocks = [_num(k, r"block_(\d+)$") for k in depth_keys]
        bottom = [0.0] * len(blocks)
        depths = sorted({_num(h, r"depth_(\d+)$") for h in last})
        for d in depths:
            vals = [last.get(f"routing/mor_depth_hist/block_{b}/depth_{d}", 0.0) for b in blocks]
            axes[1].bar([str(b) for b in blocks], vals, bottom=bottom, label=f"depth {d}")
            bottom = [x + y for x, y in zip(bottom, vals)]
        axes[1].set_xlabel("block"), axes[1].set_ylabel("fraction of tokens (last log)"), _legend(axes[1], fontsize=7)
        save(fig, "mor_depth.png", "MoR depth")
    if util:
        fig, ax = plt.subplots(figsize=(7, 3))
        for k in sorted(util):
            xs, ys = series(history, k)
            ax.plot(xs, ys, label=k.rsplit("/", 1)[-1])
        for k in sorted(ent):
            xs, ys = series(history, k)
            ax.plot(xs, ys, "--", label="entropy " + k.rsplit("/", 1)[-1])
        ax.set_xlabel("step"), ax.set_ylabel("utilisation / entropy"), _legend(ax, fontsize=7), ax.grid(alpha=0.3)
        save(fig, "moe_utilisation.png", "MoE utilisation")

    if plots:
        lines += ["## Plots", ""]
        for title, name in plots:
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    samples_path = os.path.join(run_dir, "samples.jsonl")
    if os.path.isfile(samples_path):
        with open(samples_path, encoding="utf-8") as f:
            samples = [json.loads(line) for line in f if line.strip()]
        if samples:
            lines += ["## Samples (last step)", ""]
            final = max(s["step"] for s in samples)
            for s in samples:
                if s["step"] == final:
                    lines += [f"Step {s['step']}, prompt `{s['prompt']!r}`:", "", "```", s["text"], "```", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def main(argv=None) -> int:
    p = ArgumentParser(prog="hydra-report", description="Markdown report + PNG plots of a HYDRA run.")
    p.add_argument("run_dir", help="hydra-train --output_dir (or any Trainer output_dir)")
    p.add_argument("--out", help="where to write report.md and the plots (default RUN_DIR/report)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of a user error")
    args = p.parse_args(argv)

    def body():
        try:
            path = build_report(args.run_dir, args.out)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from exc
        print(f"hydra-report: wrote {path}")
        return 0

    return run_cli("hydra-report", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
