"""Hub model cards (README.md) for HYDRA models, rendered from `model_cards/template.md`.

- `build_model_card(config, metrics, run_config, model_name)`: the card `hydra-train` writes next to the
  final model, so that `huggingface-cli upload` of the output directory publishes it: the Hub's metadata
  block (library, pipeline, tags), the architecture, the KV cache per token against a Llama of the same
  shape, the training run and its measured results (whole run, across resumes), intended use, limits,
  and how to train and load the model with and without `hydra_hf` installed. Everything comes from the
  run's own files; nothing is filled in by hand.
- `build_preset_card(preset)`: the card of a size preset (no results: an architecture to train).
  `model_cards/<preset>.md` in the repository are these cards; regenerate them with
  `python -m hydra_hf.training.model_card model_cards/` after changing a preset or the template.

The template ships with the package as `hydra_hf.model_cards` (`setup.py` maps the top-level
`model_cards/` folder there).
"""

from __future__ import annotations

import math
import os
import sys

from huggingface_hub import ModelCard, ModelCardData

CARD_TAGS = ["hydra", "hydra_hf", "ccgqa", "custom_code"]
TEMPLATE_NAME = "template.md"
DEFAULT_CONTEXT = 4096


def template_path() -> str:
    """Path of `model_cards/template.md` (installed package data, or the source checkout's folder)."""
    try:
        from importlib.resources import files

        path = files("hydra_hf.model_cards") / TEMPLATE_NAME
        if path.is_file():
            return str(path)
    except ModuleNotFoundError:
        pass
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "model_cards", TEMPLATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model card template {TEMPLATE_NAME!r} not found (hydra_hf.model_cards)")
    return path


def _routing_line(config) -> str:
    parts = []
    if config.mod_enabled:
        where = "every layer" if config.mod_every == 1 else f"every {config.mod_every} layers"
        parts.append(f"Mixture-of-Depths (capacity {config.mod_capacity}, {where})")
    if config.mor_enabled:
        parts.append(f"Mixture-of-Recursions ({config.mor_routing.replace('_', ' ')})")
    if config.moe_enabled and config.moe_num_layers > 0:
        parts.append(
            f"Mixture-of-Experts ({config.moe_num_layers} blocks, {config.num_local_experts} experts, "
            f"top-{config.num_experts_per_tok})"
        )
    return ", ".join(parts) if parts else "off (dense)"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def kv_cache_table(config, context: int = DEFAULT_CONTEXT, dtype_bytes: int = 2) -> dict:
    """KV bytes per token of `config` and of a Llama with the same width, layers and KV heads."""
    layers = config.num_hidden_layers
    llama_head_dim = config.hidden_size // config.num_attention_heads
    hydra_layer = config.kv_cache_bytes_per_token(dtype_bytes)
    llama_layer = config.num_key_value_heads * llama_head_dim * 2 * dtype_bytes
    return {
        "layers": layers, "context": f"{context:,}", "head_dim": config.latent_head_dim,
        "llama_head_dim": llama_head_dim,
        "hydra_layer": f"{hydra_layer:,}", "hydra_total": f"{hydra_layer * layers:,}",
        "hydra_context": _bytes(hydra_layer * layers * context),
        "llama_layer": f"{llama_layer:,}", "llama_total": f"{llama_layer * layers:,}",
        "llama_context": _bytes(llama_layer * layers * context),
        "ratio": f"1/{llama_layer / hydra_layer:g}",
    }


def architecture_rows(config, num_parameters) -> list:
    params = f"{num_parameters / 1e6:.2f}M" if isinstance(num_parameters, (int, float)) else "n/a"
    tied = " (input and output embeddings tied)" if config.tie_word_embeddings else ""
    return [
        ("hidden size", config.hidden_size),
        ("blocks x recursions", f"{config.num_unique_blocks} x {config.mor_recursions} ({config.mor_sharing})"),
        ("effective layers", config.num_hidden_layers),
        ("attention", f"CCGQA, {config.num_attention_heads} query / {config.num_key_value_heads} KV heads, "
                      f"compression {config.compression_factor} (latent head dim {config.latent_head_dim})"),
        ("FFN", f"SwiGLU {config.intermediate_size}"),
        ("vocabulary", config.vocab_size),
        ("context (max positions)", config.max_position_embeddings),
        ("routing", _routing_line(config)),
        ("parameters", params + tied),
    ]


def _card_data(config) -> ModelCardData:
    tags = list(CARD_TAGS)
    if config.mod_enabled:
        tags.append("mixture-of-depths")
    if config.mor_enabled:
        tags.append("mixture-of-recursions")
    if config.moe_enabled and config.moe_num_layers > 0:
        tags.append("mixture-of-experts")
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=tags)


SUMMARY = ("A HYDRA decoder-only language model (attention in a compressed latent space, token routing) "
           "from the `hydra_hf` package, for the stock `transformers` stack.")

COMMON_LIMITS = [
    "Routing is decided differently in training (top-k per sequence) and at inference (the causal rule: a "
    "token is processed where its router logit clears the running threshold); eval-mode fractions can sit "
    "away from the training capacity (see the run's `hydra-report`).",
    "The custom Triton kernels are tested under the Triton interpreter on CPU; on GPU, `kernel_backend=\"torch\"` "
    "is the fallback if a kernel misbehaves. With `trust_remote_code=True` and no `hydra_hf` installed the "
    "model runs on the PyTorch reference ops (slower).",
    "No safety tuning or filtering: the model continues any text it is given.",
]


def build_model_card(config, metrics: dict, run_config: dict, model_name: str) -> ModelCard:
    """The card of a `hydra-train` output directory (`metrics`: its `final_metrics.json`)."""
    training = run_config.get("training", {})
    data_cfg = run_config.get("data", {})
    sources = data_cfg.get("sources") or []
    default_corpus = not sources and not data_cfg.get("mixture")
    source_text = (
        ", ".join(str(s.get("path") or s.get("name") or s) if isinstance(s, dict) else str(s) for s in sources)
        or ("mixture " + str(data_cfg["mixture"]) if data_cfg.get("mixture") else
            "the embedded default corpus (the Python standard library's source)")
    )
    eval_loss = metrics.get("eval_loss")
    perplexity = math.exp(eval_loss) if isinstance(eval_loss, (int, float)) and eval_loss < 50 else None
    segments = metrics.get("segments", 1) or 1
    wall = f"{metrics['wall_clock_s']:.0f} s" if "wall_clock_s" in metrics else "n/a"
    if segments > 1:
        wall += f" (whole run: {segments} segments, resumed {segments - 1} time{'s' if segments > 2 else ''})"
    results = [
        ("steps", training.get("max_steps")),
        ("tokens per step", _tokens_per_step(training, data_cfg, metrics)),
        ("training data", source_text),
        ("final eval loss", _fmt(eval_loss)),
        ("eval perplexity", _fmt(perplexity, 2)),
        ("best eval loss", _fmt(metrics.get("best_metric"))),
        ("mean train loss over the run", _fmt(metrics.get("train_loss"))),
        ("training time", f"{metrics['train_seconds']:.0f} s" if "train_seconds" in metrics else "n/a"),
        ("wall clock", wall),
    ]
    intended = (
        f"`{model_name}` was trained with `hydra-train` on {source_text}. "
        + ("It is a demonstration model: it shows the training pipeline end to end and writes Python-like "
           "text, and is not meant for downstream use." if default_corpus else
           "Use it for research on adaptive-compute language models and as a starting point for fine-tuning "
           "(see `docs/finetuning.md`); evaluate it on your task before relying on it.")
    )
    limits = [f"Trained for {training.get('max_steps')} steps on {source_text} only; it knows nothing else."]
    return _render(config, model_name, metrics.get("num_parameters"), results=results, intended_use=intended,
                   limits=limits + COMMON_LIMITS,
                   train_command=f"hydra-train --config run_config.yaml --output_dir {model_name}",
                   repo_id=model_name)


def build_preset_card(preset: str, **overrides) -> ModelCard:
    """The card of size preset `preset` (architecture to train; `overrides` as in `from_preset`)."""
    import torch

    from ..configuration_hydra import HydraConfig
    from ..modeling_hydra import HydraForCausalLM

    config = HydraConfig.from_preset(preset, **overrides)
    with torch.device("meta"):  # parameter count without allocating the weights
        num_parameters = sum(p.numel() for p in HydraForCausalLM(config).parameters())
    name = f"hydra-{preset}"
    intended = (
        f"An architecture preset, not trained weights: `HydraConfig.from_preset(\"{preset}\")` builds it and "
        "`hydra-train --preset` trains it. Use it for research on adaptive-compute language models (latent "
        "attention, Mixture-of-Depths / Recursions / Experts) at this size, and as the card of the model "
        "you train from it (`hydra-train` writes that card with your run's results)."
    )
    limits = [
        f"The parameter count assumes the GPT-2 vocabulary size ({config.vocab_size}) and tied embeddings; "
        "`hydra-train` sets the vocabulary to the tokenizer's.",
        "Routing is off in the preset; turn it on per run (`--set mod_enabled=true --set mor_enabled=true`).",
    ] + COMMON_LIMITS
    command = (f"hydra-train --preset {preset} --output_dir {name} --data my_corpus/ --tokenizer bpe "
               "--vocab_size 32000 \\\n  --block_size 1024 --bf16 --set mod_enabled=true --set mor_enabled=true")
    if preset == "tiny":
        # The char-level preset of the quality benchmark (docs/results.md): dense on purpose, block 64.
        intended = (
            "An architecture preset, not trained weights: the best configuration of `hydra_hf`'s quality benchmark "
            "for ~0.8M-parameter character-level models (`HydraConfig.from_preset(\"tiny\", vocab_size=V, "
            "max_position_embeddings=64)`, at most 1.05x the parameters of a 4 x 128 Llama with tied embeddings for "
            "V up to ~1000). Measured against that Llama on tiny Shakespeare (docs/results.md): 0.967x its "
            "validation loss at equal CPU wall-clock, 0.960x at equal training FLOPs."
        )
        limits = [
            f"The parameter count in the table assumes the GPT-2 vocabulary ({config.vocab_size}); at a character "
            "vocabulary of 65 it is 0.799M.",
            "Dense on purpose: at this size every routed variant lost per unit of wall-clock (docs/results.md).",
            "Tuned for 64-token blocks and small corpora; a fast learner at this size, it can overfit a corpus "
            "of a few hundred thousand characters sooner than a Llama would (watch the validation loss).",
        ] + COMMON_LIMITS
        command = (f"hydra-train --preset {preset} --output_dir {name} --data my_corpus.txt --tokenizer char "
                   "\\\n  --block_size 64 --set model.max_position_embeddings=64 --set mod_enabled=false --set mor_enabled=false")
    return _render(config, f"HYDRA {preset}", num_parameters, results=None, intended_use=intended, limits=limits,
                   train_command=command, repo_id=f"<user>/{name}")


def _render(config, model_name, num_parameters, results, intended_use, limits, train_command, repo_id):
    return ModelCard.from_template(
        _card_data(config), template_path=template_path(), model_name=model_name, summary=SUMMARY,
        architecture=architecture_rows(config, num_parameters), kv=kv_cache_table(config), results=results,
        intended_use=intended_use, limits=limits, train_command=train_command, repo_id=repo_id,
    )


def _tokens_per_step(training: dict, data_cfg: dict, metrics: dict):
    batch = training.get("per_device_train_batch_size")
    block = data_cfg.get("block_size")
    if not batch or not block:
        return "n/a"
    accumulation = training.get("gradient_accumulation_steps", 1) or 1
    world = metrics.get("world_size", 1) or 1
    return f"{batch * accumulation * world} x {block} = {batch * accumulation * world * block:,}"


def write_model_card(output_dir: str, config, metrics: dict, run_config: dict, model_name: str | None = None) -> str:
    """Write README.md (the Hub model card) into `output_dir`; returns its path."""
    name = model_name or os.path.basename(os.path.abspath(output_dir))
    path = os.path.join(output_dir, "README.md")
    build_model_card(config, metrics, run_config, name).save(path)
    return path


def write_preset_cards(folder: str) -> list[str]:
    """Write `<folder>/<preset>.md` for every preset; returns the paths."""
    from ..configuration_hydra import PRESET_NAMES

    paths = []
    for preset in PRESET_NAMES:
        path = os.path.join(folder, f"{preset}.md")
        build_preset_card(preset).save(path)
        paths.append(path)
    return paths


__all__ = ["build_model_card", "build_preset_card", "kv_cache_table", "template_path", "write_model_card",
           "write_preset_cards"]


if __name__ == "__main__":
    for written in write_preset_cards(sys.argv[1] if len(sys.argv) > 1 else "model_cards"):
        print(written)
