"""HYDRA's CCGQA attention configured as CCA equals transformers' ZAYA attention (the CCA of arXiv 2510.04476).

transformers ships ZAYA (`transformers.models.zaya`; tested with 5.20.2 and 5.25.0), whose `ZayaAttention` is the authors' Compressed
Convolutional Attention: SPEC section 3 with both conv kernels 2, the q-k mean and the value shift. Here one
ZAYA attention gets random weights, `zaya_to_hydra_state_dict` maps them into a `HydraAttention`, and the two
attention outputs must agree in fp32 to 1e-5:

* (a) a full forward over a sequence;
* (b) cached decoding (prefill a prefix, then one token at a time, each side with its own cache) against the
  full forward.

`test_own_decode_matches_own_full` checks each side's decode against its own full forward, so that a failure of
(b) can be attributed. `test_mapping_is_sensitive` is the negative control: perturbing any one mapped tensor, or
getting one convention of the mapping wrong, makes the comparison fail by orders of magnitude.

Both sides run as whole one-layer models (`ZayaModel`, `HydraModel` with one block and one recursion) fed the
same `inputs_embeds`; the attention output is read with a forward hook on `layers[0].self_attn`, so the test
does not depend on the attention module's forward signature. The input RMSNorms get the same weight and eps, so
the two attentions see the same normalised input (ZAYA's input scale / bias before the norm stay at their
identity init).

Skips only when the installed transformers has no ZAYA.
"""

import inspect

import pytest
import torch

pytest.importorskip("transformers.models.zaya", reason="this transformers has no ZAYA")

from transformers import DynamicCache  # noqa: E402
from transformers.models.zaya import ZayaConfig, ZayaModel  # noqa: E402

from hydra_hf import HydraCache, HydraConfig, HydraModel  # noqa: E402
from conftest import rel  # noqa: E402

TOL = 1e-5


# ================================================================ the HYDRA side: every call into HYDRA internals
# Everything below that touches HYDRA beyond `HydraConfig` field names is in this block (the model's forward
# and cache arguments, the module path of the attention, its parameter names): adapt here when those change.

def hydra_attention(model: HydraModel) -> torch.nn.Module:
    """The attention module of the model's only block."""
    return model.layers[0].self_attn


def hydra_input_norm(model: HydraModel) -> torch.nn.Module:
    """The RMSNorm in front of that attention."""
    return model.layers[0].input_layernorm


def new_hydra_cache(model: HydraModel):
    return HydraCache(model.config)


def hydra_attention_forward(model: HydraModel, x: torch.Tensor, cache=None) -> torch.Tensor:
    """Attention output (B, T, E) of the only block for inputs_embeds `x` (B, T, E), extending `cache` if given."""
    captured = []
    handle = hydra_attention(model).register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        with torch.no_grad():
            if cache is None:
                model(inputs_embeds=x, use_cache=False)
            else:
                model(inputs_embeds=x, cache=cache, use_cache=True)
    finally:
        handle.remove()
    assert len(captured) == 1
    return captured[0]


# ================================================================ the ZAYA side

def new_zaya_cache(model: ZayaModel):
    return DynamicCache(config=model.config)


# transformers 5.25 renamed ZAYA's `past_key_values` to `cache` (the old name is deprecated, to go in 5.40);
# 5.20 - 5.24 only know `past_key_values` and would silently drop `cache=` into **kwargs (no cache at all).
ZAYA_CACHE_KWARG = "cache" if "cache" in inspect.signature(ZayaModel.forward).parameters else "past_key_values"


def zaya_attention_forward(model: ZayaModel, x: torch.Tensor, cache=None) -> torch.Tensor:
    """Attention output (B, T, E) of ZAYA's only layer for inputs_embeds `x`, extending `cache` if given."""
    captured = []
    handle = model.layers[0].self_attn.register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        with torch.no_grad():
            if cache is None:
                model(inputs_embeds=x, use_cache=False)
            else:
                model(inputs_embeds=x, use_cache=True, **{ZAYA_CACHE_KWARG: cache})
    finally:
        handle.remove()
    assert len(captured) == 1
    return captured[0]


# ================================================================ the mapping

def zaya_to_hydra_state_dict(zaya_attention) -> dict[str, torch.Tensor]:
    """`ZayaAttention` weights -> a `HydraAttention` state dict (keys relative to the attention module).

    ZAYA config -> HYDRA config: `cca_time0` = `qk_conv_kernel_size`, `cca_time1` = `qk_channel_conv_kernel_size`
    (2 and 2), `use_qk_mean=True`, `use_value_shift=True` with an even number of KV heads, the same Hq / Hk,
    `head_dim` = HYDRA's latent head dim `hidden_size / (compression_factor * num_attention_heads)`,
    `rope_theta` and `partial_rotary_factor` of ZAYA's layer type, `rms_norm_eps` equal. The tensors:

    * `q_proj`, `k_proj`, `o_proj`: as they are (same head order: head i = channels [i*h, (i+1)*h)).
    * `v_proj` = cat(`v_proj_current`, `v_proj_delayed`) along the output: ZAYA's value is
      cat(current, delayed) viewed as (Hk, h), so the *last* Hk/2 KV heads are the shifted ones, as in HYDRA
      (`num_value_shift_heads`); at the first token ZAYA's delayed half is `v_proj_delayed(0)` = 0 (no bias).
    * The convs: ZAYA runs one `Conv1d` pair over cat(q, k) channels (queries first), as HYDRA's `causal_conv`
      does over cat(q, k); both are cross-correlations over left-padded time, out[t] = sum_j w[j] x[t - K + 1 + j]
      (tap K-1 multiplies the current token). So `conv_qk_depthwise.weight` (Cq+Ck, 1, K0) gives
      `q_seq_conv` / `k_seq_conv` (C, Ks) by dropping the singleton dim and splitting the channels at Cq = Hq*h;
      `conv_qk_grouped.weight` (Cq+Ck, h, K1), conv1d's grouped layout (out channel, in channel of its head, tap),
      is already HYDRA's `q_chan_conv` / `k_chan_conv` (C, h, Kc) layout, split the same way.
    * `key_temperature` = `qk_norm.temp` (both multiply the L2-normalised, sqrt(h)-scaled keys; queries get no
      temperature; both scale the scores by h**-0.5).
    * The q-k mean (ZAYA's "residual" path: m_q = (q + k repeated over its query group) / 2, m_k = mean of m_q over
      the group) and partial RoPE (rotate_half on the first `int(h * partial_rotary_factor)` channels) need no
      weights and agree as they are.

    HYDRA's convs and projections have no bias, so the mapping is exact only for a ZAYA attention without biases:
    `attention_bias=False` and zero conv biases (`nn.Conv1d` creates them; a bias adds a constant per channel to the
    conv output, which HYDRA cannot represent). Raises `ValueError` otherwise.
    """
    proj = zaya_attention.qkv_proj
    for name, module in (("q_proj", proj.q_proj), ("k_proj", proj.k_proj), ("v_proj_current", proj.v_proj_current),
                         ("v_proj_delayed", proj.v_proj_delayed), ("o_proj", zaya_attention.o_proj),
                         ("conv_qk_depthwise", proj.conv_qk_depthwise), ("conv_qk_grouped", proj.conv_qk_grouped)):
        if module.bias is not None and bool(module.bias.detach().ne(0).any()):
            raise ValueError(f"ZAYA {name} has a non-zero bias; HYDRA's CCGQA has no bias there")
    if proj.num_key_value_heads % 2:
        raise ValueError("ZAYA's value shift splits the KV width in halves: needs an even number of KV heads")
    Cq = proj.num_attention_heads * proj.head_dim
    depthwise = proj.conv_qk_depthwise.weight.detach()  # (Cq + Ck, 1, K0)
    grouped = proj.conv_qk_grouped.weight.detach()  # (Cq + Ck, h, K1)
    state = {
        "q_proj.weight": proj.q_proj.weight,
        "k_proj.weight": proj.k_proj.weight,
        "v_proj.weight": torch.cat([proj.v_proj_current.weight, proj.v_proj_delayed.weight], dim=0),
        "o_proj.weight": zaya_attention.o_proj.weight,
        "q_seq_conv": depthwise[:Cq, 0],
        "k_seq_conv": depthwise[Cq:, 0],
        "q_chan_conv": grouped[:Cq],
        "k_chan_conv": grouped[Cq:],
        "key_temperature": zaya_attention.qk_norm.temp,
    }
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


# ================================================================ the two models

# Hq = 8 query heads in Hk = 4 KV groups (the q-k mean averages over real groups, two of four KV heads shift),
# latent head dim h = 128 / (2 * 8) = 8, RoPE on 4 of its channels.
E, HQ, HK, C = 128, 8, 4, 2
H_DIM = E // (C * HQ)
ROPE_THETA, ROTARY_FRACTION, EPS = 10000.0, 0.5, 1e-5
SEQ, PREFIX, BATCH = 10, 4, 2


def zaya_config() -> ZayaConfig:
    return ZayaConfig(
        vocab_size=128, hidden_size=E, num_hidden_layers=1, num_attention_heads=HQ, num_key_value_heads=HK,
        head_dim=H_DIM, cca_time0=2, cca_time1=2, rms_norm_eps=EPS, max_position_embeddings=64,
        rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": ROPE_THETA,
                                    "partial_rotary_factor": ROTARY_FRACTION}},
        moe_intermediate_size=32, num_experts=2, router_hidden_size=16,  # the (unused) MoE after the attention
    )


def hydra_config() -> HydraConfig:
    return HydraConfig(
        vocab_size=128, hidden_size=E, intermediate_size=32, num_attention_heads=HQ, num_key_value_heads=HK,
        compression_factor=C, qk_conv_kernel_size=2, qk_channel_conv_kernel_size=2, use_qk_mean=True,
        use_value_shift=True, partial_rotary_factor=ROTARY_FRACTION, rope_theta=ROPE_THETA, rms_norm_eps=EPS,
        num_unique_blocks=1, mor_recursions=1, kernel_backend="torch", max_position_embeddings=64,
    )


def build_zaya(seed: int = 0) -> ZayaModel:
    """One-layer ZAYA with random attention weights (bias-free) and a random input-norm weight."""
    torch.manual_seed(seed)
    model = ZayaModel(zaya_config()).eval()
    with torch.no_grad():
        for name, param in model.layers[0].self_attn.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
            elif name == "qk_norm.temp":  # initialised to 0 (keys all zero): any positive spread
                param.uniform_(0.5, 2.0)
            elif "conv" in name:
                param.normal_(0.0, 0.5)
            else:  # projections: q/k heads of norm ~1-3, far above the norm eps of either side
                param.normal_(0.0, 0.1)
        model.layers[0].input_layernorm.weight.uniform_(0.5, 1.5)
    return model


def build_hydra(zaya: ZayaModel, state: dict[str, torch.Tensor] | None = None) -> HydraModel:
    """The HYDRA model with `zaya`'s attention mapped in (or `state` instead) and the same input-norm weight."""
    model = HydraModel(hydra_config()).eval()
    zaya_attention = zaya.layers[0].self_attn
    hydra_attention(model).load_state_dict(state if state is not None else zaya_to_hydra_state_dict(zaya_attention))
    with torch.no_grad():
        hydra_input_norm(model).weight.copy_(zaya.layers[0].input_layernorm.weight)
    return model


@pytest.fixture(scope="module")
def models():
    zaya = build_zaya()
    return zaya, build_hydra(zaya)


@pytest.fixture(scope="module")
def embeds():
    return torch.randn(BATCH, SEQ, E, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(models, embeds):
    """ZAYA's attention output over the whole sequence (full forward, no cache)."""
    return zaya_attention_forward(models[0], embeds)


def decode(forward, model, new_cache, x: torch.Tensor) -> torch.Tensor:
    """Prefill x[:, :PREFIX] into a fresh cache, then feed one token at a time: the outputs of all SEQ positions."""
    cache = new_cache(model)
    outs = [forward(model, x[:, :PREFIX], cache)]
    for t in range(PREFIX, x.shape[1]):
        outs.append(forward(model, x[:, t : t + 1], cache))
    return torch.cat(outs, dim=1)


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    err, max_abs = rel(out, ref), (out - ref).abs().max().item()
    peak = ref.abs().max().item()
    assert err <= tol and max_abs <= tol * peak, f"{what}: rel {err:.2e}, max abs {max_abs:.2e} (peak {peak:.2f})"


SIDES = {"zaya": (zaya_attention_forward, new_zaya_cache), "hydra": (hydra_attention_forward, new_hydra_cache)}


# ================================================================ the tests

def test_full_forward_matches_zaya(models, embeds, reference):
    assert reference.abs().max() > 0.1  # a real signal, not a vanishing output
    assert_close(hydra_attention_forward(models[1], embeds), reference, "HYDRA full vs ZAYA full")


def test_cached_decode_matches_zaya(models, embeds, reference):
    zaya, hydra = models
    out = decode(hydra_attention_forward, hydra, new_hydra_cache, embeds)
    assert_close(out, reference, "HYDRA cached decode vs ZAYA full")
    zaya_decoded = decode(zaya_attention_forward, zaya, new_zaya_cache, embeds)
    assert_close(out, zaya_decoded, "HYDRA cached decode vs ZAYA cached decode")


@pytest.mark.parametrize("side", list(SIDES))
def test_own_decode_matches_own_full(models, embeds, side):
    """Each side alone: cached decode == its own full forward (attributes a failure of the cross-check)."""
    model = dict(zip(SIDES, models))[side]
    forward, new_cache = SIDES[side]
    assert_close(decode(forward, model, new_cache, embeds), forward(model, embeds), f"{side} decode vs {side} full")


def _swap_value_halves(state):
    w = state["v_proj.weight"]
    state["v_proj.weight"] = torch.cat([w[w.shape[0] // 2 :], w[: w.shape[0] // 2]])


def _transpose_chan_conv(state):
    for key in ("q_chan_conv", "k_chan_conv"):
        w = state[key]  # (C, h, K): per head (h_out, h_in) -> (h_in, h_out)
        state[key] = w.view(-1, H_DIM, H_DIM, w.shape[-1]).transpose(1, 2).reshape(w.shape).contiguous()


def _flip_taps(state):
    for key in ("q_seq_conv", "k_seq_conv", "q_chan_conv", "k_chan_conv"):
        state[key] = state[key].flip(-1).contiguous()


def _inverse_temperature(state):
    state["key_temperature"] = 1.0 / state["key_temperature"]


WRONG_CONVENTIONS = {
    "value_shift_on_first_half": _swap_value_halves,
    "chan_conv_transposed": _transpose_chan_conv,
    "conv_taps_flipped": _flip_taps,
    "temperature_inverted": _inverse_temperature,
}
MAPPED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "q_seq_conv", "k_seq_conv",
          "q_chan_conv", "k_chan_conv", "key_temperature")


@pytest.mark.parametrize("change", list(MAPPED) + list(WRONG_CONVENTIONS))
def test_mapping_is_sensitive(models, embeds, reference, change):
    """Negative control: one perturbed tensor (1% noise) or one wrong convention breaks the match (>> TOL)."""
    zaya, _ = models
    state = zaya_to_hydra_state_dict(zaya.layers[0].self_attn)
    if change in WRONG_CONVENTIONS:
        WRONG_CONVENTIONS[change](state)
    else:
        noise = torch.randn(state[change].shape, generator=torch.Generator().manual_seed(2))
        state[change] = state[change] + 0.01 * state[change].abs().mean() * noise
    out = hydra_attention_forward(build_hydra(zaya, state), embeds)
    assert rel(out, reference) > 10 * TOL  # measured >= 2.8e-3 for these changes; the mapped error is ~2e-7


def test_mapping_refuses_conv_bias():
    zaya = build_zaya()
    with torch.no_grad():
        zaya.layers[0].self_attn.qkv_proj.conv_qk_grouped.bias[0] = 0.1
    with pytest.raises(ValueError, match="conv_qk_grouped"):
        zaya_to_hydra_state_dict(zaya.layers[0].self_attn)
