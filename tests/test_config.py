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
        (dict(rope_parameters={"rope_type": "ntk"}), "rope_type"),
        (dict(num_attention_heads=4, num_key_value_heads=1), "num_key_value_heads"),
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
    loaded.validate()
    assert loaded.head_dim == config.head_dim == 32


# ---------------------------------------------------------------- validation where transformers looks
@pytest.mark.parametrize(
    "field, value",
    [("mor_routing", "bogus"), ("mor_sharing", "ring"), ("kernel_backend", "cuda"), ("mod_capacity", 1.5),
     ("compression_factor", 3), ("qk_conv_kernel_size", 9), ("head_dim", 7), ("num_hidden_layers", 5),
     ("partial_rotary_factor", 0.0), ("rope_theta", -1.0), ("num_key_value_heads", 1)],
)
def test_validate_names_a_field_changed_after_construction(field, value):
    from huggingface_hub.errors import StrictDataclassClassValidationError

    config = HydraConfig.from_preset("debug")
    config.validate()
    setattr(config, field, value)
    with pytest.raises(StrictDataclassClassValidationError, match=field):
        config.validate()
    with pytest.raises(ValueError, match=field):  # the alias the model calls: plain ValueError, same checks
        config.check_hydra_fields()
    with pytest.raises(ValueError, match=field):
        HydraForCausalLM(config)


def test_validation_errors_name_the_allowed_values():
    config = HydraConfig()
    config.mor_routing = "bogus"
    with pytest.raises(ValueError, match=r"mor_routing must be one of \('expert_choice', 'token_choice'\), got 'bogus'"):
        config.check_hydra_fields()
    config.mor_routing = "expert_choice"
    config.kernel_backend = "cuda"
    with pytest.raises(ValueError, match=r"kernel_backend must be one of \('auto', 'triton', 'liger', 'torch'\)"):
        config.check_hydra_fields()


def test_save_pretrained_refuses_an_invalid_config_and_writes_nothing(tmp_path):
    from huggingface_hub.errors import StrictDataclassClassValidationError

    config = HydraConfig.from_preset("debug", mod_enabled=True)
    config.mor_routing = "bogus"
    fresh = tmp_path / "fresh"
    with pytest.raises(StrictDataclassClassValidationError, match="mor_routing"):
        config.save_pretrained(fresh)
    assert not fresh.exists()  # not even the directory or the remote-code files

    saved = tmp_path / "saved"
    config.mor_routing = "token_choice"
    config.save_pretrained(saved)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    config.kernel_backend = "cuda"
    with pytest.raises(StrictDataclassClassValidationError, match="kernel_backend"):
        config.save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # the earlier save is intact
    loaded = HydraConfig.from_pretrained(saved)
    assert loaded.mor_routing == "token_choice" and loaded.kernel_backend == "auto"
    assert loaded.to_dict() == HydraConfig.from_pretrained(saved).to_dict()


def test_model_save_pretrained_validates_before_writing(tmp_path):
    from huggingface_hub.errors import StrictDataclassClassValidationError

    from hydra_hf import HydraForCausalLM

    model = HydraForCausalLM(HydraConfig.from_preset("debug", vocab_size=64, num_unique_blocks=1, mor_recursions=1))
    model.config.mor_routing = "bogus"
    with pytest.raises(StrictDataclassClassValidationError, match="mor_routing"):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_one_list_of_kernel_backends():
    """Defined in the config (which imports no ops module, tests/test_conventions.py); the dispatcher imports it."""
    from hydra_hf import configuration_hydra, ops_hydra

    assert configuration_hydra.KERNEL_BACKENDS is ops_hydra.KERNEL_BACKENDS
    assert "KERNEL_BACKENDS = " not in open(ops_hydra.__file__).read()


# ---------------------------------------------------------------- head_dim = the latent head dim of the cache
def test_head_dim_is_the_latent_head_dim_and_never_none():
    config = HydraConfig(hidden_size=512, compression_factor=4, num_attention_heads=4)
    assert config.head_dim == config.latent_head_dim == 32
    assert HydraConfig(hidden_size=512, compression_factor=4, num_attention_heads=4, head_dim=32).head_dim == 32
    assert HydraConfig(hidden_size=512, compression_factor=4, num_attention_heads=4, head_dim=None).head_dim == 32
    with pytest.raises(ValueError, match=r"head_dim \(64\) must equal .* 512 / \(4 \* 4\) = 32"):
        HydraConfig(hidden_size=512, compression_factor=4, num_attention_heads=4, head_dim=64)
    for name in PRESET_NAMES:
        config = HydraConfig.from_preset(name)
        assert config.head_dim == config.hidden_size // (config.compression_factor * config.num_attention_heads)
        assert config.to_dict()["head_dim"] == config.head_dim
    # the per-head dim of the cached keys is head_dim
    assert HydraConfig().kv_cache_bytes_per_token(2) == HydraConfig().num_key_value_heads * HydraConfig().head_dim * 2 * 2


def test_head_dim_follows_preset_overrides():
    assert HydraConfig.from_preset("debug").head_dim == 32
    assert HydraConfig.from_preset("debug", compression_factor=2).head_dim == 64
    assert HydraConfig.from_preset("debug", compression_factor=1, num_attention_heads=8).head_dim == 64
    assert HydraConfig.from_preset("tiny", hidden_size=352).head_dim == 88
    with pytest.raises(ValueError, match="head_dim"):
        HydraConfig.from_preset("debug", compression_factor=2, head_dim=32)


def test_head_dim_round_trips_and_follows_from_pretrained_overrides(tmp_path):
    from transformers import AutoConfig

    config = HydraConfig.from_preset("debug", compression_factor=2)  # head_dim 64, not the class default
    assert HydraConfig(**config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = HydraConfig.from_pretrained(tmp_path)
    assert loaded.head_dim == 64 and loaded.to_dict() == config.to_dict()
    # overrides of the sizes it derives from re-derive it (the saved value was derived, not chosen)
    assert HydraConfig.from_pretrained(tmp_path, hidden_size=1024).head_dim == 128
    assert HydraConfig.from_pretrained(tmp_path, compression_factor=4).head_dim == 32
    auto = AutoConfig.from_pretrained(tmp_path, num_attention_heads=8, mor_recursions=3)
    assert (auto.head_dim, auto.num_hidden_layers) == (32, 6)
    HydraForCausalLM(HydraConfig.from_pretrained(tmp_path, hidden_size=256, intermediate_size=512))
    # an explicit head_dim next to the override must agree with it
    assert HydraConfig.from_pretrained(tmp_path, hidden_size=1024, head_dim=128).head_dim == 128
    with pytest.raises(ValueError, match=r"head_dim \(64\)"):
        HydraConfig.from_pretrained(tmp_path, hidden_size=1024, head_dim=64)
    # invalid overrides are caught when the config is built, naming the field
    with pytest.raises(ValueError, match="compression_factor"):
        HydraConfig.from_pretrained(tmp_path, compression_factor=3)
    # unrelated overrides and unused kwargs behave as in transformers
    loaded, unused = HydraConfig.from_pretrained(tmp_path, mod_enabled=True, foo=1, return_unused_kwargs=True)
    assert loaded.mod_enabled and loaded.head_dim == 64 and unused == {"foo": 1}


def test_changing_a_size_by_assignment_asks_for_head_dim():
    config = HydraConfig.from_preset("debug")
    config.hidden_size = 1024
    with pytest.raises(ValueError, match=r"head_dim \(32\) must equal .* = 64"):
        config.check_hydra_fields()
    config.head_dim = 64
    config.check_hydra_fields()
    config.head_dim = None
    with pytest.raises(ValueError, match="head_dim is None"):
        config.check_hydra_fields()


def test_output_router_logits_exists_only_with_moe_blocks(tmp_path):
    """TRL (SFT/DPO/GRPO/RLOO/KTO) takes its MoE load-balancing path when the config *has* `output_router_logits`; a
    HYDRA without MoE blocks returns no router logits, so its config does not expose the attribute (the value is
    still stored and round-trips), like transformers' hidden per-layer attributes."""
    dense = HydraConfig(output_router_logits=True)
    assert not dense.has_moe_blocks and not hasattr(dense, "output_router_logits")
    assert getattr(dense, "output_router_logits", False) is False
    assert "output_router_logits" not in list(dense)
    with pytest.raises(AttributeError, match="no MoE blocks"):
        dense.output_router_logits
    assert not hasattr(HydraConfig(moe_enabled=True, moe_num_layers=0), "output_router_logits")
    moe = HydraConfig(moe_enabled=True, moe_num_layers=1, output_router_logits=True)
    assert moe.has_moe_blocks and moe.output_router_logits is True and "output_router_logits" in list(moe)
    dense.save_pretrained(tmp_path)
    assert HydraConfig.from_pretrained(tmp_path).to_dict()["output_router_logits"] is True
    reloaded = HydraConfig.from_pretrained(tmp_path, moe_enabled=True, moe_num_layers=1)
    assert reloaded.output_router_logits is True
