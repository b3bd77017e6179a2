"""HydraForCausalLM: shapes, causality, cache equivalence (incl. left padding and beam search),
save/load, Auto classes, gradient checkpointing."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hydra_hf import HydraCache, HydraConfig, HydraForCausalLM, HydraModel

from conftest import tiny_config, tiny_model


def test_shapes_and_outputs():
    model = tiny_model()
    x = torch.randint(0, 97, (3, 11))
    out = model(x, output_hidden_states=True, labels=x)
    assert out.logits.shape == (3, 11, 97)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert isinstance(out.past_key_values, HydraCache) or out.past_key_values is None
    base = model.model(x)
    assert base.last_hidden_state.shape == (3, 11, 64)


def test_eager_and_sdpa_agree_and_attentions():
    torch.manual_seed(0)
    config = tiny_config()
    sdpa = HydraForCausalLM(config).eval()
    config_eager = tiny_config()
    config_eager._attn_implementation = "eager"
    eager = HydraForCausalLM(config_eager).eval()
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 97, (2, 9))
    a = sdpa(x).logits
    out = eager(x, output_attentions=True)
    assert torch.allclose(a, out.logits, atol=1e-5)
    assert len(out.attentions) == config.num_hidden_layers
    assert out.attentions[0].shape == (2, 4, 9, 9)


@pytest.mark.parametrize("kernels", [(3, 1), (2, 2), (1, 1), (4, 2)])
def test_causality(kernels):
    model = tiny_model(qk_conv_kernel_size=kernels[0], qk_channel_conv_kernel_size=kernels[1]).eval()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-5)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


def _generate_and_compare(model, input_ids, attention_mask, **gen_kwargs):
    with torch.no_grad():
        out = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=6, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0, **gen_kwargs,
        )
        seq = out.sequences
        T = input_ids.shape[1]
        full_mask = torch.cat([attention_mask, torch.ones(seq.shape[0], seq.shape[1] - T, dtype=torch.long)], 1)
        reference = model(seq, attention_mask=full_mask, use_cache=False).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, reference[:, T - 1 + step], atol=1e-4, rtol=0)
    return seq


def _padded_batch():
    torch.manual_seed(3)
    x = torch.randint(1, 97, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :1] = 0
    x[mask == 0] = 0
    return x, mask


def test_greedy_cache_matches_full_forward_with_left_padding():
    model = tiny_model(qk_conv_kernel_size=2, qk_channel_conv_kernel_size=2).eval()
    x, mask = _padded_batch()
    _generate_and_compare(model, x, mask, do_sample=False)


def test_sampling_cache_matches_full_forward():
    model = tiny_model().eval()
    x, mask = _padded_batch()
    torch.manual_seed(0)
    _generate_and_compare(model, x, mask, do_sample=True, top_k=20)


def test_left_padding_does_not_leak():
    """A left-padded row gives the same logits as the same row alone, whatever the pad ids are."""
    model = tiny_model().eval()
    x = torch.randint(1, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        alone = model(x[1:, 5:]).logits[0]
        for pad_id in (0, 13):
            x[1, :5] = pad_id
            padded = model(x, attention_mask=mask).logits[1, 5:]
            torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


def test_beam_search_matches_no_cache():
    model = tiny_model().eval()
    x, mask = _padded_batch()
    with torch.no_grad():
        cached = model.generate(x, attention_mask=mask, num_beams=3, max_new_tokens=5, do_sample=False, pad_token_id=0)
        uncached = model.generate(
            x, attention_mask=mask, num_beams=3, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0
        )
    assert torch.equal(cached, uncached)


def test_cache_layout_bytes_and_crop():
    model = tiny_model().eval()
    config = model.config
    x = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        out = model(x, use_cache=True)
    cache = out.past_key_values
    assert cache.get_seq_length() == 8 and len(cache.layers) == config.num_hidden_layers
    layer = cache.layers[0]
    Hk, h = config.num_key_value_heads, config.latent_head_dim
    assert layer.keys.shape == (2, Hk, 8, h)
    P = config.qk_conv_kernel_size + config.qk_channel_conv_kernel_size - 2
    Cs = config.num_value_shift_heads * h
    assert layer.rolling.shape == (2, max(P, 1), config.latent_size + Hk * h + Cs)
    # Latent K/V bytes per token per layer: Hk * h * 2 values; metadata 5 bytes per row and column.
    assert cache.kv_bytes() == config.num_hidden_layers * 2 * 8 * Hk * h * 2 * 4
    # crop follows transformers: negative = remove that many; 0 = nothing; positive = error
    cache2 = HydraCache(config)
    cache2.activate_past_recording()
    with torch.no_grad():
        model(x[:, :5], past_key_values=cache2, use_cache=True)
        a = model(x[:, 5:], past_key_values=cache2, use_cache=True).logits
        cache2.crop(-3)
        assert cache2.get_seq_length() == 5
        b = model(x[:, 5:], past_key_values=cache2, use_cache=True).logits
        cache2.crop(0)  # removes nothing (it only trims the recorded rolling states back to their working size)
        assert cache2.get_seq_length() == 8
        c = model(x[:, :1], past_key_values=cache2, use_cache=True).logits
        d = model(torch.cat([x, x[:, :1]], 1)).logits[:, -1:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, d, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="negative"):
        cache2.crop(3)
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-3)


def test_chunked_prefill_matches_full():
    model = tiny_model().eval()
    x = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        full = model(x).logits
        cache = HydraCache(model.config)
        first = model(x[:, :6], past_key_values=cache, use_cache=True).logits
        second = model(x[:, 6:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=0)


def test_save_load_round_trip_and_auto(tmp_path):
    model = tiny_model().eval()
    x = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith(".safetensors") for f in files)
    assert "model.safetensors.index.json" in files  # sharded
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, HydraForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, ref, atol=0, rtol=0)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(half(x).logits.float()).all()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HydraConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), HydraModel)


def test_tied_and_untied_embeddings():
    tied = tiny_model()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = tiny_model(tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_gradient_checkpointing_same_grads():
    x = torch.randint(0, 97, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = tiny_model(seed=1, mod_enabled=True, mor_enabled=True)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable()
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(0, 97, (2, 5)), attention_mask=torch.ones(2, 3))
