"""What a user sees from `hydra-train` and what a user without hydra_hf can load (issue 17, items 4 and 6).

- A short `hydra-train` run in a fresh process, its output going to a file (as `make demo > log`): a progress
  bar with the headline numbers and one line per evaluation, no dict of metrics per log, none of the startup
  warnings a user cannot act on (bitsandbytes' CPU 4-bit kernel, DataLoader `pin_memory` without an
  accelerator, "Token indices sequence length is longer than the specified maximum" for a >1M-character
  document, "The tokenizer has new PAD/BOS/EOS tokens"); every metric is in `log_history.jsonl` and
  `trainer_state.json`.
- The run folder's tokenizer is a plain `PreTrainedTokenizerFast`, and the model card's "without hydra_hf"
  snippet runs as written in a fresh interpreter where hydra_hf cannot be imported and stdin is closed: it loads
  the model (remote code) and the tokenizer (stock class), round-trips text and generates, without the remote-code
  prompt or the "model of type hydra to instantiate a model of type" warning.
- `examples/train_with_trainer.py` (the stock-Trainer recipe the docs point to) runs without the PAD/BOS/EOS
  realignment warning and without metric dicts on the console.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import BLOCK_HYDRA_HF
from transformers import AutoTokenizer
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

import hydra_hf  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDE_FOREIGN = "import sys; sys.modules['torchao'] = None; "  # see tests/test_bad_inputs_cli.py
UNWANTED = (
    "Failed to load CPU gemm_4bit_forward",  # bitsandbytes, imported through peft
    "pin_memory",  # torch DataLoader without an accelerator
    "Token indices sequence length is longer than the specified maximum",  # packing a 1.1M-character document
    "PAD/BOS/EOS",  # Trainer realigning the config's special tokens to the tokenizer's
    "Traceback",
    "Warning:",  # any Python warning (UserWarning: ..., FutureWarning: ...)
)
DICT_LINE = re.compile(r"\{'(loss|eval_loss|train_runtime|routing/|curriculum/)")


def _env(tmp_path):
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
                HF_MODULES_CACHE=str(tmp_path / "modules_cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    # one document of 1.1M characters: longer than the trained tokenizers' model_max_length (1e6)
    corpus = tmp / "one_long_document.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 35_000)
    out = tmp / "run"
    argv = ["--output_dir", str(out), "--data", str(corpus), "--tokenizer", "char", "--block_size", "32",
            "--batch_size", "4", "--max_steps", "4", "--set", "hidden_size=32", "--set", "intermediate_size=64",
            "--set", "max_position_embeddings=64", "--set", "data.eval_fraction=0.001",
            "--set", "training.logging_steps=2", "--set", "training.eval_steps=2", "--set", "training.save_steps=4",
            "--set", "samples.prompts=[]", "--set", "curriculum.mod_loss_gate=100"]
    code = HIDE_FOREIGN + "from hydra_hf.cli.train import main; sys.exit(main(sys.argv[1:]))"
    with open(tmp / "console.log", "w") as log:  # not a terminal, as `make demo > log 2>&1`
        proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp, env=_env(tmp), stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=600)
    console = (tmp / "console.log").read_text()
    assert proc.returncode == 0, console[-4000:]
    return out, console


def test_console_has_a_progress_bar_and_no_noise(run):
    out, console = run
    for text in UNWANTED:
        assert text not in console, (text, console)
    assert not DICT_LINE.search(console), console
    assert "routing/" not in console and "curriculum/" not in console, console
    # the bar's headline numbers and one line per evaluation (steps 2 and 4)
    assert re.search(r"loss \d+\.\d+ \| lr \d\.\d+e-\d+ \| tok/s [\d,]+ \| MoD \d\.\d\d \| depth \d\.\d\d", console), \
        console
    assert re.findall(r"eval at step (\d+): loss \d\.\d+ \(ppl", console) == ["2", "4"], console
    assert len(console) < 8000, len(console)


def test_every_metric_is_in_the_run_folder(run):
    out, _ = run
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    train_logs = [e for e in history if "loss" in e]
    assert [e["step"] for e in train_logs] == [2, 4]
    for key in ("routing/mod_fraction/mean", "routing/mor_mean_depth/mean", "train/tokens_per_second",
                "curriculum/mod_capacity", "grad_norm", "learning_rate"):
        assert all(key in e for e in train_logs), key
    assert [e["step"] for e in history if "eval_loss" in e] == [2, 4]
    assert all("eval_routing/mod_fraction/mean" in e for e in history if "eval_loss" in e)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["log_history"] == history
    args = torch.load(out / "training_args.bin", weights_only=False)
    accelerator = getattr(torch, "accelerator", None)
    assert args.dataloader_pin_memory == (accelerator.is_available() if accelerator else torch.cuda.is_available())


def test_saved_tokenizer_is_a_plain_fast_tokenizer(run):
    out, _ = run
    for folder in (out, out / "tokenizer"):
        tok_config = json.loads((folder / "tokenizer_config.json").read_text())
        assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast", folder
        assert "auto_map" not in tok_config
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64  # the model's context
    assert "AutoTokenizer" not in json.loads((out / "config.json").read_text())["auto_map"]
    # with hydra_hf imported (docs/training.md): AutoTokenizer, quietly
    with CaptureLogger(hf_logging.get_logger("transformers")) as log:
        tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("def add(a, b):").input_ids) == "def add(a, b):"
    assert "instantiate a model of type" not in log.out


BLOCKED = BLOCK_HYDRA_HF + 'sys.modules["torchao"] = None\n'


def _card_snippet(card: str) -> str:
    """The model card's code block for users without hydra_hf."""
    section = card.split("## How to load", 1)[1].split("Without it", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_card_snippet_without_the_package_loads_model_and_tokenizer(run, tmp_path):
    out, _ = run
    snippet = _card_snippet((out / "README.md").read_text())
    assert f'"{out.name}"' in snippet  # the card names the folder (the Hub repository once uploaded)
    check = r"""
text = "def add(a, b):\n    return a + b\n"
assert tokenizer.decode(tokenizer(text).input_ids) == text
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
from transformers import AutoTokenizer
auto = AutoTokenizer.from_pretrained(""" + repr(out.name) + r""", trust_remote_code=True)
assert auto.decode(auto(text).input_ids) == text
assert not any(m == "hydra_hf" or m.startswith("hydra_hf.") for m in sys.modules)
print("CHECKED")
"""
    proc = subprocess.run([sys.executable, "-c", BLOCKED + snippet + check], cwd=out.parent, env=_env(tmp_path),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "CHECKED" in proc.stdout
    assert "Do you wish to run the custom code" not in output
    assert "to instantiate a model of type" not in output


def test_stock_trainer_example_is_quiet(tmp_path):
    text = tmp_path / "code.txt"
    text.write_text("".join(f"def add_{i}(a, b):\n    return a + b * {i}\n\n" for i in range(400)))
    out = tmp_path / "example"
    code = HIDE_FOREIGN + "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "examples", "train_with_trainer.py"),
                           "--data", str(text), "--steps", "2", "--out", str(out)], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    # (bitsandbytes' own warning is left out here: a script that imports transformers' Trainer with peft and
    # bitsandbytes installed - hydra_hf[quant] - gets it from their imports; hydra_hf's command-line tools quiet it)
    for unwanted in UNWANTED[1:]:
        assert unwanted not in output, (unwanted, output)
    assert not DICT_LINE.search(output), output
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == 0
