"""HYDRA's cache on transformers' contract, on every supported transformers version: the `cache` /
`past_key_values` names, `update` returning (keys, values), separate dynamic and static layers, clear errors on
wrong use, cached state that owns its storage, and a routing mode added through the routing table only."""

import ast
import logging
import pathlib
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache, StaticLayer
from transformers.utils import logging as hf_logging

import hydra_hf
from hydra_hf import HydraCache, HydraConfig, HydraForCausalLM, HydraStaticCache
from hydra_hf.cache_hydra import HydraDynamicLayer, HydraStaticLayer, storage_bytes
from hydra_hf.configuration_hydra import ROUTING_MODE_NAMES
from hydra_hf.routing_hydra import ROUTING_MODES as ROUTER_TABLE
from hydra_hf.routing_hydra import ExpertChoiceRouter, RouterOutput, register_routing_mode

from conftest import ROUTING_MODES, tiny_config, tiny_model

PACKAGE = pathlib.Path(hydra_hf.__file__).resolve().parent


# ---------------------------------------------------------------------------- the layer and cache classes


def test_update_keeps_transformers_contract():
    config = tiny_config()
    cache = HydraCache(config)
    Hk, h = config.num_key_value_heads, config.head_dim
    k, v = torch.randn(2, Hk, 3, h), torch.randn(2, Hk, 3, h)
    out = cache.update(k, v, 0)
    assert isinstance(out, tuple) and len(out) == 2
    keys, values = out
    torch.testing.assert_close(keys, k)
    keys, values = cache.update(k + 1, v + 1, 0)
    assert keys.shape == (2, Hk, 6, h) and values.shape == (2, Hk, 6, h)
    torch.testing.assert_close(keys[:, :, 3:], k + 1)
    assert cache.layers[0].get_seq_length() == 6  # columns written outside a model are the next steps
    assert cache.layers[0].column_steps()[0].tolist() == list(range(6))


def test_cache_classes_are_transformers_dynamic_and_static():
    config = tiny_config()
    dynamic = HydraCache(config)
    static = HydraStaticCache(config, max_cache_len=16)
    assert isinstance(dynamic, DynamicCache) and not isinstance(dynamic, StaticCache)
    assert isinstance(static, StaticCache)
    assert all(type(layer) is HydraDynamicLayer and isinstance(layer, DynamicLayer) for layer in dynamic.layers)
    assert all(type(layer) is HydraStaticLayer and isinstance(layer, StaticLayer) for layer in static.layers)
    assert len(dynamic.layers) == len(static.layers) == config.num_hidden_layers
    assert static.is_compileable and not dynamic.is_compileable


def test_wrong_use_of_a_cache_class_is_a_clear_error():
    config = tiny_config()
    with pytest.raises(TypeError, match="HydraStaticCache"):
        HydraCache(config, max_cache_len=8)  # used to return a dynamic cache silently
    with pytest.raises(ValueError, match="max_cache_len"):
        HydraStaticCache(config)
    with pytest.raises(ValueError, match="config"):
        HydraCache()
    with pytest.raises(TypeError, match="HydraConfig"):
        HydraCache(LlamaConfig())


def test_croppable_only_when_the_rolling_state_can_be_rewound():
    model = tiny_model().eval()
    x = torch.randint(1, 97, (1, 6))
    cache = HydraCache(model.config)
    assert cache.is_croppable  # nothing stored yet
    with torch.no_grad():
        model(x, cache=cache, use_cache=True)
    assert not cache.is_croppable
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-1)
    recording = HydraCache(model.config)
    recording.activate_past_recording(recurrent_states_to_keep=3)  # transformers 5.25's keyword
    with torch.no_grad():
        model(x, cache=recording, use_cache=True)
    assert recording.is_croppable
    recording.crop(-2)
    assert recording.get_seq_length() == 4


@pytest.mark.parametrize("mode", ["dense", "mod", "all"])
def test_beam_reorder_and_batch_select_follow_the_rows(mode):
    model = tiny_model(**ROUTING_MODES[mode]).eval()
    x = torch.randint(1, 97, (3, 7))
    with torch.no_grad():
        cache = HydraCache(model.config)
        model(x[:, :6], cache=cache, use_cache=True)
        order = torch.tensor([2, 0, 0])
        cache.reorder_cache(order)
        step = model(x[order, 6:], cache=cache, use_cache=True).logits
        full = model(x[order]).logits[:, 6:]
        torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
        cache.batch_select_indices(torch.tensor([1]))
        assert cache.batch_size == 1


# ---------------------------------------------------------------------------- names: `cache` and `past_key_values`


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _no_deprecation_noise(fn):
    """Run fn; fail on any deprecation warning (Python warnings or transformers' log) it prints."""
    handler = _Records()
    loggers = (hf_logging.get_logger(), logging.getLogger("hydra_hf"))  # transformers' root logger and ours
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    noise = [m for m in handler.messages if "deprecat" in m.lower()]
    noise += [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
              and "cache" in str(w.message).lower()]
    assert not noise, noise
    return result


def test_forward_takes_cache_and_past_key_values_and_outputs_both_names():
    model = tiny_model(**ROUTING_MODES["all"]).eval()
    x = torch.randint(1, 97, (2, 8))
    with torch.no_grad():
        full = model(x).logits

        def run():
            out = model(x[:, :5], use_cache=True)
            assert isinstance(out.cache, HydraCache)
            assert out.past_key_values is out.cache and out["past_key_values"] is out.cache
            assert "past_key_values" in out and out.get("past_key_values") is out.cache
            a = model(x[:, 5:6], cache=out.cache, use_cache=True)
            b = model(x[:, 6:8], past_key_values=a.cache, use_cache=True)
            return torch.cat([out.logits, a.logits, b.logits], dim=1), b

        logits, last = _no_deprecation_noise(run)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
    assert last.cache.get_seq_length() == 8
    with pytest.raises(ValueError, match="once"):
        model(x, cache=HydraCache(model.config), past_key_values=HydraCache(model.config), use_cache=True)
    as_tuple = model(x[:, :3], use_cache=True, return_dict=False)
    assert isinstance(as_tuple[1], HydraCache)  # (logits, cache, ...) as Llama's tuple


def test_generate_returns_the_cache_and_prints_no_deprecation():
    model = tiny_model(**ROUTING_MODES["mod"]).eval()
    x = torch.randint(1, 97, (2, 5))

    def run():
        with torch.no_grad():
            return model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)

    out = _no_deprecation_noise(run)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert isinstance(cache, HydraCache) and cache.get_seq_length() == 8
    # generated tokens are what a full forward predicts (a fresh cache per step would not be)
    with torch.no_grad():
        full = model(out.sequences[:, :-1]).logits[:, 4:].argmax(-1)
    assert torch.equal(full, out.sequences[:, 5:])


def test_a_plain_dynamic_cache_from_the_user_is_replaced_and_returned():
    model = tiny_model().eval()
    x = torch.randint(1, 97, (1, 4))
    with torch.no_grad():
        out = model(x, cache=DynamicCache(), use_cache=True)
    assert isinstance(out.cache, HydraCache) and out.cache.get_seq_length() == 4


# ---------------------------------------------------------------------------- memory counted by storage


def _llama_cache_bytes(width, heads, kv_heads, layers, x):
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=width, intermediate_size=64, num_attention_heads=heads,
        num_key_value_heads=kv_heads, num_hidden_layers=layers,
    )).eval()
    with torch.no_grad():
        cache = llama(x, use_cache=True)[1]
    return storage_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("mode", ["dense", "mod"])
def test_cache_storage_is_a_compression_factor_below_llama_at_2048_tokens(mode):
    """Counted by storage (a view into a prefill activation costs the whole activation): <= 1.15 / C of a Llama."""
    width, heads, kv_heads, C, layers, T = 256, 8, 2, 4, 2, 2048
    config = HydraConfig(
        vocab_size=64, hidden_size=width, intermediate_size=64, num_attention_heads=heads,
        num_key_value_heads=kv_heads, compression_factor=C, num_unique_blocks=layers, mor_recursions=1,
        num_hidden_layers=layers, max_position_embeddings=4096, kernel_backend="torch",
        mod_enabled=mode == "mod", mod_every=1,
    )
    torch.manual_seed(0)
    hydra = HydraForCausalLM(config).eval()
    x = torch.randint(0, 64, (1, T))
    llama_bytes = _llama_cache_bytes(width, heads, kv_heads, layers, x)
    with torch.no_grad():
        cache = hydra(x, use_cache=True).cache
        after_prefill = cache.storage_bytes()
        hydra(x[:, :1], cache=cache, use_cache=True)
        after_decode = cache.storage_bytes()
    for held in (after_prefill, after_decode):
        assert held <= 1.15 / C * llama_bytes, (held, llama_bytes, held / llama_bytes)
    # and every rolling state owns a storage the size of itself (no view into the (B, T, C) activations)
    for layer in cache.layers:
        for t in (layer.rolling, layer.rolling_steps):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


# ---------------------------------------------------------------------------- the layer loop and routing modes


def test_layer_loop_is_short_and_holds_no_routing_state():
    tree = ast.parse((PACKAGE / "modeling_hydra.py").read_text())
    model_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HydraModel")
    forward = next(n for n in model_cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    body_start = forward.body[1].lineno if ast.get_docstring(forward) else forward.body[0].lineno
    assert forward.end_lineno - body_start + 1 <= 60, forward.end_lineno - body_start + 1
    names = {n.id for n in ast.walk(forward) if isinstance(n, ast.Name)}
    assert not names & {"mor_active", "mor_index", "mor_gate", "depth", "depth_count", "mor_count"}


class SignRouter(ExpertChoiceRouter):
    """A toy MoD mode: the expert-choice router's gate and losses, but a token runs iff the first channel of its
    hidden state is positive (causal: it reads the token's own state only), in training and at inference."""

    def __init__(self, config):
        super().__init__(config.hidden_size, config.router_threshold_momentum)

    def forward(self, hidden_states, inputs):
        out = super().forward(hidden_states, inputs)
        if not inputs.routing_on:
            return out
        positive = hidden_states[..., 0] > 0  # (B, T)
        selected = positive if inputs.candidates is None else positive & inputs.candidates
        return RouterOutput(selected=selected, gate=out.gate, logits=out.logits, losses=out.losses)


def test_a_routing_mode_added_through_the_routing_table_only():
    register_routing_mode("mod", "sign", SignRouter)
    try:
        with pytest.raises(ValueError, match="mod_routing"):
            tiny_config(mod_enabled=True, mod_routing="no_such_mode")
        model = tiny_model(mod_enabled=True, mod_every=1, mod_routing="sign").eval()
        assert all(type(r) is SignRouter for r in model.model.mod_routers)
        x = torch.randint(1, 97, (2, 8))
        with torch.no_grad():
            out = model(x)
            full = out.logits
            cache = HydraCache(model.config)
            steps = [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(8)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
        fractions = [float(f) for f in out.routing.mod_selected_fraction.values()]
        assert fractions and all(0.0 < f < 1.0 for f in fractions), fractions
        assert min(out.routing.tokens_processed.values()) < 2 * 8  # a layer ran on a gathered subset only
    finally:
        del ROUTER_TABLE["mod"]["sign"]
        ROUTING_MODE_NAMES["mod"].remove("sign")
