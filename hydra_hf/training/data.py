"""Data for training HYDRA with `datasets`: sources, mixtures, packing, held-out split, tokenizers.

A *source* is a dict (or a YAML entry):

```yaml
sources:
  - path: data/books/*.txt      # local .txt/.md/.py (text), .jsonl/.json (json), .parquet; file, glob or folder
    weight: 3                   # mixture weight (normalised over the sources)
    domain: 0                   # optional per-example domain label (MoE forced routing)
    text_field: text            # column holding the text (json/parquet/hub), default "text"
  - name: wikitext              # a Hugging Face Hub dataset name
    config: wikitext-103-raw-v1
    split: train
    streaming: true             # stream instead of downloading the whole set
    weight: 1
  - stdlib: true                # the embedded default corpus (the running Python's standard library)
    max_bytes: 4000000
block_size: 128
eval_fraction: 0.02
seed: 0
```

Every source is tokenized, each document followed by EOS, concatenated and cut into fixed-length blocks of
`block_size` tokens (`input_ids`, `labels`, and `domain_labels` when the source has a domain). The held-out
split is the last `eval_fraction` of each source's blocks (streaming sources: the first
`eval_blocks` blocks), so the eval set is a mixture too; the training split is a weighted interleave
(`datasets.interleave_datasets`).

Tokenizers (`load_or_train_tokenizer`): any HF tokenizer path/name, ``"bpe"`` (train a byte-level BPE of
`vocab_size` on the training text with `tokenizers`) or ``"char"`` (one token per character); the last
two are saved (`save_tokenizer`) as a plain `PreTrainedTokenizerFast` (`tokenizer.json` +
`tokenizer_config.json` naming that stock class, no `auto_map`), which loads without hydra_hf and without
remote code: `PreTrainedTokenizerFast.from_pretrained(folder)`, or `AutoTokenizer` (see `save_tokenizer`).
`special_token_ids(tokenizer)` gives the BOS / EOS / PAD ids for a `HydraConfig`, so that the config and the
tokenizer agree before a `Trainer` sees them.
"""

from __future__ import annotations

import glob
import os
import random
import sysconfig
from dataclasses import dataclass, field

import torch

EOS_TOKEN = "<|endoftext|>"
# model_max_length of the trained tokenizers while they pack documents (hydra-train saves the final model's
# tokenizer with the model's max_position_embeddings)
UNLIMITED_LENGTH = 1_000_000
TEXT_EXTENSIONS = (".txt", ".text", ".md", ".py", ".rst")
SOURCE_KEYS = {"path", "name", "config", "split", "streaming", "weight", "domain", "text_field", "stdlib",
               "max_bytes", "sample_by", "data_dir"}

_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
                "__pycache__", "ensurepip", "config-3"}


# ---------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    """What to train on. `sources` empty = the embedded stdlib corpus."""

    sources: list = field(default_factory=list)
    block_size: int = 128
    eval_fraction: float = 0.02
    eval_blocks: int = 64
    seed: int = 0
    stopping_strategy: str = "all_exhausted"
    num_proc: int | None = None

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.stopping_strategy not in ("first_exhausted", "all_exhausted"):
            raise ValueError(f"stopping_strategy must be 'first_exhausted' or 'all_exhausted', got "
                             f"{self.stopping_strategy!r}")
        self.sources = [normalise_source(s) for s in (self.sources or [])]


def normalise_source(spec) -> dict:
    """A source given as a string (path or hub name) or dict -> a checked dict."""
    if isinstance(spec, str):
        spec = {"path": spec} if (os.path.exists(spec) or any(c in spec for c in "*?")) else {"name": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"a data source must be a path, a hub dataset name or a mapping, got {spec!r}")
    unknown = set(spec) - SOURCE_KEYS
    if unknown:
        raise ValueError(f"unknown data source key(s) {sorted(unknown)}; allowed: {sorted(SOURCE_KEYS)}")
    kinds = [k for k in ("path", "name", "stdlib") if spec.get(k)]
    if len(kinds) != 1:
        raise ValueError(f"a data source needs exactly one of 'path', 'name', 'stdlib', got {spec!r}")
    weight = spec.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or weight <= 0:
        raise ValueError(f"data source weight must be > 0, got {weight!r} in {spec!r}")
    out = dict(spec)
    out.setdefault("weight", 1.0)
    out.setdefault("text_field", "text")
    out.setdefault("split", "train")
    return out


def load_mixture_yaml(path: str) -> DataConfig:
    """Read a mixture YAML (see the module docstring) into a `DataConfig`."""
    import yaml

    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if "sources" not in raw:
        raise ValueError(f"{path}: a data mixture file needs a 'sources' list")
    allowed = {f.name for f in DataConfig.__dataclass_fields__.values()}
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    base = os.path.dirname(os.path.abspath(path))
    for s in raw["sources"]:
        if isinstance(s, dict) and s.get("path") and not os.path.isabs(s["path"]):
            s["path"] = os.path.join(base, s["path"])
    return DataConfig(**raw)


# ---------------------------------------------------------------------------- raw text


def stdlib_files() -> list[str]:
    """The running Python's standard-library `.py` files (tests, IDLE and site-packages left out), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("config-"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                out.append(os.path.join(dirpath, name))
    if not out:
        raise RuntimeError(f"no standard-library .py files found under {root}")
    return out


def stdlib_corpus(max_bytes: int | None = 4_000_000, seed: int = 0) -> list[str]:
    """The embedded default corpus: the standard library's own source (with its docstrings and comments).

    Files are taken in a fixed pseudo-random order until `max_bytes` (None = all), so every machine with the
    same Python gets the same corpus.
    """
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    texts, total = [], 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        texts.append(text)
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            break
    return texts


def _local_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p))
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise FileNotFoundError(f"data source path {path!r} matches no file")
    return files


def check_source(source: dict) -> None:
    """Cheap checks of a local source before any tokenizer or `datasets` work: its files exist, can be read
    and are not all empty; the first record of a `.jsonl` file is a JSON object with the text field.
    Raises `FileNotFoundError` / `ValueError` naming the source. Hub and stdlib sources are not checked."""
    source = normalise_source(source)
    if not source.get("path"):
        return
    path = source["path"]
    files = _local_files(path)
    builder = _builder_for(files)
    sizes = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                head = fh.read(1 << 16)
        except OSError as exc:
            raise ValueError(f"data source {path!r}: cannot read {f!r} ({exc.strerror or exc})") from exc
        sizes[f] = (os.path.getsize(f), head)
    if all(size == 0 or not head.strip() for size, head in sizes.values()):
        what = f"file {files[0]!r} is" if len(files) == 1 else f"all {len(files)} files are"
        raise ValueError(f"data source {path!r}: {what} empty; it has no text to train on")
    if builder == "json":
        import json

        field_name = source.get("text_field", "text")
        for f, (size, head) in sizes.items():
            if not f.endswith(".jsonl") or not head.strip():
                continue
            line = head.strip().splitlines()[0]
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"data source {f!r}: its first line is not a JSON object ({exc})") from exc
            if not isinstance(record, dict) or field_name not in record:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"data source {f!r}: the first record has no {field_name!r} field "
                                 f"(fields: {fields}); set text_field")
            break


def _builder_for(files: list[str]) -> str:
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if exts <= set(TEXT_EXTENSIONS) or exts <= {""} | set(TEXT_EXTENSIONS):
        return "text"
    if exts <= {".jsonl", ".json"}:
        return "json"
    if exts <= {".parquet"}:
        return "parquet"
    raise ValueError(f"cannot mix or read file types {sorted(exts)}; use one of text ({', '.join(TEXT_EXTENSIONS)}), "
                     ".jsonl/.json or .parquet per source")


def load_source_dataset(source: dict):
    """The raw `datasets.Dataset` (or `IterableDataset` when streaming) of one source, with a `text` column."""
    import datasets

    source = normalise_source(source)
    streaming = bool(source.get("streaming", False))
    if source.get("stdlib"):
        ds = datasets.Dataset.from_dict({"text": stdlib_corpus(source.get("max_bytes", 4_000_000))})
        return ds.to_iterable_dataset() if streaming else ds
    if source.get("path"):
        files = _local_files(source["path"])
        builder = _builder_for(files)
        kwargs = {"sample_by": source.get("sample_by", "document")} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=streaming,
                                   **kwargs)
    else:
        ds = datasets.load_dataset(source["name"], source.get("config"), split=source.get("split", "train"),
                                   streaming=streaming, data_dir=source.get("data_dir"))
    text_field = source.get("text_field", "text")
    columns = ds.column_names
    if columns is None:  # an IterableDataset of unknown features: read them from the first record
        first = next(iter(ds), None)
        if first is None:
            raise ValueError(f"data source {source.get('path') or source.get('name')!r} has no records")
        columns = list(first.keys())
    if text_field not in columns:
        raise ValueError(f"data source {source.get('path') or source.get('name')!r} has no column "
                         f"{text_field!r} (columns: {columns}); set text_field")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    drop = [c for c in columns if c not in (text_field, "text")]
    if drop:
        ds = ds.remove_columns(drop)
    return ds


def iter_texts(source: dict, max_docs: int | None = None):
    """Yield a source's documents as strings (for tokenizer training)."""
    ds = load_source_dataset(source)
    for i, row in enumerate(ds):
        if max_docs is not None and i >= max_docs:
            break
        yield row["text"]


# ---------------------------------------------------------------------------- tokenizers


def train_bpe_tokenizer(texts, vocab_size: int = 4096, save_dir: str | None = None, min_frequency: int = 2):
    """Train a byte-level BPE of `vocab_size` on an iterable of strings; returns a `PreTrainedTokenizerFast`
    with `<|endoftext|>` as BOS/EOS/PAD (saved to `save_dir` when given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise ValueError(f"byte-level BPE needs vocab_size >= 258 (256 bytes + EOS + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                 pad_token=EOS_TOKEN, model_max_length=UNLIMITED_LENGTH)
    if save_dir:
        save_tokenizer(hf, save_dir)
    return hf


def build_char_tokenizer(texts, save_dir: str | None = None, add_eos: bool = True):
    """One token per character seen in `texts` (sorted), plus `<|endoftext|>` (id 0) when `add_eos`.

    Returned as a `PreTrainedTokenizerFast` (WordLevel over single characters, decoded without separators).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set().union(*(set(t) for t in texts)))
    vocab = {}
    if add_eos:
        vocab[EOS_TOKEN] = 0
    for c in chars:
        vocab[c] = len(vocab)
    unk = EOS_TOKEN if add_eos else chars[0]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    special = dict(bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN) if add_eos else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=UNLIMITED_LENGTH, **special)
    if save_dir:
        save_tokenizer(hf, save_dir)
    return hf


def save_tokenizer(tokenizer, save_dir: str) -> None:
    """`tokenizer.save_pretrained(save_dir)`; a tokenizer of the `tokenizers` library (the trained BPE / char
    ones) is recorded as the stock `PreTrainedTokenizerFast` class.

    transformers 5 names that class `TokenizersBackend` in `tokenizer_config.json`; `PreTrainedTokenizerFast`
    is the name both transformers 4 and 5 (and other readers of Hub tokenizers) resolve. No `auto_map` is
    written, so nothing routes the tokenizer to remote code. (`AutoTokenizer.from_pretrained` of a folder that
    also holds a HYDRA `config.json` still reads that config first - transformers always does - which needs
    `import hydra_hf` or `trust_remote_code=True`; `PreTrainedTokenizerFast.from_pretrained` does not.)
    """
    import json

    from transformers import PreTrainedTokenizerFast

    tokenizer.save_pretrained(save_dir)
    path = os.path.join(save_dir, "tokenizer_config.json")
    if type(tokenizer) is not PreTrainedTokenizerFast or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data.pop("auto_map", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def special_token_ids(tokenizer) -> dict:
    """`bos_token_id` / `eos_token_id` / `pad_token_id` of `tokenizer`, to pass to `HydraConfig` (or
    `HydraConfig.from_preset`): with the config and the tokenizer agreeing, the `Trainer` has nothing to
    realign (transformers warns "The tokenizer has new PAD/BOS/EOS tokens that differ from the model config"
    when they differ). A tokenizer without a PAD token pads with EOS, as `load_or_train_tokenizer` sets it."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}


def load_or_train_tokenizer(spec: str | None, data_config: DataConfig, vocab_size: int = 4096,
                            save_dir: str | None = None, max_train_docs: int | None = 20000):
    """`spec`: an HF tokenizer path/name, ``"bpe"`` (train on the training sources), or ``"char"``."""
    from transformers import AutoTokenizer

    sources = data_config.sources or [normalise_source({"stdlib": True})]
    if spec in (None, "bpe", "char"):
        def texts():
            for s in sources:
                yield from iter_texts(s, max_train_docs)

        if spec == "char":
            return build_char_tokenizer(list(texts()), save_dir)
        return train_bpe_tokenizer(texts(), vocab_size, save_dir)
    tok = AutoTokenizer.from_pretrained(spec)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {spec!r} has no EOS token; packing needs one between documents")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if save_dir:
        save_tokenizer(tok, save_dir)
    return tok


# ---------------------------------------------------------------------------- packing


def pack_dataset(ds, tokenizer, block_size: int, domain: int | None = None, num_proc: int | None = None):
    """Tokenize `text`, append EOS to every document, concatenate and cut into `block_size` blocks.

    Works on `Dataset` and streaming `IterableDataset` (each map batch packs on its own; the tail of a batch
    that does not fill a block is dropped).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer needs an EOS token for packing")

    def pack(batch):
        # whole documents, cut into blocks below: their length is not the model's input length, so no
        # "Token indices sequence length is longer than the specified maximum" warning (verbose=False)
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        flat = []
        for seq in ids:
            flat.extend(seq)
            flat.append(eos)
        n = len(flat) // block_size
        blocks = [flat[i * block_size:(i + 1) * block_size] for i in range(n)]
        out = {"input_ids": blocks, "labels": [list(b) for b in blocks]}
        if domain is not None:
            out["domain_labels"] = [int(domain)] * n
        return out

    kwargs = {"batched": True, "batch_size": 256, "remove_columns": ["text"]}
    import datasets

    if isinstance(ds, datasets.Dataset) and num_proc:
        kwargs["num_proc"] = num_proc
    return ds.map(pack, **kwargs)


def build_datasets(data_config: DataConfig, tokenizer):
    """(train, eval) datasets of packed blocks for `data_config` (eval may be None when eval_fraction is 0)."""
    import datasets

    sources = data_config.sources or [normalise_source({"stdlib": True})]
    trains, evals, weights = [], [], []
    any_domain = any(s.get("domain") is not None for s in sources)
    for s in sources:
        domain = s.get("domain")
        if any_domain and domain is None:
            raise ValueError(f"every source needs a 'domain' label when one has it (missing in {s!r})")
        packed = pack_dataset(load_source_dataset(s), tokenizer, data_config.block_size, domain, data_config.num_proc)
        if isinstance(packed, datasets.IterableDataset):
            if data_config.eval_fraction > 0:
                evals.append(packed.take(data_config.eval_blocks))
                packed = packed.skip(data_config.eval_blocks)
            trains.append(packed)
        else:
            if len(packed) == 0:
                raise ValueError(f"data source {s!r} yields no block of {data_config.block_size} tokens")
            n_eval = int(round(len(packed) * data_config.eval_fraction))
            if data_config.eval_fraction > 0:
                n_eval = max(1, n_eval)
                if n_eval >= len(packed):
                    raise ValueError(f"data source {s!r} has only {len(packed)} blocks; too few for a held-out split")
                evals.append(packed.select(range(len(packed) - n_eval, len(packed))))
                packed = packed.select(range(len(packed) - n_eval))
            trains.append(packed)
        weights.append(float(s["weight"]))
    if len(trains) == 1:
        train = trains[0]
    else:
        total = sum(weights)
        train = datasets.interleave_datasets(trains, probabilities=[w / total for w in weights],
                                             seed=data_config.seed, stopping_strategy=data_config.stopping_strategy)
    evaluation = None
    if evals:
        evaluation = evals[0] if len(evals) == 1 else datasets.concatenate_datasets(evals)
    return train, evaluation


class PackedCollator:
    """Stacks packed blocks into `input_ids` / `labels` tensors and passes `domain_labels` when present
    (`pass_domain_labels=False` drops them)."""

    def __init__(self, pass_domain_labels: bool = True):
        self.pass_domain_labels = pass_domain_labels

    def __call__(self, features):
        batch = {
            "input_ids": torch.tensor([f["input_ids"] for f in features], dtype=torch.long),
            "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long),
        }
        if self.pass_domain_labels and "domain_labels" in features[0] and features[0]["domain_labels"] is not None:
            batch["domain_labels"] = torch.tensor([int(f["domain_labels"]) for f in features], dtype=torch.long)
        return batch


__all__ = [
    "DataConfig",
    "PackedCollator",
    "build_char_tokenizer",
    "build_datasets",
    "check_source",
    "load_mixture_yaml",
    "load_or_train_tokenizer",
    "load_source_dataset",
    "normalise_source",
    "pack_dataset",
    "save_tokenizer",
    "special_token_ids",
    "stdlib_corpus",
    "stdlib_files",
    "train_bpe_tokenizer",
]
