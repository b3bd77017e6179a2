"""RMSNorm / SwiGLU / fused linear cross-entropy through the dispatcher, and the backend rules.

Our Triton RMSNorm runs on CPU in the Triton interpreter (``TRITON_INTERPRET=1`` while the kernel modules are imported and around each test: see
``conftest.py``). Liger's
kernels (RMSNorm, SwiGLU, fused linear cross-entropy) need CUDA: those variants are the only
skipped tests on a CPU machine.
"""

import pytest
import torch
import torch.nn.functional as F

from hydra_hf import ops
from hydra_hf.ops import reference as R
from hydra_hf.ops.reference import linear_cross_entropy_ref
from hydra_hf.ops.rms_norm_triton import rms_norm_triton
from conftest import CUDA_ONLY, DEVICE, rel

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _leaf(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()


@pytest.mark.parametrize("shape", [(1, 63, 24), (3, 5, 100), (7, 192), (2, 3, 4, 56)])
def test_triton_rms_norm_matches_reference(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = _leaf(*shape, gen=gen, scale=3.0)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(DEVICE).requires_grad_()
    out = rms_norm_triton(x, w, 1e-6)
    ref = R.rms_norm_ref(x, w, 1e-6)
    assert out.shape == ref.shape and out.dtype == ref.dtype and rel(out, ref) < 1e-6
    g = torch.randn_like(ref)
    for name, a, b in zip(("x", "weight"), torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        assert rel(a, b) < 1e-5, f"grad {name}: rel {rel(a, b):.2e}"


def test_dispatcher_rms_norm_swiglu_ce_on_this_device():
    gen = torch.Generator().manual_seed(1)
    x = _leaf(2, 5, 40, gen=gen)
    w = _leaf(40, gen=gen)
    a, b = _leaf(3, 36, gen=gen), _leaf(3, 36, gen=gen)
    h, W = _leaf(9, 40, gen=gen), _leaf(13, 40, gen=gen)
    labels = torch.randint(0, 13, (9,), generator=gen).to(DEVICE)
    labels[2] = -100
    for backend in ops.KERNEL_BACKENDS:
        assert rel(ops.rms_norm(x, w, 1e-6, backend=backend), R.rms_norm_ref(x, w, 1e-6)) < 1e-5
        assert rel(ops.swiglu(a, b, backend=backend), R.swiglu_ref(a, b)) < 1e-5
        loss = ops.fused_linear_cross_entropy(h, W, labels, backend=backend)
        ref = linear_cross_entropy_ref(h, W, labels)
        assert loss.dim() == 0 and rel(loss, ref) < 1e-5
        ga = torch.autograd.grad(loss, (h, W))
        gb = torch.autograd.grad(ref, (h, W))
        assert all(rel(p, q) < 1e-4 for p, q in zip(ga, gb))


def test_linear_cross_entropy_reference_is_mean_over_kept_labels():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(6, 8, generator=gen)
    W = torch.randn(11, 8, generator=gen)
    labels = torch.tensor([1, -100, 3, 10, -100, 0])
    logp = torch.log_softmax(h @ W.T, dim=-1)  # (N, V)
    keep = labels != -100
    expected = -logp[keep, labels[keep]].mean()
    assert torch.allclose(linear_cross_entropy_ref(h, W, labels), expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(linear_cross_entropy_ref(h, W, labels.masked_fill(~keep, 7), ignore_index=7), expected)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy_ref(h, W, labels[:3])
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy_ref(h, W[:, :5], labels)


def test_auto_backend_and_bad_backend():
    gen = torch.Generator().manual_seed(3)
    x = _leaf(2, 4, 16, gen=gen)
    ws, wc = _leaf(16, 2, gen=gen), _leaf(16, 8, 2, gen=gen)
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert ops.resolve_backend("auto", torch.device("cuda")) == "triton"
    # "auto" reaching the dispatcher: the reference on CPU, Triton on CUDA; same numbers either way
    assert rel(ops.causal_conv(x, ws, wc, 2, backend="auto"), R.causal_conv_ref(x, ws, wc, 2)) < 1e-5
    for bad in ("cuda", "Triton", ""):
        with pytest.raises(ValueError, match="backend"):
            ops.rms_norm(x, ws[:, 0], 1e-6, backend=bad)
        with pytest.raises(ValueError, match="kernel_backend"):
            ops.resolve_backend(bad, torch.device("cpu"))


def test_dispatcher_names_are_functions_and_kernel_modules_have_their_own_names():
    import types

    import hydra_hf.ops.causal_conv_triton as cc  # a plain import binds the module, under its own name
    import hydra_hf.ops.cross_entropy_liger
    import hydra_hf.ops.moe_permute_triton
    import hydra_hf.ops.qk_norm_rope_triton
    import hydra_hf.ops.rms_norm_triton
    import hydra_hf.ops.routing_gather_triton  # noqa: F401

    assert isinstance(cc, types.ModuleType) and cc.causal_conv_triton.__module__ == "hydra_hf.ops.causal_conv_triton"
    assert type(ops) is types.ModuleType  # no module-class trick
    modules = {name for name, value in vars(ops).items() if isinstance(value, types.ModuleType)}
    assert not modules & set(ops.__all__) - {"reference"}  # no kernel module shadows a dispatcher name
    for name in ops.__all__:
        if name != "reference" and not name.isupper():  # the constants: KERNEL_BACKENDS, TRITON_LIMITS, ...
            fn = getattr(ops, name)
            assert isinstance(fn, types.FunctionType) and fn.__module__.startswith("hydra_hf.ops_"), name
    from hydra_hf.ops.reference import causal_conv_ref

    assert ops.reference.causal_conv_ref is causal_conv_ref


@CUDA_ONLY
def test_liger_rms_norm_swiglu_cuda_bf16():
    gen = torch.Generator().manual_seed(4)
    x = _leaf(8, 1024, 768, gen=gen, dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(768, generator=gen)).to(DEVICE, torch.bfloat16).requires_grad_()
    a = _leaf(4096, 2048, gen=gen, dtype=torch.bfloat16)
    b = _leaf(4096, 2048, gen=gen, dtype=torch.bfloat16)
    for backend in ("liger", "triton", "auto"):
        out, ref = ops.rms_norm(x, w, 1e-6, backend=backend), R.rms_norm_ref(x, w, 1e-6)
        assert rel(out, ref) < 1e-2
        g = torch.randn_like(ref)
        assert all(rel(p, q) < 2e-2 for p, q in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)))
        out, ref = ops.swiglu(a, b, backend=backend), R.swiglu_ref(a, b)
        assert rel(out, ref) < 1e-2
        g = torch.randn_like(ref)
        assert all(rel(p, q) < 1e-2 for p, q in zip(torch.autograd.grad(out, (a, b), g), torch.autograd.grad(ref, (a, b), g)))
    assert rel(rms_norm_triton(x, w, 1e-6), R.rms_norm_ref(x, w, 1e-6)) < 1e-2


@CUDA_ONLY
def test_liger_fused_linear_cross_entropy_cuda_bf16():
    gen = torch.Generator().manual_seed(5)
    h = _leaf(2048, 768, gen=gen, dtype=torch.bfloat16)
    W = _leaf(32000, 768, gen=gen, dtype=torch.bfloat16, scale=0.02)
    labels = torch.randint(0, 32000, (2048,), generator=gen).to(DEVICE)
    labels[::7] = -100
    loss = ops.fused_linear_cross_entropy(h, W, labels, backend="liger")
    ref = F.cross_entropy((h.float() @ W.float().T), labels, ignore_index=-100)
    assert rel(loss.float(), ref) < 1e-2
    for p, q in zip(torch.autograd.grad(loss, (h, W)), torch.autograd.grad(ref, (h, W))):
        assert rel(p, q) < 3e-2
