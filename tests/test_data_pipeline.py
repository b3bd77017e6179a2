"""Data pipeline: mixtures from YAML, packing, held-out split, domain labels, tokenizers."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from hydra_hf.training.data import (DataConfig, PackedCollator, build_datasets, load_mixture_yaml,
                                    load_or_train_tokenizer, stdlib_corpus, stdlib_files)


@pytest.fixture
def mixture(tmp_path):
    (tmp_path / "a.txt").write_text(open("/work/shared/data/tinyshakespeare.txt").read()[:20000]
                                    if __import__("os").path.exists("/work/shared/data/tinyshakespeare.txt")
                                    else "To be, or not to be: that is the question.\n" * 400)
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"content": f"def f{i}(x):\n    return x * {i}\n"}) + "\n")
    (tmp_path / "mix.yaml").write_text(
        "sources:\n"
        "  - {path: a.txt, weight: 3, domain: 0}\n"
        "  - {path: b.jsonl, text_field: content, weight: 1, domain: 1}\n"
        "block_size: 32\neval_fraction: 0.1\nseed: 0\nstopping_strategy: first_exhausted\n")
    return tmp_path


def test_mixture_packing_split_and_domains(mixture):
    cfg = load_mixture_yaml(str(mixture / "mix.yaml"))
    tok = load_or_train_tokenizer("bpe", cfg, vocab_size=300, save_dir=str(mixture / "tok"))
    assert len(tok) == 300
    train, evaluation = build_datasets(cfg, tok)
    assert all(len(r) == 32 for r in train["input_ids"][:20])
    domains = train["domain_labels"]
    assert set(domains) == {0, 1}
    share = domains.count(0) / len(domains)
    assert 0.6 < share < 0.9  # weight 3:1
    assert set(evaluation["domain_labels"]) == {0, 1}
    # held-out blocks are not in the training set
    train_set = {tuple(r) for r in train["input_ids"]}
    assert not any(tuple(r) in train_set for r in evaluation["input_ids"])
    batch = PackedCollator()([train[0], train[1]])
    assert batch["input_ids"].shape == (2, 32) and batch["domain_labels"].dtype == torch.long
    assert torch.equal(batch["input_ids"], batch["labels"])
    assert "domain_labels" not in PackedCollator(pass_domain_labels=False)([train[0]])
    # the saved tokenizer loads with AutoTokenizer and round-trips text
    loaded = AutoTokenizer.from_pretrained(str(mixture / "tok"))
    text = "First Citizen:\ndef f(x):"
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.eos_token == "<|endoftext|>"


def test_char_tokenizer_and_errors(mixture):
    cfg = DataConfig(sources=[{"path": str(mixture / "a.txt")}], block_size=16, eval_fraction=0.05)
    tok = load_or_train_tokenizer("char", cfg, save_dir=str(mixture / "chartok"))
    ids = tok("First")["input_ids"]
    assert len(ids) == 5 and tok.decode(ids) == "First"
    loaded = AutoTokenizer.from_pretrained(str(mixture / "chartok"))
    assert loaded("a b\n")["input_ids"] == tok("a b\n")["input_ids"]
    with pytest.raises(ValueError, match="unknown data source key"):
        DataConfig(sources=[{"path": "x.txt", "wieght": 2}])
    with pytest.raises(ValueError, match="weight must be > 0"):
        DataConfig(sources=[{"path": "x.txt", "weight": 0}])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        build_datasets(DataConfig(sources=[{"path": str(mixture / "missing*.txt")}]), tok)
    with pytest.raises(ValueError, match="has no column"):
        build_datasets(DataConfig(sources=[{"path": str(mixture / "b.jsonl")}]), tok)


def test_stdlib_corpus_is_deterministic_python():
    files = stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert not any("/test/" in f or "site-packages" in f for f in files)
    a, b = stdlib_corpus(200_000), stdlib_corpus(200_000)
    assert a == b and sum(len(t) for t in a) >= 150_000
    assert any("def " in t for t in a) and any('"""' in t for t in a)


def test_streaming_source_path(mixture):
    cfg = DataConfig(sources=[{"path": str(mixture / "b.jsonl"), "text_field": "content", "streaming": True}],
                     block_size=16, eval_blocks=3)
    tok = load_or_train_tokenizer("char", DataConfig(sources=[{"path": str(mixture / "b.jsonl"),
                                                               "text_field": "content"}]))
    train, evaluation = build_datasets(cfg, tok)
    ev = list(evaluation)
    first_train = next(iter(train))
    assert len(ev) == 3 and len(first_train["input_ids"]) == 16
    assert first_train["input_ids"] not in [e["input_ids"] for e in ev]
