"""Table of bad command-line inputs (issue 17).

Each bad input to `hydra-train` / `hydra-generate` ends with exit status 2 and exactly ONE line on stderr that
names the field or value and what is allowed, with no traceback, before any tokenizer or data work (training)
or model loading (generation); a run folder that already exists is left exactly as it was (same files, same
bytes, same modification times), also when the start fails later, on its data.
"""

import hashlib
import os
import subprocess
import sys

import pytest
import transformers

import hydra_hf.training.data as data_module
from hydra_hf.cli import generate as gen_cli
from hydra_hf.cli import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torchao is no dependency of hydra_hf; a broken one (pulled in by executorch) prints at `import transformers`
# in some environments: hidden in the subprocess runs, which check every byte of stderr
HIDE_FOREIGN = "import sys; sys.modules['torchao'] = None; "


def snapshot(folder) -> dict:
    """path -> (sha256, size, mtime_ns) of every file, and every folder, under `folder`."""
    out = {}
    for base, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(base, d), folder)] = "dir"
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (digest, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def existing_run(tmp_path):
    """A run folder from an earlier run: its files must survive every failed start."""
    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    (run / "checkpoint-5").mkdir()
    (run / "run_config.yaml").write_text("model:\n  preset: debug\n")
    (run / "tokenizer" / "tokenizer.json").write_text('{"earlier": "run"}')
    (run / "log_history.jsonl").write_text('{"loss": 3.0, "step": 5}\n')
    (run / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    return run


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Any tokenizer, data or model loading fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer / data / model work started before the input was checked")

    for name in ("load_or_train_tokenizer", "build_datasets", "build_char_tokenizer", "train_bpe_tokenizer"):
        monkeypatch.setattr(data_module, name, refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def one_line_error(capsys, main, argv, prog, after_progress=False):
    """Exit status 2 and one line on stderr; `after_progress`: the data work's progress bars may come first
    (the start failed on the data itself), the error is then the last line and the only error line."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    if after_progress:
        assert [line for line in lines if "error" in line.lower()] == lines[-1:], err
        lines = lines[-1:]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


TRAIN_CASES = {
    "max_steps negative": (["--max_steps", "-5"], ["--max_steps=-5", "allowed: an int >= 1, or -1"]),
    "max_steps zero": (["--max_steps", "0"], ["--max_steps=0", "allowed: an int >= 1"]),
    "max_steps not an int": (["--max_steps", "abc"], ["--max_steps", "invalid int value: 'abc'"]),
    "lr negative": (["--lr", "-0.001"], ["--lr=-0.001", "allowed: a number > 0"]),
    "lr zero": (["--lr", "0"], ["--lr=0.0", "allowed: a number > 0"]),
    "batch_size zero": (["--batch_size", "0"], ["--batch_size=0", "allowed: an int >= 1"]),
    "block_size one": (["--block_size", "1"], ["--block_size=1", "allowed: an int >= 2"]),
    "bpe vocab too small": (["--vocab_size", "100"], ["--vocab_size=100", "allowed: an int >= 258"]),
    "--set over a flag": (["--max_steps", "10", "--set", "training.max_steps=-3"],
                          ["training.max_steps=-3", "allowed: an int >= 1"]),
    "eval batch negative": (["--set", "training.per_device_eval_batch_size=-2"],
                            ["training.per_device_eval_batch_size=-2", "allowed: an int >= 1"]),
    "grad accumulation zero": (["--set", "training.gradient_accumulation_steps=0"],
                               ["training.gradient_accumulation_steps=0", "allowed: an int >= 1"]),
    "epochs zero": (["--set", "training.num_train_epochs=0"], ["training.num_train_epochs=0", "allowed: a number > 0"]),
    "warmup negative": (["--set", "optimizer.warmup_steps=-1"], ["optimizer.warmup_steps=-1", "allowed: an int >= 0"]),
    "decay fraction above 1": (["--set", "optimizer.decay_fraction=1.5"],
                               ["optimizer.decay_fraction=1.5", "allowed: a number >= 0 and <= 1"]),
    "betas out of range": (["--set", "optimizer.betas=[0.9, 1.5]"],
                           ["optimizer.betas=[0.9, 1.5]", "allowed: two numbers in [0, 1)"]),
    "eval fraction one": (["--set", "data.eval_fraction=1"], ["data.eval_fraction=1", "allowed: a number >= 0 and < 1"]),
    "sample tokens zero": (["--set", "samples.max_new_tokens=0"], ["samples.max_new_tokens=0", "allowed: an int >= 1"]),
    "sample temperature negative": (["--set", "samples.temperature=-1"],
                                    ["samples.temperature=-1", "allowed: a number >= 0"]),
}


@pytest.mark.parametrize("argv, expected", list(TRAIN_CASES.values()), ids=list(TRAIN_CASES))
def test_train_bad_value(existing_run, no_heavy_work, capsys, argv, expected):
    before = snapshot(existing_run)
    message = one_line_error(capsys, train_cli.main, ["--output_dir", str(existing_run), *argv], "hydra-train")
    for text in expected:
        assert text in message, message
    assert snapshot(existing_run) == before


def test_train_output_dir_that_cannot_be_made(tmp_path, no_heavy_work, capsys):
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    before = snapshot(tmp_path)
    cases = [
        ("/proc/hydra-run", ["--output_dir='/proc/hydra-run' cannot be created", "No such file or directory"]),
        (str(regular / "run"), [f"--output_dir='{regular / 'run'}' cannot be created", f"'{regular}' is a file"]),
        (str(regular / "a" / "b"), [f"'{regular}' is a file, not a folder"]),
        (str(regular), [f"--output_dir='{regular}' is a file, not a folder"]),
        ("", ["--output_dir='' is not allowed"]),
    ]
    for output_dir, expected in cases:
        message = one_line_error(capsys, train_cli.main, ["--output_dir", output_dir], "hydra-train")
        for text in expected + ["allowed: a new or existing folder you can write to"]:
            assert text in message, message
    assert snapshot(tmp_path) == before
    assert regular.read_text() == "keep me"


def test_train_failure_on_the_data_leaves_the_run_folder_as_it_was(tmp_path, existing_run, capsys):
    """The data is checked only once tokenized (too short for one block): the tokenizer and run_config.yaml
    must not have been written by then, and a folder made by the failed start is removed."""
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    argv = ["--data", str(short), "--tokenizer", "char", "--block_size", "64", "--set", "max_position_embeddings=64"]
    before = snapshot(existing_run)
    message = one_line_error(capsys, train_cli.main, ["--output_dir", str(existing_run), *argv], "hydra-train",
                             after_progress=True)
    assert "yields no block of 64 tokens" in message, message
    assert snapshot(existing_run) == before
    fresh = tmp_path / "new" / "run"
    message = one_line_error(capsys, train_cli.main, ["--output_dir", str(fresh), *argv], "hydra-train",
                             after_progress=True)
    assert "yields no block of 64 tokens" in message
    assert not (tmp_path / "new").exists()


@pytest.fixture
def model_dir_files(tmp_path):
    """A folder with the three kinds of file hydra-generate looks for (never loaded: the checks come first)."""
    d = tmp_path / "model"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (d / name).write_text("{}")
    return d


GENERATE_CASES = {
    "max_new_tokens zero": (["--max_new_tokens", "0"], ["--max_new_tokens=0", "allowed: an int >= 1"]),
    "temperature negative": (["--temperature", "-1"], ["--temperature=-1.0", "allowed: a number >= 0"]),
    "top_p zero": (["--top_p", "0"], ["--top_p=0.0", "allowed: a number > 0 and <= 1"]),
    "top_p above one": (["--top_p", "1.5"], ["--top_p=1.5", "allowed: a number > 0 and <= 1"]),
    "top_k negative": (["--top_k", "-1"], ["--top_k=-1", "allowed: an int >= 0"]),
    "num_beams zero": (["--num_beams", "0"], ["--num_beams=0", "allowed: an int >= 1"]),
    "max_new_tokens not an int": (["--max_new_tokens", "x"], ["--max_new_tokens", "invalid int value: 'x'"]),
}


@pytest.mark.parametrize("argv, expected", list(GENERATE_CASES.values()), ids=list(GENERATE_CASES))
def test_generate_bad_value(model_dir_files, no_heavy_work, capsys, argv, expected):
    message = one_line_error(capsys, gen_cli.main, [str(model_dir_files), *argv], "hydra-generate")
    for text in expected:
        assert text in message, message


def test_generate_folder_without_a_model(tmp_path, no_heavy_work, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = one_line_error(capsys, gen_cli.main, [str(empty)], "hydra-generate")
    for text in (f"model_dir '{empty}' has no config.json, no weights (model.safetensors), no tokenizer files",
                 "it is empty", "expected a hydra-train --output_dir or a save_pretrained folder"):
        assert text in message, message
    (empty / "config.json").write_text("{}")
    message = one_line_error(capsys, gen_cli.main, [str(empty)], "hydra-generate")
    assert "has no weights (model.safetensors), no tokenizer files (tokenizer.json) (it holds config.json);" in message
    message = one_line_error(capsys, gen_cli.main, [str(tmp_path / "missing")], "hydra-generate")
    assert "no such folder" in message


def _run(module, argv, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    code = HIDE_FOREIGN + f"from hydra_hf.cli.{module} import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=300)


def test_console_scripts_print_one_line_in_a_fresh_process(tmp_path, existing_run):
    """The whole stderr of a real process (imports included): one line, exit status 2."""
    before = snapshot(existing_run)
    proc = _run("train", ["--output_dir", str(existing_run), "--max_steps", "-5"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "hydra-train: error: --max_steps=-5 is not allowed; allowed: an int >= 1, or -1 "
        "(-1 = train for training.num_train_epochs epochs)"], proc.stderr
    assert proc.stdout == ""
    assert snapshot(existing_run) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run("generate", [str(empty)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "has no config.json" in proc.stderr, proc.stderr
