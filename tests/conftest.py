"""Shared fixtures: tiny HYDRA configs that run in milliseconds on CPU."""

import pytest
import torch

import hydra_hf  # noqa: F401  (registers the Auto classes)
from hydra_hf import HydraConfig, HydraForCausalLM


def tiny_config(**overrides) -> HydraConfig:
    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        compression_factor=2,
        num_unique_blocks=2,
        mor_recursions=2,
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    return HydraConfig(**kwargs)


def tiny_model(seed: int = 0, spread_routers: bool = True, **overrides) -> HydraForCausalLM:
    """A tiny model; routers get random weights so that routing selects a real mix of tokens."""
    torch.manual_seed(seed)
    model = HydraForCausalLM(tiny_config(**overrides))
    if spread_routers:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "routers" in name and name.endswith("proj.weight"):
                    param.normal_(0.0, 0.5)
    return model


ROUTING_MODES = {
    "dense": {},
    "mod": dict(mod_enabled=True, mod_every=1),
    "mor_expert": dict(mor_enabled=True, mor_routing="expert_choice"),
    "mor_token": dict(mor_enabled=True, mor_routing="token_choice", mor_recursions=3),
    "moe": dict(moe_enabled=True, moe_num_layers=2, num_local_experts=3, num_experts_per_tok=2),
    "middle_cycle": dict(num_unique_blocks=4, mor_sharing="middle_cycle", mor_enabled=True, mod_enabled=True),
    "all": dict(mod_enabled=True, mor_enabled=True, moe_enabled=True, moe_num_layers=1, mod_use_predictor=True),
    "static": dict(mod_enabled=True, mor_enabled=True, static_routing=True),
}


@pytest.fixture(params=list(ROUTING_MODES))
def routing_mode(request):
    return request.param, ROUTING_MODES[request.param]
