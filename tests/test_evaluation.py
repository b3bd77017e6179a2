"""lm-evaluation-harness on HYDRA: its `hf` model's log-likelihoods equal a direct forward pass, do not depend
on the batch size, and the custom offline tasks of `examples/lm_eval_tasks` (docs/evaluation.md) run."""

import glob
import json
import math
import os
import subprocess
import sys

import lm_eval  # in the dev extras
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from conftest import tiny_model
from hydra_hf.training.data import build_char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "examples", "lm_eval_tasks")

REQUESTS = [
    ("def add(a, b):\n    ", "return a + b"),
    ("import ", "os"),
    ("for i in range(10):\n", "    print(i)"),
    ("class Parser:\n    def ", "__init__(self):"),
    ("x", " = 1"),
    ("while True:\n    line = f.readline()\n    if not line:\n        ", "break"),
    ("try:\n    value = int(text)\nexcept ", "ValueError:\n    value = None"),
    ("# a comment that is a little longer than the others, to make the batch ragged\n", "pass"),
    ("if __name__ == ", "'__main__':"),
    ("lambda x: ", "x * 2"),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny HYDRA with MoD + MoR + MoE on and a character tokenizer, saved like a hydra-train run."""
    text = "".join(a + b for a, b in REQUESTS) + "0123456789abcdefghijklmnopqrstuvwxyz"
    tok = build_char_tokenizer([text])
    model = tiny_model(vocab_size=len(tok), mod_enabled=True, mod_every=1, mor_enabled=True, moe_enabled=True,
                       moe_num_layers=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("lm_eval_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model.eval(), tok


def _harness(path, batch_size, **kwargs):
    return HFLM(pretrained=str(path), batch_size=batch_size, device="cpu", dtype="float32", **kwargs)


def _instances():
    return [Instance("loglikelihood", doc={}, arguments=req, idx=i) for i, req in enumerate(REQUESTS)]


def test_harness_loglikelihood_equals_direct_forward_and_ignores_batch_size(saved):
    path, model, tok = saved
    one = _harness(path, 1).loglikelihood(_instances())
    eight = _harness(path, 8).loglikelihood(_instances())
    direct = []
    with torch.no_grad():
        for context, continuation in REQUESTS:
            # the harness moves a context's trailing whitespace to the continuation
            n = len(context) - len(context.rstrip())
            context, continuation = (context[:-n], context[-n:] + continuation) if n else (context, continuation)
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            cont = tok(continuation, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            logprobs = model(ids[:, :-1]).logits.float().log_softmax(-1)[0, len(ctx) - 1:]
            direct.append(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum().item())
    diff_direct = max(abs(a[0] - d) for a, d in zip(one, direct))
    diff_batch = max(abs(a[0] - b[0]) for a, b in zip(one, eight))
    print(f"max |harness - direct forward| = {diff_direct:.2e}, max |batch 1 - batch 8| = {diff_batch:.2e}")
    assert diff_direct < 1e-5, diff_direct
    assert diff_batch < 1e-5, diff_batch
    assert all(isinstance(greedy, bool) for _, greedy in one)


def test_documented_cli_recipe_runs_the_custom_tasks_through_remote_code(saved, tmp_path, monkeypatch):
    """The command of docs/evaluation.md: `lm_eval --model hf` in a fresh process, which never imports
    hydra_hf, loads HYDRA through `trust_remote_code=True`; it scores the custom offline tasks exactly as the
    in-process harness with hydra_hf imported does."""
    path, _, _ = saved
    tasks = ["hydra_python_keyword_cloze", "hydra_python_source_perplexity"]
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={path},trust_remote_code=True,dtype=float32", "--include_path", TASKS,
           "--tasks", ",".join(tasks), "--device", "cpu", "--batch_size", "8",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (result_file,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    cli = json.loads(open(result_file).read())["results"]

    monkeypatch.chdir(ROOT)  # the tasks' data_files are relative to the repository root, as documented
    results = lm_eval.simple_evaluate(
        model=_harness(path, 8), tasks=tasks, task_manager=TaskManager(include_path=TASKS), bootstrap_iters=0,
        log_samples=False,
    )["results"]
    cloze, ppl = results["hydra_python_keyword_cloze"], results["hydra_python_source_perplexity"]
    assert 0.0 <= cloze["acc,none"] <= 1.0 and 0.0 <= cloze["acc_norm,none"] <= 1.0
    # an untrained model over a 40-odd character vocabulary: bits per byte near log2(vocab), far from 0
    assert 1.0 < ppl["bits_per_byte,none"] < 12.0
    assert ppl["byte_perplexity,none"] == pytest.approx(2 ** ppl["bits_per_byte,none"], rel=1e-6)
    for task in tasks:
        for metric in ("acc,none", "acc_norm,none", "bits_per_byte,none", "word_perplexity,none"):
            if metric in results[task]:
                assert cli[task][metric] == pytest.approx(results[task][metric], rel=1e-5), (task, metric)


def test_perplexity_recipe_scores_every_token_once(saved):
    """examples/perplexity.py (docs/evaluation.md): one window over a short document equals one full forward;
    a long document in strided windows scores each of its tokens exactly once."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        from perplexity import document_nll
    finally:
        sys.path.pop(0)
    _, model, tok = saved
    ids = torch.tensor([tok.bos_token_id] + tok("".join(a + b for a, b in REQUESTS[:3]),
                                                add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = model(ids[None]).logits[0].float().log_softmax(-1)
    full = -logprobs[:-1].gather(-1, ids[1:, None]).sum().item()
    nll, count = document_nll(model, ids, max_length=len(ids), stride=len(ids))
    assert count == len(ids) - 1 and nll == pytest.approx(full, rel=1e-5)
    windowed, count = document_nll(model, ids, max_length=16, stride=5)
    assert count == len(ids) - 1 and math.isfinite(windowed) and windowed != pytest.approx(full, rel=1e-6)
