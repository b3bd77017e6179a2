"""Small truths (issue 17, item 9): `hydra-train --help` does not contradict the README's measured time;
`hydra-report` draws no legend without labelled artists (no matplotlib warning); the MoD plot shows the
capacity target on a 0-1 axis instead of zooming into the noise around it."""

import json
import os
import re
import warnings

import pytest
from matplotlib.figure import Figure

from hydra_hf.cli import report as report_cli
from hydra_hf.cli import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_states_no_training_time_the_readme_does_not():
    help_text = train_cli.build_parser().format_help() + (train_cli.__doc__ or "")
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    readme_seconds = set(re.findall(r"(\d+) s of training", readme))
    for seconds in re.findall(r"(\d+) s of training", " ".join(help_text.split())):
        assert seconds in readme_seconds, f"--help says {seconds} s of training, the README {sorted(readme_seconds)}"


def _history(with_capacity: bool):
    history = []
    for i in range(1, 21):
        entry = {"step": i, "loss": 4.0 - 0.05 * i, "learning_rate": 1e-3, "grad_norm": 1.0,
                 "routing/mod_fraction/layer_1": 0.76 + 0.01 * (i % 3), "routing/mod_fraction/layer_3": 0.74,
                 "routing/mor_mean_depth/block_0": 1.5}  # no depth histogram: an empty MoR bar chart
        if with_capacity:
            entry["curriculum/mod_capacity"] = 0.75
        history.append(entry)
    history.append({"step": 20, "eval_loss": 3.1, "eval_routing/mod_fraction/layer_1": 0.6})
    return history


@pytest.fixture
def figures(monkeypatch):
    """The figures hydra-report saves, by file name."""
    saved = {}
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        saved[os.path.basename(str(fname))] = self
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


@pytest.mark.parametrize("source", ["curriculum log", "config.json"])
def test_report_mod_plot_has_the_capacity_target_on_a_0_1_axis_and_no_legend_warning(tmp_path, figures, source):
    history = _history(with_capacity=source == "curriculum log")
    (tmp_path / "log_history.jsonl").write_text("\n".join(json.dumps(h) for h in history))
    if source == "config.json":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "hydra", "mod_capacity": 0.75}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "No artists with labels found to put in legend"
        report_cli.build_report(str(tmp_path))
    ax = figures["mod_fraction.png"].axes[0]
    assert ax.get_ylim() == (0.0, 1.0)
    target = [line for line in ax.get_lines() if line.get_label() == "capacity target"]
    assert len(target) == 1 and set(target[0].get_ydata()) == {0.75}
    assert "capacity target" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert figures["mor_depth.png"].axes[1].get_legend() is None  # nothing labelled in the empty histogram
