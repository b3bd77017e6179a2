"""Triton q/k mean add-back + L2 norm + partial RoPE vs ``qk_norm_rope_ref``: outputs and every gradient.

Without CUDA the kernels run on CPU in the Triton interpreter (``TRITON_INTERPRET=1`` while the kernel modules are imported and around each test: see
``conftest.py``).
With CUDA the fp32 cases run compiled on the GPU and the bf16 cases run too.
"""

import importlib

import pytest
import torch

from hydra_hf import ops
from hydra_hf.ops.qk_norm_rope_triton import qk_norm_rope_triton
from hydra_hf.ops.reference import qk_mean_ref, qk_norm_rope_ref
from conftest import CUDA_ONLY, DEVICE, INTERPRET, rel

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _rope(cos_batch, T, r, gen):
    ang = torch.randn(cos_batch, T, r // 2, generator=gen) * 3  # (B, T, r/2)
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1)  # (B, T, r) HF layout
    sin = torch.cat([ang.sin(), ang.sin()], dim=-1)
    return cos.to(DEVICE), sin.to(DEVICE)


def _inputs(B, T, Hq, Hk, h, r, with_mean, cos_batch=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, h, generator=gen)  # (B, T, Hq, h)
    k = torch.randn(B, T, Hk, h, generator=gen)  # (B, T, Hk, h)
    qm = torch.randn(B, T, Hq, h, generator=gen) if with_mean else None
    km = torch.randn(B, T, Hk, h, generator=gen) if with_mean else None
    temp = torch.rand(Hk, generator=gen) + 0.5  # (Hk,)
    q, k, qm, km, temp = (t.to(DEVICE, dtype).requires_grad_() if t is not None else None for t in (q, k, qm, km, temp))
    cos, sin = _rope(B if cos_batch is None else cos_batch, T, r, gen)
    return q, k, qm, km, temp, cos, sin


# (B, T, Hq, Hk, h, r, with_mean, cos batch): the 100M / 1B head layouts (6/2 x 32, 8/2 x 56),
# odd head counts and dims, r = h (full RoPE), r = 0 (none), a broadcast cos/sin batch of 1.
CASES = [
    (1, 63, 6, 2, 32, 16, True, None),
    (3, 5, 8, 2, 56, 28, False, None),
    (2, 7, 3, 3, 24, 24, True, 1),
    (1, 4, 5, 1, 40, 0, True, None),
    (3, 3, 2, 1, 8, 4, False, 1),
]


@pytest.mark.parametrize("B,T,Hq,Hk,h,r,with_mean,cos_batch", CASES)
def test_qk_norm_rope_matches_reference(B, T, Hq, Hk, h, r, with_mean, cos_batch):
    q, k, qm, km, temp, cos, sin = _inputs(B, T, Hq, Hk, h, r, with_mean, cos_batch)
    leaves = [t for t in (q, k, temp, qm, km) if t is not None]
    names = ["q", "k", "temperature", "q_mean", "k_mean"]
    out = qk_norm_rope_triton(q, k, qm, km, temp, cos, sin)
    ref = qk_norm_rope_ref(q, k, qm, km, temp, cos, sin)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel(a, b) < 1e-5
    grads = [torch.randn_like(ref[0]), torch.randn_like(ref[1])]
    g_tri = torch.autograd.grad(out, leaves, grads)
    g_ref = torch.autograd.grad(ref, leaves, grads)
    for name, a, b in zip(names, g_tri, g_ref):
        assert a.shape == b.shape, name
        assert rel(a, b) < 1e-5, f"grad {name}: rel {rel(a, b):.2e}"


def test_qk_norm_rope_single_output_grad_and_mean_pipeline():
    """Gradient through q only, with means produced by ``qk_mean`` (the model's pipeline)."""
    q, k, _, _, temp, cos, sin = _inputs(2, 5, 4, 2, 16, 8, False)
    m_q, m_k = qk_mean_ref(q, k)
    q_out, _ = qk_norm_rope_triton(q * 2, k * 2, m_q, m_k, temp, cos, sin)
    q_ref, _ = qk_norm_rope_ref(q * 2, k * 2, m_q, m_k, temp, cos, sin)
    assert rel(q_out, q_ref) < 1e-5
    g = torch.randn_like(q_ref)
    for a, b in zip(torch.autograd.grad(q_out, (q, k, temp), g, allow_unused=True, retain_graph=True),
                    torch.autograd.grad(q_ref, (q, k, temp), g, allow_unused=True)):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            assert rel(a, b) < 1e-5


def test_dispatcher_qk_ops(monkeypatch):
    q, k, qm, km, temp, cos, sin = _inputs(1, 3, 4, 2, 16, 8, True)
    ref = qk_norm_rope_ref(q, k, qm, km, temp, cos, sin)
    for backend in ("triton", "liger"):
        out = ops.qk_norm_rope(q, k, qm, km, temp, cos, sin, backend=backend)
        assert all(rel(a, b) < 1e-5 for a, b in zip(out, ref))
    assert all(torch.equal(a, b) for a, b in zip(ops.qk_mean(q, k, backend="triton"), qk_mean_ref(q, k)))
    mod = importlib.import_module("hydra_hf.ops.qk_norm_rope_triton")
    calls = []
    monkeypatch.setattr(mod, "qk_norm_rope_triton", lambda *a: calls.append(1) or qk_norm_rope_ref(*a))
    ops.qk_norm_rope(q, k, qm, km, temp, cos, sin, backend="triton")
    assert calls == [1]
    ops.qk_norm_rope(q, k, qm, km, temp, cos, sin, backend="torch")
    assert calls == [1]
    if INTERPRET:
        monkeypatch.delenv("TRITON_INTERPRET")
        ops.qk_norm_rope(q, k, qm, km, temp, cos, sin, backend="triton")
        assert calls == [1]


def test_qk_norm_rope_bad_inputs_name_the_argument():
    q, k, qm, km, temp, cos, sin = _inputs(1, 3, 4, 2, 16, 8, True)
    with pytest.raises(ValueError, match="k_mean"):
        qk_norm_rope_triton(q, k, qm, None, temp, cos, sin)
    with pytest.raises(ValueError, match="temperature"):
        qk_norm_rope_triton(q, k, qm, km, temp[:1], cos, sin)
    with pytest.raises(ValueError, match="cos"):
        qk_norm_rope_triton(q, k, qm, km, temp, cos[..., :3], sin[..., :3])
    with pytest.raises(ValueError, match="k must be"):
        qk_norm_rope_triton(q, k[..., :8], qm, km, temp, cos, sin)


@CUDA_ONLY
@pytest.mark.parametrize("B,T,Hq,Hk,h,r", [(8, 1024, 6, 2, 32, 16), (4, 333, 8, 2, 56, 28)])
def test_qk_norm_rope_cuda_bf16(B, T, Hq, Hk, h, r):
    q, k, qm, km, temp, cos, sin = _inputs(B, T, Hq, Hk, h, r, True, dtype=torch.bfloat16)
    leaves = [q, k, temp, qm, km]
    out = qk_norm_rope_triton(q, k, qm, km, temp, cos, sin)
    # the reference computes in fp32 internally; compare on the same bf16 inputs
    ref = qk_norm_rope_ref(q, k, qm, km, temp, cos, sin)
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        assert rel(a, b) < 1e-2
    grads = [torch.randn_like(ref[0]), torch.randn_like(ref[1])]
    for a, b in zip(torch.autograd.grad(out, leaves, grads), torch.autograd.grad(ref, leaves, grads)):
        assert rel(a, b) < 2e-2
