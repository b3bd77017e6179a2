"""CLI end to end: hydra-train on a tiny config, load with Auto classes, hydra-generate, resume, hydra-report,
and a two-process `accelerate launch` run on CPU (gloo)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

import hydra_hf  # noqa: F401
from hydra_hf.cli import generate as gen_cli
from hydra_hf.cli import report as report_cli
from hydra_hf.cli import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tokenizer", "char", "--block_size", "16", "--batch_size", "4",
        "--set", "hidden_size=32", "--set", "intermediate_size=64", "--set", "max_position_embeddings=64",
        "--set", "training.eval_steps=3", "--set", "training.save_steps=3", "--set", "training.logging_steps=1",
        "--set", "training.disable_tqdm=true", "--set", "optimizer.warmup_steps=1",
        "--set", "samples.max_new_tokens=8", "--set", "health.frozen_check_steps=2",
        "--set", "curriculum.mod_loss_gate=100"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    text = "".join(f"def add_{i}(a, b):\n    return a + b * {i}\n\n" for i in range(300))
    (d / "code.txt").write_text(text)
    return d / "code.txt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("run") / "out"
    rc = train_cli.main(["--output_dir", str(out), "--data", str(corpus), "--max_steps", "6", *TINY])
    assert rc == 0
    return out


def test_train_outputs_loadable_model(trained):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "log_history.jsonl", "trainer_state.json",
                 "run_config.yaml", "final_metrics.json", "samples.jsonl"):
        assert (trained / name).is_file(), name
    assert (trained / "checkpoint-6").is_dir()
    model = AutoModelForCausalLM.from_pretrained(str(trained))
    tok = AutoTokenizer.from_pretrained(str(trained))
    assert type(model).__name__ == "HydraForCausalLM" and model.config.hidden_size == 32
    assert model.config.vocab_size == len(tok)
    ids = tok("def ", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    history = [json.loads(line) for line in open(trained / "log_history.jsonl")]
    assert any("eval_loss" in e for e in history)
    assert any("routing/mod_fraction/mean" in e for e in history)
    metrics = json.loads((trained / "final_metrics.json").read_text())
    assert metrics["num_parameters"] > 0 and metrics["eval_loss"] > 0


def test_train_writes_hub_model_card(trained):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained / "README.md")
    metrics = json.loads((trained / "final_metrics.json").read_text())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"hydra", "custom_code", "mixture-of-depths", "mixture-of-recursions"} <= set(card.data.tags)
    assert f"| final eval loss | {metrics['eval_loss']:.4f} |" in card.text
    assert f"| parameters | {metrics['num_parameters'] / 1e6:.2f}M (input and output embeddings tied) |" in card.text
    for section in ("## Architecture", "### KV cache per token", "## Training and results", "## Intended use",
                    "## Limitations", "## How to train", "## How to load"):
        assert section in card.text, section
    assert "| hidden size | 32 |" in card.text and "trust_remote_code=True" in card.text


def test_generate_cli_streams(trained, capsys):
    assert gen_cli.main([str(trained), "--prompt", "def ", "--max_new_tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert gen_cli.main([str(trained / "nope")]) == 2


def test_resume_continues_from_checkpoint(trained):
    first = json.loads((trained / "final_metrics.json").read_text())
    assert first["segments"] == 1 and first["train_loss"] == pytest.approx(first["segment_train_loss"])
    with CaptureLogger(hf_logging.get_logger("transformers.trainer")) as trainer_log:
        rc = train_cli.main(["--output_dir", str(trained), "--resume", "--max_steps", "9"])
    assert rc == 0
    state = json.loads((trained / "trainer_state.json").read_text())
    assert state["global_step"] == 9
    assert "RoutingCurriculumCallback" in state["stateful_callbacks"]
    # the tied lm_head is re-tied quietly, not reported as a missing key
    assert "missing keys" not in trainer_log.out
    # whole-run figures: the mean over all 9 logged steps (logging_steps=1; logs round to 4 digits), both
    # segments' wall clock, and the card says so
    metrics = json.loads((trained / "final_metrics.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 9 and metrics["segments"] == 2
    assert metrics["train_loss"] == pytest.approx(sum(losses) / 9, abs=2e-4)
    assert metrics["segment_train_loss"] == pytest.approx(sum(losses[6:]) / 3, abs=2e-4)
    assert metrics["wall_clock_s"] > metrics["segment_wall_clock_s"] + 0.5 * first["wall_clock_s"]
    card = (trained / "README.md").read_text()
    assert f"| mean train loss over the run | {metrics['train_loss']:.4f} |" in card
    assert "2 segments, resumed 1 time" in card


def test_report_renders_with_plots(trained):
    path = report_cli.build_report(str(trained))
    text = open(path).read()
    for heading in ("## Key metrics", "## Loss at milestones", "## Mixture-of-Depths",
                    "| Layer | Avg depth | Depth histogram |", "## Mixture-of-Experts balance"):
        assert heading in text, heading
    for png in ("loss.png", "lr.png", "grad_norm.png", "mod_fraction.png", "mor_depth.png"):
        p = trained / "report" / png
        assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG", png
    assert report_cli.main([str(trained.parent / "missing")]) == 2


def test_report_milestones_use_real_eval_steps_and_eval_mode_routing(tmp_path):
    history = [{"step": i, "loss": 5.0 - 0.1 * i, "routing/mod_fraction/layer_1": 0.75,
                "routing/mor_mean_depth/block_0": 1.5} for i in range(1, 11)]
    history += [{"step": 4, "eval_loss": 4.44, "eval_routing/mod_fraction/layer_1": 0.61,
                 "eval_routing/mor_mean_depth/block_0": 1.25},
                {"step": 8, "eval_loss": 4.11, "eval_routing/mod_fraction/layer_1": 0.66,
                 "eval_routing/mor_mean_depth/block_0": 1.375}]
    (tmp_path / "log_history.jsonl").write_text("\n".join(json.dumps(h) for h in history))
    text = open(report_cli.build_report(str(tmp_path))).read()
    assert "| 10% | 1 | 4.9000 | - | - |" in text  # no eval had run by step 1
    assert "| 50% | 5 | 4.5000 | 4.4400 | 4 |" in text
    assert "| 75% | 7 | 4.3000 | 4.4400 | 4 |" in text  # the eval of step 8 had not run yet
    assert "| 100% | 10 | 4.0000 | 4.1100 | 8 |" in text
    assert "| 1 | 0.750 | 0.750 | 0.660 |" in text  # training (top-k) next to eval-mode fraction
    assert "| block 0 | 1.50 |  | 1.38 |" in text
    assert (tmp_path / "report" / "mod_fraction.png").is_file()


def test_report_moe_table(tmp_path):
    history = [{"step": 1, "loss": 3.0, "learning_rate": 1e-3, "grad_norm": 1.0,
                "routing/moe_utilisation/block_0": 0.75, "routing/moe_entropy/block_0": 1.2,
                "routing/moe_tokens/block_0/expert_0": 30.0, "routing/moe_tokens/block_0/expert_1": 10.0},
               {"step": 2, "eval_loss": 2.9}]
    (tmp_path / "log_history.jsonl").write_text("\n".join(json.dumps(h) for h in history))
    text = open(report_cli.build_report(str(tmp_path))).read()
    assert "| 0 | 0.75 | 1.200 | e0: 75%, e1: 25% |" in text
    assert (tmp_path / "report" / "moe_utilisation.png").is_file()


def test_set_errors_name_the_field():
    cfg = train_cli.resolve_config(train_cli.build_parser().parse_args([]))
    with pytest.raises(ValueError, match="no_such_field"):
        train_cli.apply_set(cfg, "no_such_field=1")
    with pytest.raises(ValueError, match="unknown section"):
        train_cli.apply_set(cfg, "modle.hidden_size=3")
    train_cli.apply_set(cfg, "hidden_size=48")
    train_cli.apply_set(cfg, "learning_rate=0.01")
    assert cfg["model"]["hidden_size"] == 48 and cfg["training"]["learning_rate"] == 0.01


def _user_error(capsys, argv):
    rc = train_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "Traceback" not in "\n".join(err)
    return err[0]


@pytest.mark.parametrize("argv, expected", [
    (["--set", "training.max_steps=abc"], ["training.max_steps='abc'", "expected int"]),
    (["--set", "training.eval_strategy=sometimes"], ["'sometimes'", "allowed: no, steps, epoch"]),
    (["--set", "optimizer.name=sgd"], ["'sgd'", "allowed: adamw"]),
    (["--set", "training.learnin_rate=0.1"], ["training.learnin_rate", "did you mean learning_rate"]),
    (["--set", "model.hidden_size=100"], ["num_attention_heads (4)", "25"]),
    (["--set", "curriculum.mod_loss_gat=3"], ["curriculum.mod_loss_gat", "mod_loss_gate"]),
    (["--data", "no_such_file.txt"], ["'no_such_file.txt'", "no such file"]),
    (["--preset", "3B"], ["invalid choice: '3B'", "1.5B"]),
    (["--resume"], ["--resume", "no checkpoint"]),
])
def test_cli_user_errors_exit_2_with_a_short_message(tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    if argv[0] == "--preset":
        with pytest.raises(SystemExit) as exc:
            train_cli.main(["--output_dir", str(out), *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        message = err[0]
    else:
        message = _user_error(capsys, ["--output_dir", str(out), *argv])
    assert message.startswith("hydra-train: error: ")
    for text in expected:
        assert text in message, message
    assert not (out / "tokenizer").exists()  # failed before any tokenizer training


def test_cli_empty_or_unreadable_data_says_so(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    message = _user_error(capsys, ["--output_dir", str(tmp_path / "o"), "--data", str(tmp_path / "empty.jsonl")])
    assert "empty.jsonl" in message and "is empty" in message
    (tmp_path / "body.jsonl").write_text('{"body": "x"}\n')
    message = _user_error(capsys, ["--output_dir", str(tmp_path / "o"), "--data", str(tmp_path / "body.jsonl")])
    assert "no 'text' field" in message and "['body']" in message
    folder = tmp_path / "nothing"
    folder.mkdir()
    message = _user_error(capsys, ["--output_dir", str(tmp_path / "o"), "--data", str(folder)])
    assert "matches no file" in message
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.txt"
        locked.write_text("text")
        locked.chmod(0)
        assert "cannot read" in _user_error(capsys, ["--output_dir", str(tmp_path / "o"), "--data", str(locked)])


def test_cli_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="training.max_steps='abc'"):
        train_cli.main(["--output_dir", str(tmp_path), "--set", "training.max_steps=abc", "--debug"])
    assert gen_cli.main([str(tmp_path / "nope")]) == 2
    assert report_cli.main([str(tmp_path / "nope")]) == 2


def test_accelerate_two_process_cpu(tmp_path, corpus):
    # `accelerate launch --cpu` starts ONE process (multi-CPU needs mpirun); the torchrun-based launcher
    # (`--multi_gpu`) with ACCELERATE_USE_CPU=1 starts two CPU processes that train with DDP over gloo.
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), ACCELERATE_USE_CPU="1",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hydra_hf.cli.train",
           "--output_dir", str(out), "--data", str(corpus), "--max_steps", "4", *TINY, "--set", "samples.prompts=[]"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["world_size"] == 2
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.hidden_size == 32


def test_gpu_path_flags_run_on_cpu(tmp_path, corpus):
    """--bf16 (autocast) and --gradient_checkpointing are TrainingArguments switches; they also run on CPU."""
    out = tmp_path / "flags"
    rc = train_cli.main(["--output_dir", str(out), "--data", str(corpus), "--max_steps", "2", *TINY,
                         "--bf16", "--gradient_checkpointing", "--liger", "--set", "samples.prompts=[]",
                         "--set", "training.eval_strategy=no", "--set", "training.save_strategy=no"])
    assert rc == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.bf16 and (getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing)
