"""Every config the model accepts either runs on the Triton kernels or is refused up front.

For a grid of valid ``HydraConfig``s with odd sizes (odd / non-power-of-two head dims and head
counts, MQA, conv kernels 1..8, widths above the limits), either ``check_kernel_backend`` refuses
``kernel_backend="triton"`` naming the field, or every dispatcher with ``backend="triton"`` runs its
Triton kernel (forward and backward, in the interpreter on CPU) on tensors of the config's shapes
and matches the reference. Ops whose sizes are outside ``TRITON_LIMITS`` never reach their kernel
(the per-call fallback ``"auto"`` relies on on a GPU). So no config gets to a kernel that errors
at step 1.
"""

import importlib

import pytest
import torch

from hydra_hf import HydraConfig, HydraForCausalLM, ops
from hydra_hf.ops import reference as R
from conftest import DEVICE, rel

pytestmark = pytest.mark.usefixtures("triton_interpreter")

# name -> (config overrides, expected refusal for kernel_backend="triton" or None)
GRID = {
    # odd head dim 7, 3 query heads, MQA (1 KV head: no value shift, which needs 2), the default conv pair
    "h7-hq3-mqa": (dict(hidden_size=42, compression_factor=2, num_attention_heads=3, num_key_value_heads=1,
                        use_value_shift=False, qk_conv_kernel_size=3, qk_channel_conv_kernel_size=2), None),
    # the smallest head dim, 5 heads, no conv taps (Ks = Kc = 1), full RoPE, odd hidden
    "h2-hq5": (dict(hidden_size=10, compression_factor=1, num_attention_heads=5, num_key_value_heads=5,
                    qk_conv_kernel_size=1, qk_channel_conv_kernel_size=1, partial_rotary_factor=1.0), None),
    # the largest supported conv kernels at a non-power-of-two head dim, compression 3
    "h6-ks4-kc2": (dict(hidden_size=36, compression_factor=3, num_attention_heads=2, num_key_value_heads=2,
                        qk_conv_kernel_size=4, qk_channel_conv_kernel_size=2, use_qk_mean=False), None),
    # conv kernels the config accepts but the kernels do not (5..8 and 3..8)
    "ks8-kc8": (dict(hidden_size=40, compression_factor=2, num_attention_heads=4, num_key_value_heads=2,
                     qk_conv_kernel_size=8, qk_channel_conv_kernel_size=8), "qk_conv_kernel_size"),
    "ks5": (dict(hidden_size=24, compression_factor=2, num_attention_heads=4, num_key_value_heads=2,
                 qk_conv_kernel_size=5, qk_channel_conv_kernel_size=1), "qk_conv_kernel_size"),
    "kc3": (dict(hidden_size=24, compression_factor=2, num_attention_heads=4, num_key_value_heads=2,
                 qk_conv_kernel_size=2, qk_channel_conv_kernel_size=3), "qk_channel_conv_kernel_size"),
    # head dim 65 > 64 (odd, one above the limit)
    "h65": (dict(hidden_size=130, compression_factor=1, num_attention_heads=2, num_key_value_heads=1,
                 use_value_shift=False), "latent head dim"),
    # 33 heads of 33: latent width 1089 but a 64 x 64 register tile in qk_norm_rope (1-tap convs: the
    # conv kernels still run, on 33 heads, which is the slow part in the interpreter)
    "h33-hq33": (dict(hidden_size=1089, compression_factor=1, num_attention_heads=33, num_key_value_heads=3,
                      qk_conv_kernel_size=1, qk_channel_conv_kernel_size=1), "rounded up to a power of two"),
    # hidden 8200 > 8192 (RMSNorm row), odd latent head dim 41
    "hidden8200": (dict(hidden_size=8200, compression_factor=100, num_attention_heads=2, num_key_value_heads=1,
                        use_value_shift=False), "hidden_size"),
}
KERNEL_FUNCTIONS = {  # op -> (kernel module, function the dispatcher calls)
    "causal_conv": ("causal_conv_triton", "causal_conv_triton"),
    "qk_norm_rope": ("qk_norm_rope_triton", "qk_norm_rope_triton"),
    "gather_tokens": ("routing_gather_triton", "gather_tokens_triton"),
    "scatter_gated_add": ("routing_gather_triton", "scatter_gated_add_triton"),
    "moe_permute": ("moe_permute_triton", "moe_permute_triton"),
    "moe_unpermute": ("moe_permute_triton", "moe_unpermute_triton"),
    "rms_norm": ("rms_norm_triton", "rms_norm_triton"),
}
# which ops each TRITON_LIMITS entry keeps off the kernels
LIMITED_OPS = {
    "qk_conv_kernel_size": {"causal_conv"}, "qk_channel_conv_kernel_size": {"causal_conv"},
    "latent_head_dim": {"causal_conv", "qk_norm_rope"}, "padded_latent_size": {"qk_norm_rope"},
    "hidden_size": {"rms_norm"},
}


def _config(overrides, backend="triton"):
    return HydraConfig(vocab_size=11, intermediate_size=16, num_unique_blocks=1, mor_recursions=1,
                       kernel_backend=backend, **overrides)


def _leaf(*shape, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE).requires_grad_()


def _op_cases(config, B=2, T=5, gen=None):
    """op -> (dispatcher call, reference call, differentiable inputs) at the config's sizes."""
    E, Hq, Hk, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.latent_head_dim
    Ks, Kc, r = config.qk_conv_kernel_size, config.qk_channel_conv_kernel_size, config.rotary_dim
    P = ops.causal_conv_state_len(Ks, Kc)
    cases = {}
    for H, tag in ((Hq, "q"), (Hk, "k")):
        C = H * h
        x, ws, wc = _leaf(B, T, C, gen=gen), _leaf(C, Ks, gen=gen, scale=0.5), _leaf(C, h, Kc, gen=gen, scale=0.3)
        state = _leaf(B, P, C, gen=gen)
        cases[f"causal_conv/{tag}"] = (
            lambda x=x, ws=ws, wc=wc, H=H, st=state, be=None: ops.causal_conv(x, ws, wc, H, st, backend=be),
            lambda x=x, ws=ws, wc=wc, H=H, st=state: R.causal_conv_ref(x, ws, wc, H, st), (x, ws, wc, state))
    q, k = _leaf(B, T, Hq, h, gen=gen), _leaf(B, T, Hk, h, gen=gen)
    qm, km = (_leaf(B, T, Hq, h, gen=gen), _leaf(B, T, Hk, h, gen=gen)) if config.use_qk_mean else (None, None)
    temp = (torch.rand(Hk, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    ang = torch.randn(1, T, r // 2, generator=gen)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(DEVICE), torch.cat([ang.sin()] * 2, -1).to(DEVICE)
    qk_args = (q, k, qm, km, temp, cos, sin)
    cases["qk_norm_rope"] = (lambda be=None: ops.qk_norm_rope(*qk_args, backend=be),
                             lambda: R.qk_norm_rope_ref(*qk_args), (q, k, qm, km, temp))
    x, K = _leaf(B, T, E, gen=gen), 3
    index = torch.stack([torch.randperm(T, generator=gen)[:K] for _ in range(B)]).to(DEVICE)
    upd, gate = _leaf(B, K, E, gen=gen), _leaf(B, K, gen=gen)
    cases["gather_tokens"] = (lambda be=None: ops.gather_tokens(x, index, backend=be),
                              lambda: R.gather_tokens_ref(x, index), (x,))
    cases["scatter_gated_add"] = (lambda be=None: ops.scatter_gated_add(x, upd, index, gate, backend=be),
                                  lambda: R.scatter_gated_add_ref(x, upd, index, gate), (x, upd, gate))
    N, X, topk = B * T, 3, 2
    xt = _leaf(N, E, gen=gen)
    experts = torch.stack([torch.randperm(X, generator=gen)[:topk] for _ in range(N)]).to(DEVICE)
    cases["moe_permute"] = (lambda be=None: ops.moe_permute(xt, experts, X, backend=be)[0],
                            lambda: R.moe_permute_ref(xt, experts, X)[0], (xt,))
    eo, wts = _leaf(N * topk, E, gen=gen), _leaf(N, topk, gen=gen)
    pairs = R.moe_permute_ref(xt.detach(), experts, X)[2]
    cases["moe_unpermute"] = (lambda be=None: ops.moe_unpermute(eo, pairs, wts, backend=be),
                              lambda: R.moe_unpermute_ref(eo, pairs, wts), (eo, wts))
    w = (1 + 0.1 * torch.randn(E, generator=gen)).to(DEVICE).requires_grad_()
    cases["rms_norm"] = (lambda be=None: ops.rms_norm(x, w, 1e-6, backend=be), lambda: R.rms_norm_ref(x, w, 1e-6), (x, w))
    return cases


def _outputs_and_grads(fn, inputs):
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    leaves = [t for t in inputs if t is not None]
    seed = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=seed).to(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, cotangents, allow_unused=True)
    return [o.detach() for o in outs], grads


def _spy_on_kernels(monkeypatch):
    calls = {op: 0 for op in KERNEL_FUNCTIONS}
    for op, (module, fn_name) in KERNEL_FUNCTIONS.items():
        mod = importlib.import_module(f"hydra_hf.ops.{module}")
        real = getattr(mod, fn_name)

        def spy(*args, _op=op, _real=real, **kwargs):
            calls[_op] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, fn_name, spy)
    return calls


@pytest.mark.parametrize("name", list(GRID))
def test_config_runs_on_triton_or_is_refused(name, monkeypatch):
    overrides, refusal = GRID[name]
    config = _config(overrides)  # a valid config
    violations = ops.triton_config_violations(config)
    if refusal is None:
        assert violations == []
        ops.check_kernel_backend(config)
    else:
        with pytest.raises(ValueError, match=refusal):
            ops.check_kernel_backend(config)
        with pytest.raises(ValueError, match=refusal):  # model construction refuses it too
            HydraForCausalLM(config)
        for backend in ("auto", "torch"):
            ops.check_kernel_backend(_config(overrides, backend))
    sizes = ops.triton_config_sizes(config)
    blocked = {op for key, ops_ in LIMITED_OPS.items() if sizes[key] > ops.TRITON_LIMITS[key] for op in ops_}

    calls = _spy_on_kernels(monkeypatch)
    batch = 1 if config.num_attention_heads > 8 else 2  # keeps the 33-head case fast in the interpreter
    for case, (call, ref, inputs) in _op_cases(config, B=batch, gen=torch.Generator().manual_seed(0)).items():
        op = case.split("/")[0]
        before = calls[op]
        out, grads = _outputs_and_grads(lambda: call(be="triton"), inputs)
        ran_kernel = calls[op] > before
        assert ran_kernel == (op not in blocked), f"{name} {case}: kernel ran={ran_kernel}"
        ref_out, ref_grads = _outputs_and_grads(ref, inputs)
        for a, b in zip(out, ref_out):
            assert a.shape == b.shape and rel(a, b) < 1e-5, f"{name} {case}"
        for a, b in zip(grads, ref_grads):
            assert (a is None) == (b is None) and (a is None or rel(a, b) < 1e-4), f"{name} {case} grad"


def test_the_grid_covers_odd_sizes_and_every_conv_kernel_class():
    configs = [_config(o) for o, _ in GRID.values()]
    assert any(c.latent_head_dim % 2 for c in configs) and any(c.num_attention_heads % 2 for c in configs)
    assert any(c.num_key_value_heads == 1 for c in configs)
    assert {c.qk_conv_kernel_size for c in configs} >= {1, 2, 3, 4, 5, 8}
    assert {c.qk_channel_conv_kernel_size for c in configs} >= {1, 2, 3, 8}
    refused = {r for _, r in GRID.values() if r}
    assert len(refused) == len(ops.TRITON_LIMITS)  # one refused config per limit


def test_float64_runs_the_reference(monkeypatch):
    """The kernels compute in fp32 / bf16 / fp16: float64 tensors take the reference on every backend."""
    calls = _spy_on_kernels(monkeypatch)
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)

    x, ws, wc = randn(2, 5, 21), randn(21, 3), randn(21, 7, 2)
    assert torch.equal(ops.causal_conv(x, ws, wc, 3, backend="triton"), R.causal_conv_ref(x, ws, wc, 3))
    xr, w = randn(4, 42), randn(42)
    assert torch.equal(ops.rms_norm(xr, w, 1e-6, backend="triton"), R.rms_norm_ref(xr, w, 1e-6))
    idx = torch.tensor([[0, 2], [1, 4]], device=DEVICE)
    xg = randn(2, 5, 42)
    assert torch.equal(ops.gather_tokens(xg, idx, backend="triton"), R.gather_tokens_ref(xg, idx))
    assert sum(calls.values()) == 0
    ops.causal_conv(x.float(), ws.float(), wc.float(), 3, backend="triton")  # fp32: the kernel
    assert calls["causal_conv"] == 1


def test_odd_config_model_step_on_the_triton_backend():
    """End to end: the odd MQA config trains a step on kernel_backend="triton" like "torch" (loss and every gradient)."""
    overrides = dict(GRID["h7-hq3-mqa"][0], mod_enabled=True, mod_every=1, moe_enabled=True, moe_num_layers=1,
                     num_local_experts=3, num_experts_per_tok=2)
    ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = HydraForCausalLM(_config(overrides, backend)).to(DEVICE)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[backend] = (out.loss.detach(), grad)
    assert rel(results["triton"][0], results["torch"][0]) < 1e-5
    assert rel(results["triton"][1], results["torch"][1]) < 1e-4
