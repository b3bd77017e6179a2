"""HydraConfig: presets, derived sizes, validation errors naming the field, serialisation."""

import math

import pytest
import torch

from hydra_hf import PRESET_NAMES, HydraConfig, HydraForCausalLM

SPEC_PARAMS = {  # SPEC section 6: approximate parameter counts (millions)
    "debug": 33, "50M": 50, "100M": 104, "250M": 198, "500M": 426, "750M": 665, "1B": 973, "1.5B": 1369,
}
SPEC_LAYOUT = {
    "debug": (512, 2, 2), "50M": (512, 8, 3), "100M": (768, 8, 4), "250M": (1024, 10, 4),
    "500M": (1280, 16, 4), "750M": (1536, 18, 4), "1B": (1792, 20, 4), "1.5B": (2048, 22, 4),
}


def count_params_meta(config) -> int:
    with torch.device("meta"):
        model = HydraForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in PRESET_NAMES if n != "tiny"])
def test_preset_layout_and_param_count(name):
    config = HydraConfig.from_preset(name)
    hidden, blocks, recursions = SPEC_LAYOUT[name]
    assert (config.hidden_size, config.num_unique_blocks, config.mor_recursions) == (hidden, blocks, recursions)
    assert config.num_hidden_layers == blocks * recursions
    n = count_params_meta(config)
    target = SPEC_PARAMS[name] * 1e6
    assert abs(n - target) / target < 0.15, f"{name}: {n / 1e6:.1f}M vs spec ~{SPEC_PARAMS[name]}M"


@pytest.mark.parametrize("vocab", [65, 97, 256, 1000])
def test_tiny_preset_is_at_most_105_percent_of_a_4x128_llama(vocab):
    """SPEC section 6: from_preset("tiny", vocab_size=V, max_position_embeddings=64) has <= 1.05x the
    parameters of a 4 x 128 Llama (4 heads, FFN 344, tied embeddings) at the same vocab."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = HydraConfig.from_preset("tiny", vocab_size=vocab, max_position_embeddings=64)
    assert config.vocab_size == vocab and config.max_position_embeddings == 64 and config.tie_word_embeddings
    assert not (config.mod_enabled or config.mor_enabled or config.moe_enabled)
    llama = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                        tie_word_embeddings=True)
    with torch.device("meta"):
        n_llama = sum(p.numel() for p in LlamaForCausalLM(llama).parameters())
    n = count_params_meta(config)
    assert n_llama * 0.9 < n <= 1.05 * n_llama, f"tiny {n} vs Llama {n_llama}"
    model = HydraForCausalLM(config)
    ids = torch.randint(0, vocab, (2, 64))
    assert model(input_ids=ids, labels=ids).loss.isfinite()


def test_preset_overrides_and_unknown_preset():
    config = HydraConfig.from_preset("debug", vocab_size=1000, mod_enabled=True)
    assert config.vocab_size == 1000 and config.mod_enabled
    with pytest.raises(ValueError, match="Unknown preset 'huge'.*debug"):
        HydraConfig.from_preset("huge")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(compression_factor=3), "compression_factor"),
        (dict(num_attention_heads=5), "num_attention_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(mod_capacity=0.0), "mod_capacity"),
        (dict(mod_capacity=1.5), "mod_capacity"),
        (dict(mor_capacity=1.2), "mor_capacity"),
        (dict(mor_capacity=[0.5, 0.5]), "mor_capacity"),
        (dict(mor_sharing="ring"), "mor_sharing"),
        (dict(mor_routing="random"), "mor_routing"),
        (dict(kernel_backend="cuda"), "kernel_backend"),
        (dict(num_hidden_layers=5), "num_hidden_layers"),
        (dict(head_dim=7), "head_dim"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
        (dict(mor_sharing="middle_cycle", num_unique_blocks=2), "middle_cycle"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        HydraConfig(**kwargs)


def test_derived_sizes():
    config = HydraConfig(hidden_size=512, compression_factor=4, num_attention_heads=4, num_key_value_heads=2)
    assert config.latent_size == 128 and config.latent_head_dim == 32
    assert config.num_hidden_layers == config.num_unique_blocks * config.mor_recursions
    mc = HydraConfig(num_unique_blocks=4, mor_recursions=3, mor_sharing="middle_cycle")
    assert mc.num_hidden_layers == 2 + 2 * 3
    # KV cache: Hk * h * 2 values per token and layer = 1/C of a same-width Llama layer with Hk heads.
    llama_head_dim = config.hidden_size // config.num_attention_heads
    llama_bytes = config.num_key_value_heads * llama_head_dim * 2 * 2
    assert config.kv_cache_bytes_per_token(2) * config.compression_factor <= llama_bytes


def test_config_round_trip(tmp_path):
    config = HydraConfig.from_preset("debug", mod_enabled=True, mor_capacity=[0.5])
    config.save_pretrained(tmp_path)
    loaded = HydraConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert math.isclose(loaded.mod_capacity, 0.75)
