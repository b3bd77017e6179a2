"""model_cards/: the template renders a card per preset that parses as a Hub `ModelCard`, the committed cards
are the rendered ones, and their figures agree with the config and with the README's preset table."""

import os
import re

import pytest
from huggingface_hub import ModelCard

from hydra_hf import PRESET_NAMES, HydraConfig
from hydra_hf.training.model_card import build_preset_card, template_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARDS = os.path.join(ROOT, "model_cards")


def readme_params() -> dict:
    """preset -> parameter count in millions, from the README's preset table."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (\S+) \| \d+ \|.*\| ([\d.]+)M \|$", text, re.M)}


def test_template_is_the_top_level_one():
    assert os.path.samefile(template_path(), os.path.join(CARDS, "template.md"))


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_preset_card_renders_parses_and_is_committed(preset):
    card = build_preset_card(preset)
    path = os.path.join(CARDS, f"{preset}.md")
    with open(path, encoding="utf-8") as f:
        committed = f.read()
    assert str(card) == committed, f"{path} is stale: python -m hydra_hf.training.model_card model_cards/"

    parsed = ModelCard.load(path)
    assert parsed.data.library_name == "transformers" and parsed.data.pipeline_tag == "text-generation"
    assert {"hydra", "custom_code"} <= set(parsed.data.tags)
    text = parsed.text
    for section in ("## Architecture", "### KV cache per token", "## Intended use", "## Limitations",
                    "## How to train", "## How to load"):
        assert section in text, section
    assert "## Training and results" not in text  # a preset has no run

    config = HydraConfig.from_preset(preset)
    assert f"| hidden size | {config.hidden_size} |" in text
    assert f"| effective layers | {config.num_hidden_layers} |" in text
    hydra = config.num_key_value_heads * config.latent_head_dim * 2 * 2
    llama = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 2 * 2
    assert f"| {hydra:,} B | {hydra * config.num_hidden_layers:,} B |" in text
    assert f"| {llama:,} B | {llama * config.num_hidden_layers:,} B |" in text
    assert f"1/{llama / hydra:g} of the Llama one" in text
    params = float(re.search(r"\| parameters \| ([\d.]+)M", text).group(1))
    assert round(params, 1) == readme_params()[preset]
    assert f"hydra-train --preset {preset} " in text
