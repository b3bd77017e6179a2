"""Triton routing ops vs the references: ``gather_tokens``, ``scatter_gated_add``, ``moe_permute``,
``moe_unpermute`` - outputs and every gradient.

Without CUDA the kernels run on CPU in the Triton interpreter (``TRITON_INTERPRET=1`` while the kernel modules are imported and around each test: see
``conftest.py``).
With CUDA the fp32 cases run compiled on the GPU and the bf16 cases run too.
"""

import importlib

import pytest
import torch

from hydra_hf import ops
from hydra_hf.ops import reference as R
from hydra_hf.ops.moe_permute_triton import moe_permute_triton, moe_unpermute_triton
from hydra_hf.ops.routing_gather_triton import gather_tokens_triton, scatter_gated_add_triton
from conftest import CUDA_ONLY, DEVICE, INTERPRET, rel

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _select(B, T, K, gen, unique=True):
    if unique:
        return torch.stack([torch.randperm(T, generator=gen)[:K] for _ in range(B)]).to(DEVICE)  # (B, K)
    return torch.randint(0, T, (B, K), generator=gen).to(DEVICE)


def _leaf(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()


# (B, T, E, K): B = 1 and 3, T = 63, E not a power of two, K = T (everything selected) and K = 1.
GATHER_CASES = [(1, 63, 24, 7), (3, 17, 100, 17), (2, 9, 33, 1), (3, 63, 192, 20)]


@pytest.mark.parametrize("B,T,E,K", GATHER_CASES)
@pytest.mark.parametrize("unique", [True, False], ids=["unique", "repeated"])
def test_gather_tokens_matches_reference(B, T, E, K, unique):
    gen = torch.Generator().manual_seed(B * 1000 + T + E)
    x = _leaf(B, T, E, gen=gen)
    idx = _select(B, T, K, gen, unique)
    out = gather_tokens_triton(x, idx)
    ref = R.gather_tokens_ref(x, idx)
    assert out.shape == ref.shape and rel(out, ref) < 1e-6
    g = torch.randn_like(ref)
    assert rel(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0]) < 1e-6


@pytest.mark.parametrize("B,T,E,K", GATHER_CASES)
@pytest.mark.parametrize("gated", [True, False], ids=["gate", "no_gate"])
def test_scatter_gated_add_matches_reference(B, T, E, K, gated):
    gen = torch.Generator().manual_seed(B * 1000 + T + E + 1)
    res = _leaf(B, T, E, gen=gen)
    upd = _leaf(B, K, E, gen=gen)
    gate = torch.rand(B, K, generator=gen).to(DEVICE).requires_grad_() if gated else None
    idx = _select(B, T, K, gen)
    leaves = [t for t in (res, upd, gate) if t is not None]
    out = scatter_gated_add_triton(res, upd, idx, gate)
    ref = R.scatter_gated_add_ref(res, upd, idx, gate)
    assert out.shape == ref.shape and rel(out, ref) < 1e-6
    g = torch.randn_like(ref)
    for name, a, b in zip(("residual", "update", "gate"), torch.autograd.grad(out, leaves, g),
                          torch.autograd.grad(ref, leaves, g)):
        assert a.shape == b.shape, name
        assert rel(a, b) < 1e-5, f"grad {name}: rel {rel(a, b):.2e}"


# (N, E, X, k): top-1 / top-2 / top-3, N = 63, experts that get no token (X = 8 with N = 5).
MOE_CASES = [(63, 24, 4, 2), (5, 100, 8, 1), (17, 33, 3, 3), (64, 192, 6, 2)]


@pytest.mark.parametrize("N,E,X,k", MOE_CASES)
def test_moe_permute_matches_reference(N, E, X, k):
    gen = torch.Generator().manual_seed(N + E + X + k)
    x = _leaf(N, E, gen=gen)
    ei = torch.randint(0, X, (N, k), generator=gen).to(DEVICE)
    perm, counts, pairs = moe_permute_triton(x, ei, X)
    perm_r, counts_r, pairs_r = R.moe_permute_ref(x, ei, X)
    assert torch.equal(counts, counts_r) and torch.equal(pairs, pairs_r)
    assert rel(perm, perm_r) < 1e-6
    g = torch.randn_like(perm_r)
    assert rel(torch.autograd.grad(perm, x, g)[0], torch.autograd.grad(perm_r, x, g)[0]) < 1e-5


@pytest.mark.parametrize("N,E,X,k", MOE_CASES)
def test_moe_unpermute_matches_reference(N, E, X, k):
    gen = torch.Generator().manual_seed(N + E + X + k + 1)
    ei = torch.randint(0, X, (N, k), generator=gen).to(DEVICE)
    pairs = torch.argsort(ei.reshape(-1), stable=True)
    eo = _leaf(N * k, E, gen=gen)
    w = torch.softmax(torch.randn(N, k, generator=gen), -1).to(DEVICE).requires_grad_()
    out = moe_unpermute_triton(eo, pairs, w)
    ref = R.moe_unpermute_ref(eo, pairs, w)
    assert out.shape == ref.shape and rel(out, ref) < 1e-5
    g = torch.randn_like(ref)
    for name, a, b in zip(("expert_out", "weights"), torch.autograd.grad(out, (eo, w), g),
                          torch.autograd.grad(ref, (eo, w), g)):
        assert rel(a, b) < 1e-5, f"grad {name}: rel {rel(a, b):.2e}"


def test_moe_round_trip_through_dispatcher():
    """permute -> per-expert op -> unpermute, every step through ``ops`` with the Triton backend."""
    gen = torch.Generator().manual_seed(3)
    N, E, X, k = 11, 20, 3, 2
    x = _leaf(N, E, gen=gen)
    ei = torch.randint(0, X, (N, k), generator=gen).to(DEVICE)
    w = torch.rand(N, k, generator=gen).to(DEVICE).requires_grad_()

    def run(backend):
        perm, counts, pairs = ops.moe_permute(x, ei, X, backend=backend)
        return ops.moe_unpermute(torch.tanh(perm), pairs, w, backend=backend)

    out, ref = run("triton"), run("torch")
    assert rel(out, ref) < 1e-5
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        assert rel(a, b) < 1e-5


def test_routing_dispatcher_uses_kernels_and_falls_back(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    x = _leaf(2, 9, 16, gen=gen)
    idx = _select(2, 9, 4, gen)
    mod = importlib.import_module("hydra_hf.ops.routing_gather_triton")
    calls = []
    monkeypatch.setattr(mod, "gather_tokens_triton", lambda *a: calls.append(1) or R.gather_tokens_ref(*a))
    ops.gather_tokens(x, idx, backend="liger")
    assert calls == [1]
    ops.gather_tokens(x, idx, backend="torch")
    assert calls == [1]
    if INTERPRET:
        monkeypatch.delenv("TRITON_INTERPRET")
        assert torch.equal(ops.gather_tokens(x, idx, backend="triton"), R.gather_tokens_ref(x, idx))
        assert calls == [1]


def test_routing_bad_inputs_name_the_argument():
    gen = torch.Generator().manual_seed(5)
    x = _leaf(2, 9, 16, gen=gen)
    idx = _select(2, 9, 4, gen)
    with pytest.raises(ValueError, match="index"):
        gather_tokens_triton(x, idx[:1])
    with pytest.raises(ValueError, match="index"):
        gather_tokens_triton(x, idx.float())
    with pytest.raises(ValueError, match="update"):
        scatter_gated_add_triton(x, x[:, :3], idx)
    with pytest.raises(ValueError, match="gate"):
        scatter_gated_add_triton(x, x[:, :4], idx, torch.ones(2, 3, device=DEVICE))
    with pytest.raises(ValueError, match="expert_index"):
        moe_permute_triton(x[0], idx, 4)
    with pytest.raises(ValueError, match="expert_out"):
        moe_unpermute_triton(x[0], torch.arange(6, device=DEVICE), torch.ones(3, 2, device=DEVICE))


@CUDA_ONLY
def test_routing_cuda_bf16():
    gen = torch.Generator().manual_seed(6)
    B, T, E, K = 8, 1024, 768, 512
    x = _leaf(B, T, E, gen=gen, dtype=torch.bfloat16)
    upd = _leaf(B, K, E, gen=gen, dtype=torch.bfloat16)
    gate = torch.rand(B, K, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    idx = _select(B, T, K, gen)
    out = scatter_gated_add_triton(x, gather_tokens_triton(x, idx) * 0.5 + upd, idx, gate)
    ref = R.scatter_gated_add_ref(x, R.gather_tokens_ref(x, idx) * 0.5 + upd, idx, gate)
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (x, upd, gate), g), torch.autograd.grad(ref, (x, upd, gate), g)):
        assert rel(a, b) < 1e-2

    N, X, k = 4096, 8, 2
    xm = _leaf(N, E, gen=gen, dtype=torch.bfloat16)
    ei = torch.randint(0, X, (N, k), generator=gen).to(DEVICE)
    w = torch.rand(N, k, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    perm, _, pairs = moe_permute_triton(xm, ei, X)
    out = moe_unpermute_triton(perm * 2, pairs, w)
    perm_r, _, pairs_r = R.moe_permute_ref(xm, ei, X)
    ref = R.moe_unpermute_ref(perm_r * 2, pairs_r, w)
    assert rel(out, ref) < 1e-2
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (xm, w), g), torch.autograd.grad(ref, (xm, w), g)):
        assert rel(a, b) < 1e-2
