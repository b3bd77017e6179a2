"""Hub model card (README.md) for a trained HYDRA model.

`hydra-train` writes it next to the final model so that `push_to_hub` / `huggingface-cli upload` of
the output directory publishes a card with the Hub's metadata block (library, pipeline, tags), the
architecture, the training run and its measured results, and how to load the model with and
without `hydra_hf` installed (the directory also holds the remote code, see docs/kernels.md).
Everything in the card comes from the run's own files; nothing is filled in by hand.
"""

from __future__ import annotations

import math
import os

from huggingface_hub import ModelCard, ModelCardData

CARD_TAGS = ["hydra", "hydra_hf", "ccgqa", "custom_code"]


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


def build_model_card(config, metrics: dict, run_config: dict, model_name: str) -> ModelCard:
    """A `huggingface_hub.ModelCard` for a `hydra-train` output directory."""
    tags = list(CARD_TAGS)
    if config.mod_enabled:
        tags.append("mixture-of-depths")
    if config.mor_enabled:
        tags.append("mixture-of-recursions")
    if config.moe_enabled and config.moe_num_layers > 0:
        tags.append("mixture-of-experts")
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=tags)

    training = run_config.get("training", {})
    data_cfg = run_config.get("data", {})
    sources = data_cfg.get("sources") or []
    source_text = (
        ", ".join(str(s.get("path") or s.get("name") or s) if isinstance(s, dict) else str(s) for s in sources)
        or ("mixture " + str(data_cfg["mixture"]) if data_cfg.get("mixture") else
            "the embedded default corpus (the Python standard library's source)")
    )
    eval_loss = metrics.get("eval_loss")
    perplexity = math.exp(eval_loss) if isinstance(eval_loss, (int, float)) and eval_loss < 50 else None
    params = metrics.get("num_parameters")

    rows = [
        ("hidden size", config.hidden_size),
        ("blocks x recursions", f"{config.num_unique_blocks} x {config.mor_recursions} ({config.mor_sharing})"),
        ("effective layers", config.num_hidden_layers),
        ("attention", f"CCGQA, {config.num_attention_heads} query / {config.num_key_value_heads} KV heads, "
                      f"compression {config.compression_factor} (latent head dim {config.latent_head_dim})"),
        ("FFN", f"SwiGLU {config.intermediate_size}"),
        ("vocabulary", config.vocab_size),
        ("routing", _routing_line(config)),
        ("parameters", f"{params / 1e6:.2f}M" if isinstance(params, (int, float)) else "n/a"),
    ]
    results = [
        ("steps", training.get("max_steps")),
        ("tokens per step", _tokens_per_step(training, data_cfg, metrics)),
        ("training data", source_text),
        ("final eval loss", _fmt(eval_loss)),
        ("eval perplexity", _fmt(perplexity, 2)),
        ("best eval loss", _fmt(metrics.get("best_metric"))),
        ("mean train loss over the run", _fmt(metrics.get("train_loss"))),
        ("wall clock", f"{metrics['wall_clock_s']:.0f} s" if "wall_clock_s" in metrics else "n/a"),
    ]

    def table(items):
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in items)

    content = f"""---
{data.to_yaml()}
---

# {model_name}

A HYDRA decoder-only language model (attention in a compressed latent space, token routing) trained
with `hydra-train` from the `hydra_hf` package and the stock `transformers.Trainer`.

## Architecture

{table(rows)}

## Training and results

{table(results)}

Eval loss is the mean next-token cross-entropy on the held-out split, computed in eval mode (the
causal routing rule that generation uses). The full log is in `log_history.jsonl`; `hydra-report`
turns it into plots.

## Use

With the package installed (Triton kernels on GPU):

```python
import hydra_hf  # registers the Auto classes
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{model_name}")
tokenizer = AutoTokenizer.from_pretrained("{model_name}")
ids = tokenizer("def ", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))
```

Without it, the code shipped in this repository runs on its PyTorch reference ops:

```python
model = AutoModelForCausalLM.from_pretrained("{model_name}", trust_remote_code=True)
```
"""
    return ModelCard(content)


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


__all__ = ["build_model_card", "write_model_card"]
