"""`hydra-train`: train a HYDRA model with the stock `transformers.Trainer` and the hydra_hf callbacks.

With no arguments it trains a small model (~1.8M parameters, BPE of 2048 tokens, 1000 steps of 16 x 128 tokens)
on the embedded default corpus - the running Python's own standard library - and writes a model that
`AutoModelForCausalLM` / `AutoTokenizer` load (after `import hydra_hf`; the README gives the measured time).

Configuration, lowest to highest priority: built-in defaults (`DEFAULTS`), `--config run.yaml` (same
sections), `--preset`, the dedicated flags, then `--set section.key=value` (repeatable; a bare key is looked
up in the model config, then TrainingArguments, then the other sections).

Sections: `model` (`preset` + any `HydraConfig` field), `tokenizer` (`name`: HF path/name, "bpe" or "char";
`vocab_size`), `data` (`DataConfig`: `sources`, `block_size`, `eval_fraction`, ... or `mixture: file.yaml`),
`training` (any `TrainingArguments` field), `optimizer` (`name`, `schedule`, `weight_decay`, `betas`,
`warmup_steps`, `decay_fraction`, `min_lr_ratio`, `router_lr_scale`, `expert_lr_scale`), `curriculum`
(`RoutingCurriculumCallback` arguments; `enabled: false` to switch it off), `health` (`HealthCallback`),
`samples` (`prompts`, `every_steps`, `max_new_tokens`), `gpu` (`liger`, `compile`).

User errors (bad flag or value, a number out of range, unknown field, empty or unreadable data file, an output
directory that cannot be created or written, a missing optional package, no checkpoint to resume) are checked
before any tokenizer or data work and end with exit status 2 and a one-line message naming the value and what
is allowed (`hydra_hf.cli.errors`); `--debug` shows the traceback. A failed start leaves an existing output
directory as it was: the tokenizer and `run_config.yaml` are written only once the data is ready.

Console: a tqdm bar with the headline numbers (loss, lr, tokens/s, MoD fraction, mean MoR depth) and one line
per evaluation (`hydra_hf.training.progress`); every logged number is in `log_history.jsonl` (written as the
run goes), `trainer_state.json` and the `report_to` integrations.

Output directory: `checkpoint-*/` (resumable with `--resume`), the final model (`model.safetensors`,
`config.json`, tokenizer files), `run_config.yaml`, `log_history.jsonl`, `trainer_state.json`,
`samples.jsonl`, `final_metrics.json`, and `README.md` (the Hub model card, see
`hydra_hf.training.model_card`; the directory also holds the model's remote code).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time

from .errors import ArgumentParser, UsageError, check_choice, check_fields, check_range, one_line, run_cli

DEFAULTS = {
    "model": {
        "preset": "debug",
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_unique_blocks": 2,
        "mor_recursions": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "mod_enabled": True,
        "mor_enabled": True,
        "max_position_embeddings": 512,
    },
    "tokenizer": {"name": "bpe", "vocab_size": 2048},
    "data": {"sources": [], "block_size": 128, "eval_fraction": 0.01, "seed": 0},
    "training": {
        "max_steps": 1000,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "learning_rate": 3e-3,
        "max_grad_norm": 1.0,
        "logging_steps": 10,
        "eval_strategy": "steps",
        "eval_steps": 200,
        "save_strategy": "steps",
        "save_steps": 200,
        "save_total_limit": 2,
        "metric_for_best_model": "eval_loss",
        "greater_is_better": False,
        "report_to": "none",
        "seed": 0,
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "no",
    },
    "optimizer": {
        "name": "adamw",
        "schedule": "wsd",
        "weight_decay": 0.1,
        "betas": [0.9, 0.95],
        "warmup_steps": 50,
        "decay_fraction": 0.3,
        "min_lr_ratio": 0.05,
        "router_lr_scale": 1.0,
        "expert_lr_scale": 1.0,
    },
    "curriculum": {"enabled": True},
    "health": {"enabled": True, "frozen_check_steps": 20, "frozen_action": "warn"},
    "samples": {"prompts": ["def ", "class Parser:\n    def "], "every_steps": 0, "max_new_tokens": 80,
                "temperature": 0.7},
    "gpu": {"liger": False, "compile": False},
}
SECTIONS = tuple(DEFAULTS)

logger = logging.getLogger("hydra_hf.cli.train")


def deep_update(base: dict, other: dict, where: str = "") -> dict:
    if not isinstance(other or {}, dict):
        raise UsageError(f"config {where.rstrip('.') or 'file'}: expected a mapping, got {other!r}")
    for key, value in (other or {}).items():
        if where == "" and key not in SECTIONS:
            raise UsageError(f"unknown config section {key!r}; allowed: {', '.join(SECTIONS)}")
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "moe_forced_map":
            deep_update(base[key], value, where + key + ".")
        else:
            base[key] = copy.deepcopy(value)
    return base


def _parse_value(text: str):
    import yaml

    if text == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"--set value {text!r} is not valid YAML ({one_line(exc)})") from exc
    if isinstance(value, bool) and text.lower() not in ("true", "false"):
        return text  # YAML 1.1 reads "no"/"yes"/"on"/"off" as booleans; "eval_strategy=no" means the string
    return value


def apply_set(cfg: dict, assignment: str) -> None:
    """Apply one `--set key=value` (value parsed as YAML)."""
    if "=" not in assignment:
        raise UsageError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    key, value = key.strip(), _parse_value(raw.strip())
    if "." in key:
        section, field = key.split(".", 1)
        if section not in SECTIONS:
            raise UsageError(f"--set {key}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
        cfg[section][field] = value
        return
    from transformers import TrainingArguments

    from ..configuration_hydra import HydraConfig

    # rope_theta / partial_rotary_factor: HydraConfig keywords (stored in rope_parameters), not dataclass fields
    if key in HydraConfig.__dataclass_fields__ or key in ("preset", "rope_theta", "partial_rotary_factor"):
        cfg["model"][key] = value
    elif key in TrainingArguments.__dataclass_fields__:
        cfg["training"][key] = value
    else:
        for section in ("data", "tokenizer", "optimizer", "curriculum", "health", "samples", "gpu"):
            if key in cfg[section]:
                cfg[section][key] = value
                return
        raise UsageError(
            f"--set {key}: not a HydraConfig or TrainingArguments field nor a known key of "
            f"{', '.join(SECTIONS)}; use section.key=value"
        )


def build_parser() -> argparse.ArgumentParser:
    from ..configuration_hydra import PRESET_NAMES

    p = ArgumentParser(
        prog="hydra-train",
        description="Train a HYDRA language model with the stock Hugging Face Trainer. With no arguments: a "
        "small model on the Python standard library's own source (a few minutes on 2 CPU cores).",
    )
    p.add_argument("--config", help="YAML run config (sections: " + ", ".join(SECTIONS) + ")")
    p.add_argument("--preset", choices=PRESET_NAMES, metavar="PRESET",
                   help=f"model size preset ({', '.join(PRESET_NAMES)}); replaces the default small model's shape")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set hidden_size=128 --set training.max_steps=50")
    p.add_argument("--data", nargs="+", help="text/jsonl/parquet files, globs, folders or hub dataset names")
    p.add_argument("--mixture", help="YAML file with a weighted mixture of sources (see hydra_hf.training.data)")
    p.add_argument("--streaming", action="store_true", help="stream --data hub datasets")
    p.add_argument("--tokenizer", help="HF tokenizer path/name, 'bpe' (train one) or 'char'")
    p.add_argument("--vocab_size", type=int, help="vocabulary of a trained BPE tokenizer")
    p.add_argument("--block_size", type=int, help="tokens per packed training block")
    p.add_argument("--max_steps", type=int, help="optimizer steps (>= 1; default 1000)")
    p.add_argument("--batch_size", type=int, help="per-device train batch size (>= 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (> 0)")
    p.add_argument("--optimizer", help="adamw, adamw8bit (needs hydra_hf[quant]), adafactor, lion, muon")
    p.add_argument("--schedule", help="wsd, cosine, linear, constant")
    p.add_argument("--output_dir", default="hydra-run", help="checkpoints, final model and logs (default hydra-run)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the last checkpoint in --output_dir, or from the given checkpoint folder")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (TrainingArguments.torch_compile)")
    p.add_argument("--liger", action="store_true",
                   help="Liger kernels (kernel_backend='liger'; CUDA only; needs hydra_hf[gpu])")
    p.add_argument("--report_to", help="tensorboard (needs hydra_hf[tensorboard]), wandb, none, ...")
    p.add_argument("--no_curriculum", action="store_true", help="keep routing as configured (no curriculum)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of a user error")
    return p


LOCAL_DATA_EXTENSIONS = (".txt", ".text", ".md", ".py", ".rst", ".jsonl", ".json", ".parquet")


def _data_source(text: str, streaming: bool) -> dict:
    """`--data` value -> source: an existing path or glob is local; a hub dataset name has no file extension."""
    if os.path.exists(text) or any(c in text for c in "*?"):
        return {"path": text}
    if text.lower().endswith(LOCAL_DATA_EXTENSIONS) or text.startswith((".", os.sep, "~")):
        raise UsageError(f"--data {text!r}: no such file or folder (hub dataset names have no file extension)")
    return {"name": text, "streaming": streaming}


FLAG_FIELDS = {
    "tokenizer": ("tokenizer", "name"), "vocab_size": ("tokenizer", "vocab_size"),
    "block_size": ("data", "block_size"), "max_steps": ("training", "max_steps"),
    "batch_size": ("training", "per_device_train_batch_size"), "lr": ("training", "learning_rate"),
    "optimizer": ("optimizer", "name"), "schedule": ("optimizer", "schedule"),
    "report_to": ("training", "report_to"),
}


def resolve_config(args, base: dict | None = None) -> dict:
    """Defaults (or `base`, e.g. a resumed run's saved config) + --config + --preset + flags + --set.

    Sets `args.value_origin`: "section.key" -> the flag that gave the value (e.g. "training.max_steps" ->
    "--max_steps"), so that error messages name what the user typed."""
    import yaml

    origin = {}
    args.value_origin = origin
    cfg = copy.deepcopy(DEFAULTS)
    if base:
        deep_update(cfg, base)
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                deep_update(cfg, yaml.safe_load(f) or {})
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"--config {args.config!r}: cannot read it as YAML ({one_line(exc)})") from exc
    if args.preset:
        shape_keys = ("hidden_size", "intermediate_size", "num_unique_blocks", "mor_recursions",
                      "num_attention_heads", "num_key_value_heads")
        for key in shape_keys:
            if key in DEFAULTS["model"] and cfg["model"].get(key) == DEFAULTS["model"][key]:
                cfg["model"].pop(key)
        cfg["model"]["preset"] = args.preset
        if cfg["model"].get("max_position_embeddings") == DEFAULTS["model"]["max_position_embeddings"]:
            cfg["model"].pop("max_position_embeddings")
    if args.data:
        cfg["data"]["sources"] = [_data_source(d, args.streaming) for d in args.data]
    if args.mixture:
        cfg["data"]["mixture"] = args.mixture
    for flag, (section, key) in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            cfg[section][key] = value
            origin[f"{section}.{key}"] = f"--{flag}"
    if args.bf16:
        cfg["training"]["bf16"] = True
    if args.gradient_checkpointing:
        from transformers import TrainingArguments

        # transformers 5.x renamed the switch (the old name still works, with a FutureWarning)
        name = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                else "gradient_checkpointing")
        cfg["training"][name] = True
    if args.compile:
        cfg["gpu"]["compile"] = True
    if args.liger:
        cfg["gpu"]["liger"] = True
    if args.no_curriculum:
        cfg["curriculum"]["enabled"] = False
    for assignment in args.sets:
        before = copy.deepcopy(cfg)
        apply_set(cfg, assignment)
        for name in list(origin):  # a --set that overrides a flag's value: messages name the field instead
            section, key = name.split(".", 1)
            if cfg[section].get(key) != before[section].get(key):
                origin.pop(name)
    return cfg


# ---------------------------------------------------------------------------- validation (before heavy work)


def _check_default_types(cfg: dict) -> None:
    """Values of keys that have a built-in default must have the default's type (int, float, bool, str, list)."""
    for section, defaults in DEFAULTS.items():
        for key, default in defaults.items():
            if key not in cfg[section] or default is None:
                continue
            value = cfg[section][key]
            kind = type(default)
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
                  isinstance(value, int) and not isinstance(value, bool) if kind is int else
                  isinstance(value, (list, tuple)) if kind is list else isinstance(value, kind))
            if section == "training" and key == "report_to":
                ok = isinstance(value, (str, list))
            if not ok:
                raise UsageError(f"{section}.{key}={value!r} is not valid; expected {kind.__name__} "
                                 f"(default {default!r})")


# (section, key) -> keyword arguments of `check_range`: the numbers hydra-train accepts. A value outside them would
# start a run that does something else than asked (--max_steps -5: an epoch-based run of thousands of steps;
# --max_steps 0: one step) or fail with a traceback after the tokenizer and data work (--lr -0.001, --batch_size 0).
RANGES = {
    ("training", "max_steps"): dict(minimum=1, integer=True, also=(-1,),
                                    note="-1 = train for training.num_train_epochs epochs"),
    ("training", "num_train_epochs"): dict(minimum=0, min_exclusive=True),
    ("training", "per_device_train_batch_size"): dict(minimum=1, integer=True),
    ("training", "per_device_eval_batch_size"): dict(minimum=1, integer=True),
    ("training", "gradient_accumulation_steps"): dict(minimum=1, integer=True),
    ("training", "learning_rate"): dict(minimum=0, min_exclusive=True),
    ("training", "max_grad_norm"): dict(minimum=0, note="0 = no clipping"),
    ("training", "logging_steps"): dict(minimum=0, min_exclusive=True, note="below 1 = a fraction of the run"),
    ("training", "eval_steps"): dict(minimum=0, min_exclusive=True, also=(None,),
                                     note="below 1 = a fraction of the run"),
    ("training", "save_steps"): dict(minimum=0, min_exclusive=True, note="below 1 = a fraction of the run"),
    ("training", "save_total_limit"): dict(minimum=1, integer=True, also=(None,)),
    ("training", "dataloader_num_workers"): dict(minimum=0, integer=True),
    ("data", "block_size"): dict(minimum=2, integer=True),
    ("data", "eval_fraction"): dict(minimum=0, maximum=1, max_exclusive=True),
    ("optimizer", "weight_decay"): dict(minimum=0),
    ("optimizer", "warmup_steps"): dict(minimum=0, integer=True),
    ("optimizer", "decay_fraction"): dict(minimum=0, maximum=1),
    ("optimizer", "min_lr_ratio"): dict(minimum=0, maximum=1),
    ("optimizer", "router_lr_scale"): dict(minimum=0),
    ("optimizer", "expert_lr_scale"): dict(minimum=0),
    ("samples", "every_steps"): dict(minimum=0, integer=True, note="0 = only at the end"),
    ("samples", "max_new_tokens"): dict(minimum=1, integer=True),
    ("samples", "temperature"): dict(minimum=0, note="0 = greedy"),
}


def _field_name(section: str, key: str, origin: dict | None) -> str:
    """How a message names a value: the flag the user typed (`--max_steps`), else `section.key`."""
    return (origin or {}).get(f"{section}.{key}", f"{section}.{key}")


def check_ranges(cfg: dict, origin: dict | None = None) -> None:
    """Numbers within what hydra-train accepts (`RANGES`), named as the user gave them."""
    for (section, key), limits in RANGES.items():
        if key in cfg[section]:
            check_range(cfg[section][key], _field_name(section, key, origin), **limits)
    betas = cfg["optimizer"].get("betas", (0.9, 0.95))
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise UsageError(f"optimizer.betas={betas!r} is not allowed; allowed: two numbers in [0, 1), e.g. [0.9, 0.95]")
    tok = cfg["tokenizer"]
    if tok.get("name") in (None, "bpe"):
        check_range(tok.get("vocab_size", 4096), _field_name("tokenizer", "vocab_size", origin), minimum=258,
                    integer=True, note="a byte-level BPE needs 256 bytes + EOS + merges")


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_optional_packages(cfg: dict, origin: dict | None = None) -> None:
    """Features whose package is an optional extra of hydra_hf: one message naming the extra to install."""
    name = cfg["optimizer"].get("name", "adamw")
    if name == "adamw8bit":
        import torch

        if not _installed("bitsandbytes"):
            raise UsageError(f"{_field_name('optimizer', 'name', origin)}='adamw8bit' needs bitsandbytes, which is "
                             "not installed: pip install 'hydra_hf[quant]' (or choose adamw, adafactor, lion, muon)")
        if not torch.cuda.is_available():
            raise UsageError(f"{_field_name('optimizer', 'name', origin)}='adamw8bit' needs a CUDA GPU; allowed "
                             "without one: adamw, adafactor, lion, muon")
    report_to = cfg["training"].get("report_to", "none")
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "tensorboard" in targets and not (_installed("tensorboard") or _installed("tensorboardX")):
        raise UsageError(f"{_field_name('training', 'report_to', origin)}={report_to!r} needs tensorboard, which is "
                         "not installed: pip install 'hydra_hf[tensorboard]' (or report_to none)")
    if cfg["gpu"].get("liger") and not _installed("liger_kernel"):
        raise UsageError("--liger (gpu.liger=true) needs liger-kernel, which is not installed: "
                         "pip install 'hydra_hf[gpu]'")


def prepare_output_dir(output_dir: str) -> str | None:
    """Create `output_dir` (and its missing parents) and check that files can be written in it.

    Returns the topmost folder this call created (None when `output_dir` existed), so that a start that fails
    later can remove what it made. Raises `UsageError` naming the folder and why: a path under a regular file,
    a path that is a file, a place where folders cannot be made (/proc/x), a folder without write access."""
    import tempfile

    allowed = "allowed: a new or existing folder you can write to"
    if not output_dir:
        raise UsageError(f"--output_dir={output_dir!r} is not allowed; {allowed}")
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output_dir={output_dir!r} is a file, not a folder; {allowed}")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--output_dir={output_dir!r} cannot be created: {parent!r} is a file, not a folder; "
                         f"{allowed}")
    created = None
    if parent != path:
        created = path
        while os.path.dirname(created) != parent:
            created = os.path.dirname(created)
        try:
            os.makedirs(path, exist_ok=True)  # exist_ok: the other processes of a distributed launch race here
        except OSError as exc:
            _remove_created(path, created)
            raise UsageError(f"--output_dir={output_dir!r} cannot be created ({exc.strerror or one_line(exc)}); "
                             f"{allowed}") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".hydra-train-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        _remove_created(path, created)
        raise UsageError(f"--output_dir={output_dir!r} is not writable ({exc.strerror or one_line(exc)}); "
                         f"{allowed}") from exc
    return created


def _remove_created(path: str, created: str | None) -> None:
    """Remove the empty folders from `path` up to `created` (what `prepare_output_dir` made)."""
    if not created:
        return
    path, created = os.path.abspath(path), os.path.abspath(created)
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == created:
            return
        path = os.path.dirname(path)


def _model_config_kwargs(cfg: dict, vocab_size: int) -> tuple[str, dict]:
    model_cfg = dict(cfg["model"])
    preset = model_cfg.pop("preset", "debug")
    model_cfg["vocab_size"] = vocab_size
    block = cfg["data"]["block_size"]
    if model_cfg.get("max_position_embeddings", 2048) < block:
        raise UsageError(f"model.max_position_embeddings ({model_cfg['max_position_embeddings']}) must be >= "
                         f"data.block_size ({block})")
    return preset, model_cfg


def check_model_section(cfg: dict) -> None:
    """Fields of `HydraConfig` with their types, the preset name, and the config's own checks."""
    from ..configuration_hydra import PRESET_NAMES, HydraConfig

    model_cfg = dict(cfg["model"])
    check_choice(model_cfg.pop("preset", "debug"), PRESET_NAMES, "model.preset")
    known = set(dir(HydraConfig()))
    unknown = sorted(k for k in model_cfg if k not in known)
    if unknown:
        raise UsageError(f"model.{unknown[0]}: not a HydraConfig field (see `HydraConfig` or docs/training.md)")
    check_fields(model_cfg, HydraConfig, "model", allow_unknown=True)
    vocab = cfg["tokenizer"].get("vocab_size", 4096) if cfg["tokenizer"].get("name") == "bpe" else 1024
    preset, kwargs = _model_config_kwargs(cfg, vocab if isinstance(vocab, int) else 1024)
    try:
        HydraConfig.from_preset(preset, **kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"model: {one_line(exc)}") from exc


def check_data_section(cfg: dict) -> None:
    """The data config and every local source: it exists, can be read and is not empty."""
    from ..training.data import DataConfig, check_source, load_mixture_yaml

    data = dict(cfg["data"])
    mixture = data.pop("mixture", None)
    try:
        if mixture:
            if not os.path.isfile(mixture):
                raise UsageError(f"data.mixture: file {mixture!r} not found")
            data_config = load_mixture_yaml(mixture)
        else:
            check_fields(data, DataConfig, "data")
            data_config = DataConfig(**data)
        for source in data_config.sources:
            check_source(source)
    except UsageError:
        raise
    except (ValueError, TypeError, OSError) as exc:
        message = one_line(exc)
        raise UsageError(message if message.startswith("data") else f"data: {message}") from exc


def check_other_sections(cfg: dict) -> None:
    from ..training.optim import OPTIMIZERS, SCHEDULES

    tok = cfg["tokenizer"]
    unknown = sorted(set(tok) - {"name", "vocab_size"})
    if unknown:
        raise UsageError(f"tokenizer.{unknown[0]}: unknown key; allowed: name, vocab_size")
    opt = cfg["optimizer"]
    unknown = sorted(set(opt) - set(DEFAULTS["optimizer"]))
    if unknown:
        raise UsageError(f"optimizer.{unknown[0]}: unknown key; allowed: {', '.join(DEFAULTS['optimizer'])}")
    check_choice(opt.get("name", "adamw"), OPTIMIZERS, "optimizer.name")
    check_choice(opt.get("schedule", "wsd"), SCHEDULES, "optimizer.schedule")
    unknown = sorted(set(cfg["gpu"]) - set(DEFAULTS["gpu"]))
    if unknown:
        raise UsageError(f"gpu.{unknown[0]}: unknown key; allowed: {', '.join(DEFAULTS['gpu'])}")


def check_callback_sections(cfg: dict) -> None:
    """curriculum / health / samples against the callbacks' keyword arguments."""
    from ..training import HealthCallback, RoutingCurriculumCallback, SampleGenerationCallback

    prompts = cfg["samples"].get("prompts") or []
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise UsageError(f"samples.prompts={prompts!r} is not valid; expected a list of strings ([] = no samples)")

    for section, owner in (("curriculum", RoutingCurriculumCallback.__init__), ("health", HealthCallback.__init__),
                           ("samples", SampleGenerationCallback.__init__)):
        values = {k: v for k, v in cfg[section].items() if k not in ("enabled", "tokenizer")}
        check_fields(values, owner, section)


def check_training_section(cfg: dict, output_dir: str):
    """TrainingArguments fields with their types, then TrainingArguments' own checks; returns the arguments."""
    from transformers import TrainingArguments

    check_fields({k: v for k, v in cfg["training"].items()}, TrainingArguments, "training")
    try:
        return make_training_args(cfg, output_dir)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"training: {one_line(exc)}") from exc


def validate_config(cfg: dict, output_dir: str, origin: dict | None = None):
    """Every user-facing check, cheapest first, before the tokenizer or data are touched. Returns the
    `TrainingArguments`. Raises `UsageError`. `origin`: `args.value_origin` (messages name the flags)."""
    _check_default_types(cfg)
    check_other_sections(cfg)
    check_ranges(cfg, origin)
    check_optional_packages(cfg, origin)
    check_model_section(cfg)
    check_data_section(cfg)
    check_callback_sections(cfg)
    return check_training_section(cfg, output_dir)


# ---------------------------------------------------------------------------- building


def build_model_config(cfg: dict, tokenizer):
    from ..configuration_hydra import HydraConfig

    preset, model_cfg = _model_config_kwargs(cfg, len(tokenizer))
    model_cfg.setdefault("bos_token_id", tokenizer.bos_token_id)
    model_cfg.setdefault("eos_token_id", tokenizer.eos_token_id)
    model_cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
    if cfg["gpu"].get("liger"):
        import torch

        if torch.cuda.is_available():
            model_cfg["kernel_backend"] = "liger"
        else:
            logger.warning("--liger ignored: Liger kernels need CUDA")
    return HydraConfig.from_preset(preset, **model_cfg)


def make_training_args(cfg: dict, output_dir: str):
    import torch
    from transformers import TrainingArguments

    targs = dict(cfg["training"])
    targs["output_dir"] = output_dir
    # HydraForCausalLM.forward also takes `domain_labels`, which the Trainer would otherwise treat as a label
    # (and then skip the eval loss of batches without it)
    targs.setdefault("label_names", ["labels"])
    if cfg["gpu"].get("compile"):
        targs["torch_compile"] = True
    if targs.get("bf16") and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        logger.warning("bf16 requested without a bf16-capable GPU; running bf16 autocast on CPU")
        targs["use_cpu"] = targs.get("use_cpu", not torch.cuda.is_available())
    if targs.get("eval_strategy", "no") == "no":
        targs.pop("metric_for_best_model", None)
    # pinned host memory only helps copies to an accelerator; without one torch's DataLoader warns about it
    targs.setdefault("dataloader_pin_memory", _has_accelerator())
    allowed = TrainingArguments.__dataclass_fields__
    unknown = sorted(set(targs) - set(allowed))
    if unknown:
        raise UsageError(f"training.{unknown[0]}: not a TrainingArguments field")
    if "dataloader_num_workers" in targs and targs["dataloader_num_workers"] == 0:
        targs.pop("dataloader_persistent_workers", None)
    return TrainingArguments(**targs)


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def build_callbacks(cfg: dict, tokenizer, started_at: float | None = None):
    from ..training import (BestCheckpointCallback, HealthCallback, RoutingCurriculumCallback,
                            RoutingMetricsCallback, RunTotalsCallback, SampleGenerationCallback)

    callbacks = [RoutingMetricsCallback(), BestCheckpointCallback(), RunTotalsCallback(started_at=started_at)]
    cur = dict(cfg["curriculum"])
    if cur.pop("enabled", True):
        callbacks.insert(0, RoutingCurriculumCallback(**cur))
    health = dict(cfg["health"])
    if health.pop("enabled", True):
        callbacks.append(HealthCallback(**health))
    samples = dict(cfg["samples"])
    if samples.get("prompts"):
        callbacks.append(SampleGenerationCallback(tokenizer=tokenizer, **samples))
    return callbacks


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("httpx", "datasets", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return run_cli("hydra-train", lambda: train(args), debug=args.debug)


def _find_resume(args, output_dir: str):
    if not args.resume:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    resume = (get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None) if args.resume == "auto" \
        else args.resume
    if resume is None or not os.path.isdir(resume):
        raise UsageError(f"--resume {args.resume!r}: no checkpoint-* folder found"
                         + (f" in {output_dir!r}" if args.resume == "auto" else ""))
    return resume


def train(args) -> int:
    import yaml

    t_start = time.time()
    output_dir = args.output_dir
    resume = _find_resume(args, output_dir)
    saved_cfg = os.path.join(output_dir, "run_config.yaml")
    if resume and os.path.isfile(saved_cfg) and not args.config:
        with open(saved_cfg, encoding="utf-8") as f:
            cfg = resolve_config(args, base=yaml.safe_load(f))
    else:
        cfg = resolve_config(args)
    training_args = validate_config(cfg, output_dir, getattr(args, "value_origin", None))
    created = prepare_output_dir(output_dir)
    try:
        return _train(args, cfg, training_args, output_dir, resume, t_start)
    except UsageError:
        _remove_created(output_dir, created)  # a failed start leaves no new empty folder behind
        raise


def _train(args, cfg, training_args, output_dir, resume, t_start) -> int:
    import yaml
    from transformers import AutoTokenizer, Trainer

    from .. import HydraForCausalLM
    from ..training import RunTotalsCallback, add_callbacks, build_optimizer, build_scheduler
    from ..training.callbacks import unwrap
    from ..training.model_card import write_model_card
    from ..training.data import (DataConfig, PackedCollator, build_datasets, load_mixture_yaml,
                                 load_or_train_tokenizer, save_tokenizer)
    from ..training.progress import use_compact_progress

    saved_cfg = os.path.join(output_dir, "run_config.yaml")
    data_cfg_dict = dict(cfg["data"])
    mixture = data_cfg_dict.pop("mixture", None)
    data_config = load_mixture_yaml(mixture) if mixture else DataConfig(**data_cfg_dict)
    if mixture:
        data_config.block_size = data_cfg_dict.get("block_size", data_config.block_size)

    tok_dir = os.path.join(output_dir, "tokenizer")
    # under `accelerate launch` / torchrun the main process builds the tokenizer and data first
    try:
        with training_args.main_process_first(desc="tokenizer and data"):
            new_tokenizer = not (os.path.isdir(tok_dir) and (resume or not training_args.process_index == 0))
            if not new_tokenizer:
                tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            else:
                t0 = time.time()
                tokenizer = load_or_train_tokenizer(cfg["tokenizer"].get("name"), data_config,
                                                    vocab_size=int(cfg["tokenizer"].get("vocab_size", 4096)))
                logger.info(f"tokenizer ready ({len(tokenizer)} tokens) in {time.time() - t0:.1f}s")
            t0 = time.time()
            train_ds, eval_ds = build_datasets(data_config, tokenizer)
            if new_tokenizer:
                # written once the data is ready: a start that fails on its data leaves the folder as it was
                save_tokenizer(tokenizer, tok_dir)
                with open(saved_cfg, "w", encoding="utf-8") as f:
                    yaml.safe_dump(cfg, f, sort_keys=False)
    except (ValueError, OSError) as exc:  # a tokenizer that cannot be loaded, data too short for one block, ...
        raise UsageError(one_line(exc)) from exc
    logger.info(f"data ready in {time.time() - t0:.1f}s: train {getattr(train_ds, 'num_rows', '?')} blocks, "
                f"eval {getattr(eval_ds, 'num_rows', '?') if eval_ds is not None else 0} blocks of "
                f"{data_config.block_size} tokens")

    config = build_model_config(cfg, tokenizer)
    # the saved tokenizer states the model's context (its own default is a "no limit" 1e6 for packing)
    tokenizer.model_max_length = config.max_position_embeddings
    if eval_ds is None and training_args.eval_strategy != "no":
        training_args.eval_strategy = "no"
    import torch

    torch.manual_seed(training_args.seed)
    model = HydraForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"HYDRA model: {n_params / 1e6:.2f}M parameters, hidden {config.hidden_size}, "
                f"{config.num_unique_blocks} blocks x {config.mor_recursions} recursions, vocab {config.vocab_size}")

    max_steps = training_args.max_steps
    if max_steps <= 0:
        per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * max(
            1, training_args.world_size)
        max_steps = math.ceil(len(train_ds) / per_step) * int(training_args.num_train_epochs)
    opt_cfg = dict(cfg["optimizer"])
    # the model goes to its device first so fused AdamW sees CUDA parameters (the Trainer keeps it there)
    model.to(training_args.device)
    optimizer = build_optimizer(
        model, opt_cfg.get("name", "adamw"), lr=training_args.learning_rate,
        weight_decay=opt_cfg.get("weight_decay", 0.1), betas=tuple(opt_cfg.get("betas", (0.9, 0.95))),
        router_lr_scale=opt_cfg.get("router_lr_scale", 1.0), expert_lr_scale=opt_cfg.get("expert_lr_scale", 1.0),
    )
    scheduler = build_scheduler(optimizer, opt_cfg.get("schedule", "wsd"), max_steps,
                                int(opt_cfg.get("warmup_steps", 0)), float(opt_cfg.get("decay_fraction", 0.2)),
                                float(opt_cfg.get("min_lr_ratio", 0.0)))

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PackedCollator(),
        processing_class=tokenizer,
        optimizers=(optimizer, scheduler),
    )
    add_callbacks(trainer, build_callbacks(cfg, tokenizer, started_at=t_start))
    # the console gets a progress bar with headline numbers; every number goes to log_history.jsonl (live)
    use_compact_progress(trainer, log_file=os.path.join(output_dir, "log_history.jsonl"))

    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    # whole-run figures (the Trainer's train_loss / train_runtime cover only this call after a resume)
    run_totals = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RunTotalsCallback))
    run_totals.started_at = t_start  # a callback restored from a checkpoint was rebuilt inside train()
    totals = run_totals.totals(metrics.get("train_loss"), trainer.state.global_step)
    metrics["segment_train_loss"] = metrics.get("train_loss")
    metrics["train_loss"] = totals["train_loss"]
    metrics["segments"] = totals["segments"]
    metrics["train_seconds"] = totals["train_seconds"]
    if eval_ds is not None:
        last_eval = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
        if last_eval is not None and last_eval.get("step") == trainer.state.global_step:
            # the run ended on an evaluation: the same model, the same numbers (no second pass, no repeated line)
            metrics.update({k: v for k, v in last_eval.items() if k != "step"})
        else:
            metrics.update(trainer.evaluate())
    trainer.save_model(output_dir)
    save_tokenizer(tokenizer, output_dir)
    trainer.save_state()
    with open(os.path.join(output_dir, "log_history.jsonl"), "w", encoding="utf-8") as f:
        for entry in trainer.state.log_history:
            f.write(json.dumps(entry) + "\n")
    metrics["segment_wall_clock_s"] = time.time() - t_start
    metrics["wall_clock_s"] = run_totals.totals()["wall_clock_s"]
    metrics["num_parameters"] = n_params
    metrics["world_size"] = training_args.world_size
    metrics["best_metric"] = trainer.state.best_metric
    metrics["best_model_checkpoint"] = trainer.state.best_model_checkpoint
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, "final_metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        write_model_card(output_dir, unwrap(trainer.model).config, metrics, cfg,
                         model_name=training_args.hub_model_id)
        print(f"\nhydra-train: done in {metrics['segment_wall_clock_s']:.0f}s; final eval loss "
              f"{metrics.get('eval_loss', float('nan')):.4f}; model saved to {output_dir}")
        print(f"  try: hydra-generate {output_dir} --prompt 'def '   |   hydra-report {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
