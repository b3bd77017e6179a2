"""The forward path's contract with transformers: module layering, the cache (crop, assisted decoding,
prompt lookup, draft models, static cache, bytes per token), packed sequences, output formats and a
training step that compiles with `fullgraph=True` for every routing mode with static shapes."""

import ast
import pathlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hydra_hf import HydraCache, HydraConfig, HydraForCausalLM, HydraStaticCache

from conftest import ROUTING_MODES, tiny_model

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "hydra_hf"


def test_routing_module_imports_nothing_from_modeling():
    tree = ast.parse((PACKAGE / "routing_hydra.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not [m for m in imported if "modeling" in m], imported


def test_layer_loop_lives_in_the_model():
    source = (PACKAGE / "modeling_hydra.py").read_text()
    tree = ast.parse(source)
    model_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HydraModel")
    forward = next(n for n in model_cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    loops = [n for n in ast.walk(forward) if isinstance(n, ast.For)]
    assert any(ast.unparse(n.iter) == "self.plan" for n in loops)


# ---------------------------------------------------------------------------- generation and the cache


def _greedy(model, x, **kwargs):
    with torch.no_grad():
        return model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("mode", ["dense", "mod", "mor_expert", "mor_token", "all"])
def test_prompt_lookup_and_draft_model_equal_plain_greedy(mode):
    model = tiny_model(**ROUTING_MODES[mode]).eval()
    # a prompt that repeats itself, so prompt lookup proposes (and sometimes accepts) candidates
    x = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]])
    plain = _greedy(model, x)
    lookup = _greedy(model, x, prompt_lookup_num_tokens=2)
    assert torch.equal(plain, lookup)
    draft = tiny_model(seed=3, **ROUTING_MODES[mode]).eval()
    assisted = _greedy(model, x, assistant_model=draft)
    assert torch.equal(plain, assisted)


def test_generate_creates_the_cache_and_crop_follows_transformers():
    model = tiny_model(**ROUTING_MODES["all"]).eval()
    x = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values
    assert isinstance(cache, HydraCache) and cache.get_seq_length() == 9
    cache.crop(0)
    assert cache.get_seq_length() == 9  # crop(0) removes nothing
    mine = HydraCache(model.config)  # a cache the user passes is the one generate fills
    with torch.no_grad():
        again = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0, past_key_values=mine)
    assert torch.equal(again, out.sequences) and mine.get_seq_length() == 9
    with pytest.raises(ValueError, match="negative"):
        cache.crop(2)


@pytest.mark.parametrize("mode", ["dense", "mod", "mor_expert", "all"])
def test_crop_in_the_middle_of_a_forward_restores_every_state(mode):
    """Assisted decoding verifies k tokens in one forward and keeps a prefix: crop must undo part of a forward."""
    model = tiny_model(**ROUTING_MODES[mode]).eval()
    x = torch.randint(1, 97, (2, 12))
    with torch.no_grad():
        cache = HydraCache(model.config)
        model(x[:, :5], past_key_values=cache, use_cache=True)
        cache.activate_past_recording()
        model(x[:, 5:11], past_key_values=cache, use_cache=True)  # 6 steps in one forward ...
        cache.crop(-4)  # ... of which 2 are kept
        assert cache.get_seq_length() == 7
        resumed = model(x[:, 7:], past_key_values=cache, use_cache=True).logits
        full = model(x).logits[:, 7:]
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=0)


def test_static_cache_generate_equals_dynamic():
    model = tiny_model(**ROUTING_MODES["mod"]).eval()
    x = torch.randint(1, 97, (2, 7))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    dynamic = _greedy(model, x, attention_mask=mask)
    static = _greedy(model, x, attention_mask=mask, cache_implementation="static")
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("mode", ["dense", "mod", "mor_token"])
def test_static_cache_decode_step_compiles_fullgraph(mode):
    model = tiny_model(**ROUTING_MODES[mode]).eval()
    x = torch.randint(1, 97, (2, 6))
    mask = torch.zeros(2, 12, dtype=torch.long)  # as generate passes it: padded to max_cache_len
    mask[:, :7] = 1
    mask[1, :2] = 0
    with torch.no_grad():
        caches = [HydraStaticCache(model.config, max_cache_len=12) for _ in range(2)]
        for cache in caches:
            out = model(x, attention_mask=mask, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        torch._dynamo.reset()
        step = torch.compile(model, fullgraph=True, backend="eager")
        compiled_logits = step(token, attention_mask=mask, past_key_values=caches[0], use_cache=True).logits
        eager_logits = model(token, attention_mask=mask, past_key_values=caches[1], use_cache=True).logits
        full = model(torch.cat([x, token], 1), attention_mask=mask[:, :7]).logits[:, -1:]
        # the next step reuses the compiled graph: the step count lives in a tensor, nothing recompiles
        mask[:, 7] = 1
        with torch.compiler.set_stance("fail_on_recompile"):
            second = step(token, attention_mask=mask, past_key_values=caches[0], use_cache=True).logits
        second_eager = model(token, attention_mask=mask, past_key_values=caches[1], use_cache=True).logits
        torch._dynamo.reset()
    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(eager_logits, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(second, second_eager, atol=1e-5, rtol=0)


def test_cache_bytes_per_token_are_a_compression_factor_below_llama():
    """Latent keys/values plus per-column metadata: <= 1.05 / C of a same-width Llama's cache per token."""
    width, heads, kv_heads, C, layers, T = 512, 8, 2, 4, 2, 64
    config = HydraConfig(
        vocab_size=64, hidden_size=width, intermediate_size=64, num_attention_heads=heads,
        num_key_value_heads=kv_heads, compression_factor=C, num_unique_blocks=layers, mor_recursions=1,
        num_hidden_layers=layers, kernel_backend="torch",
    )
    hydra = HydraForCausalLM(config).eval()
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=width, intermediate_size=64, num_attention_heads=heads,
        num_key_value_heads=kv_heads, num_hidden_layers=layers,
    )).eval()
    x = torch.randint(0, 64, (1, T))
    with torch.no_grad():
        hydra_cache = hydra(x, use_cache=True).past_key_values
        llama_cache = llama(x, use_cache=True).past_key_values
    rolling = sum(layer.rolling.numel() * layer.rolling.element_size() + layer.rolling_steps.numel() * layer.rolling_steps.element_size()
                  for layer in hydra_cache.layers)  # constant per sequence, not per token
    per_token = (hydra_cache.cache_bytes() - rolling) / T
    llama_per_token = sum(l.keys.numel() * 4 + l.values.numel() * 4 for l in llama_cache.layers) / T
    assert per_token <= 1.05 / C * llama_per_token, (per_token, llama_per_token)
    assert config.head_dim == hydra_cache.layers[0].keys.shape[-1]


# ---------------------------------------------------------------------------- packed sequences


def _pack(lengths, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    T = max(lengths)
    padded = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
        mask[i, : len(s)] = 1
    packed = torch.cat(seqs).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return padded, mask, packed, position_ids


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
@pytest.mark.parametrize("training", [False, True])
def test_padding_free_batch_equals_padded_batch(mode, training):
    overrides = dict(ROUTING_MODES[mode])
    if "moe_enabled" in overrides:
        overrides["moe_router_jitter"] = 0.0
    model = tiny_model(**overrides)
    model.train(training)
    lengths = [9, 5, 12]
    padded, mask, packed, position_ids = _pack(lengths)
    with torch.no_grad():
        ref = model(padded, attention_mask=mask).logits
        out = model(packed, position_ids=position_ids).logits[0]
    start = 0
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[start : start + n], ref[i, :n], atol=1e-5, rtol=0)
        start += n


def test_packed_sequences_do_not_see_each_other():
    model = tiny_model().eval()
    _, _, packed, position_ids = _pack([6, 6])
    changed = packed.clone()
    changed[0, :6] = torch.randint(1, 97, (6,))
    with torch.no_grad():
        a = model(packed, position_ids=position_ids).logits[0, 6:]
        b = model(changed, position_ids=position_ids).logits[0, 6:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- outputs


def test_return_dict_false_gives_tuples():
    model = tiny_model().eval()
    x = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        base = model.model(x, return_dict=False)
        lm = model(x, return_dict=False)
    assert isinstance(base, tuple) and base[0].shape == (2, 5, 64)
    assert isinstance(lm, tuple) and lm[0].shape == (2, 5, 97)


@pytest.mark.parametrize("mode", ["dense", "mod", "static"])
def test_output_attentions_cover_input_positions(mode):
    model = tiny_model(attn_implementation="eager", **ROUTING_MODES[mode]).eval()
    x = torch.randint(1, 97, (2, 7))
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    with torch.no_grad():
        out = model(x, attention_mask=mask, output_attentions=True)
        cache_out = model(x[:, :4], attention_mask=mask[:, :4], use_cache=True)
        step = model(x[:, 4:5], attention_mask=mask[:, :5], past_key_values=cache_out.past_key_values,
                     use_cache=True, output_attentions=True)
    H = model.config.num_attention_heads
    assert len(out.attentions) == model.config.num_hidden_layers
    for attn, processed in zip(out.attentions, out.routing.tokens_processed.values()):
        assert attn.shape == (2, H, 7, 7)
        assert torch.all(attn[0, :, :, :2] == 0)  # padding columns
        assert torch.all(attn.triu(1) == 0)  # causal
        rows = attn.sum(-1)  # each processed real query sums to 1, skipped / padding rows are 0
        assert torch.allclose(rows[rows > 0], torch.ones_like(rows[rows > 0]), atol=1e-5)
    for attn in step.attentions:
        assert attn.shape == (2, H, 1, 5)


# ---------------------------------------------------------------------------- compile


@pytest.mark.parametrize("mode", ["mod", "mor_expert", "static"])
def test_training_step_compiles_fullgraph(mode):
    """Training with static shapes (no padding, no packing): expert-choice top-k has a fixed size, so the whole
    forward + backward traces as one graph. aot_eager: dynamo + AOT autograd on CPU, no C++ compiler."""
    torch._dynamo.reset()
    model = tiny_model(seed=2, **ROUTING_MODES[mode]).train()
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    thresholds = {n: b.clone() for n, b in model.named_buffers() if n.endswith("threshold")}
    eager = model(x, labels=x)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for n, b in model.named_buffers():  # same running thresholds as the eager step saw
        if n in thresholds:
            b.copy_(thresholds[n])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()


def test_router_logits_only_when_asked_and_routing_ignored_at_inference():
    model = tiny_model(**ROUTING_MODES["moe"]).eval()
    x = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        plain = model(x)
        asked = model(x, output_router_logits=True)
    assert plain.router_logits is None
    assert len(asked.router_logits) == 2 and asked.router_logits[0].shape == (2 * 5, 3)
    assert "routing" in model.config.keys_to_ignore_at_inference


def test_grouped_decode_attention_equals_sdpa(monkeypatch):
    """The CPU decode path for long caches (two grouped matmuls) gives SDPA's result, inside the model too."""
    import torch.nn.functional as F

    from hydra_hf import modeling_hydra

    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    ours, _ = modeling_hydra.grouped_decode_attention(None, q, k, v, None, scaling=0.25)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    mask = torch.rand(3, 1, 1, 40) > 0.3
    ours, _ = modeling_hydra.grouped_decode_attention(None, q, k, v, mask, scaling=0.25)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)

    model = tiny_model().eval()  # dense: every cached column valid, so decode attention has no mask
    x = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        plain = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
        monkeypatch.setattr(modeling_hydra, "DECODE_MATMUL_MIN_KEYS", 0)
        calls = []
        real = modeling_hydra.grouped_decode_attention
        monkeypatch.setattr(modeling_hydra, "grouped_decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        grouped = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True)
        full = model(grouped.sequences).logits
    assert model.config._attn_implementation == "sdpa" and len(calls) > 0  # the grouped path really ran
    assert torch.equal(plain, grouped.sequences)
    for step, logits in enumerate(grouped.logits):
        torch.testing.assert_close(logits, full[:, 8 + step], atol=1e-4, rtol=0)
    # routed layers and left padding: the decode masks go through the same path
    routed = tiny_model(**ROUTING_MODES["all"]).eval()
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        out = routed.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
        full_mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
        full = routed(out.sequences, attention_mask=full_mask).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, 8 + step], atol=1e-4, rtol=0)


def test_named_like_an_in_tree_causal_lm():
    """transformers code that reads its model-name tables treats HYDRA as a causal LM (label smoothing shifts the
    labels, the text-generation pipeline accepts it), while the Auto classes still resolve it by registration."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.models.auto import modeling_auto

    assert "HydraForCausalLM" in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    assert "HydraModel" in modeling_auto.MODEL_MAPPING_NAMES.values()
    config = tiny_model().config
    assert isinstance(AutoModelForCausalLM.from_config(config), HydraForCausalLM)

    model = tiny_model().train()
    x = torch.randint(0, 97, (2, 10))
    args = TrainingArguments(output_dir="/tmp/hydra_label_smoothing", label_smoothing_factor=0.1, report_to=[],
                             use_cpu=True)
    trainer = Trainer(model=model, args=args)
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"input_ids": x, "labels": x})
        logits = model(x).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1), label_smoothing=0.1
    )
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
