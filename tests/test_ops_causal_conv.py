"""Triton causal conv vs ``causal_conv_ref``: output and every gradient.

Without CUDA the kernels run on CPU in the Triton interpreter: ``TRITON_INTERPRET=1`` is set while
the kernel modules are imported and around each test (see ``conftest.py``), so other test
modules are not affected. With CUDA the fp32 cases run compiled on the GPU and the bf16 cases
run too.
"""

import importlib

import pytest
import torch

from hydra_hf import ops
from hydra_hf.ops.causal_conv_triton import causal_conv_next_state, causal_conv_triton
from hydra_hf.ops.reference import causal_conv_ref
from conftest import CUDA_ONLY, DEVICE, INTERPRET, rel

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _inputs(B, T, H, h, Ks, Kc, with_state, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = H * h
    P = ops.causal_conv_state_len(Ks, Kc)
    x = torch.randn(B, T, C, generator=g)  # (B, T, C)
    ws = torch.randn(C, Ks, generator=g) / Ks**0.5  # (C, Ks)
    wc = torch.randn(C, h, Kc, generator=g) / (h * Kc) ** 0.5  # (C, h, Kc)
    st = torch.randn(B, P, C, generator=g) if with_state else None  # (B, P, C)
    out = [t.to(DEVICE, dtype).requires_grad_() if t is not None else None for t in (x, ws, wc, st)]
    return out


# (B, T, H, h, Ks, Kc, state): every Ks in 1..4, Kc in 1..2 and h in {8, 16, 24, 32, 40, 56, 64};
# C = H * h is mostly not a power of two; T = 63 / 17 / 5 / 1 cover partial and single tiles.
CASES = [
    (1, 63, 3, 8, 4, 2, True),
    (3, 17, 2, 24, 3, 1, False),
    (3, 5, 1, 40, 2, 2, True),
    (1, 1, 2, 56, 4, 2, True),
    (2, 33, 1, 16, 1, 1, False),
    (1, 20, 1, 64, 1, 2, True),
    (1, 9, 3, 32, 4, 1, False),
    (1, 70, 1, 24, 2, 2, False),
]


@pytest.mark.parametrize("B,T,H,h,Ks,Kc,with_state", CASES)
def test_causal_conv_matches_reference(B, T, H, h, Ks, Kc, with_state):
    x, ws, wc, st = _inputs(B, T, H, h, Ks, Kc, with_state)
    leaves = [t for t in (x, ws, wc, st) if t is not None]
    out = causal_conv_triton(x, ws, wc, H, st)
    ref = causal_conv_ref(x, ws, wc, H, st)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel(out, ref) < 1e-5
    grad = torch.randn_like(ref)
    g_tri = torch.autograd.grad(out, leaves, grad)
    g_ref = torch.autograd.grad(ref, leaves, grad)
    for name, a, b in zip(("x", "seq_weight", "chan_weight", "state"), g_tri, g_ref):
        assert a.shape == b.shape, name
        assert rel(a, b) < 1e-5, f"grad {name}: rel {rel(a, b):.2e}"


def test_causal_conv_state_without_grad():
    x, ws, wc, st = _inputs(2, 12, 2, 16, 3, 2, True)
    st = st.detach()
    out = causal_conv_triton(x, ws, wc, 2, st)
    ref = causal_conv_ref(x, ws, wc, 2, st)
    assert rel(out, ref) < 1e-5
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (x, ws, wc), grad), torch.autograd.grad(ref, (x, ws, wc), grad)):
        assert rel(a, b) < 1e-5


def test_causal_conv_decode_steps_match_full_sequence():
    B, T, H, h, Ks, Kc = 2, 6, 2, 8, 4, 2
    x, ws, wc, _ = _inputs(B, T, H, h, Ks, Kc, False)
    with torch.no_grad():
        full = causal_conv_triton(x, ws, wc, H)
        state = None
        steps = []
        for t in range(T):
            x_t = x[:, t : t + 1]  # (B, 1, C)
            steps.append(causal_conv_triton(x_t, ws, wc, H, state))
            state = causal_conv_next_state(x_t, state, Ks, Kc)
    assert rel(torch.cat(steps, dim=1), full) < 1e-5


def test_dispatcher_runs_triton_and_falls_back(monkeypatch):
    x, ws, wc, st = _inputs(1, 7, 2, 8, 2, 2, True)
    ref = causal_conv_ref(x, ws, wc, 2, st)
    assert rel(ops.causal_conv(x, ws, wc, 2, st, backend="triton"), ref) < 1e-5
    assert rel(ops.causal_conv(x, ws, wc, 2, st, backend="liger"), ref) < 1e-5
    assert callable(ops.causal_conv) and ops.causal_conv.__module__ == "hydra_hf.ops_hydra"  # not shadowed
    cc = importlib.import_module("hydra_hf.ops.causal_conv_triton")
    calls = []
    monkeypatch.setattr(cc, "causal_conv_triton", lambda *a: calls.append(1) or causal_conv_ref(*a))
    ops.causal_conv(x, ws, wc, 2, st, backend="triton")
    assert calls == [1]
    ops.causal_conv(x, ws, wc, 2, st, backend="torch")
    assert calls == [1]
    if INTERPRET:
        ops.causal_conv(x, ws, wc, 2, st, backend="auto")  # CPU tensors: auto means the reference
        assert calls == [1]
        monkeypatch.delenv("TRITON_INTERPRET")  # CPU without the interpreter: reference, whatever the backend
        assert rel(ops.causal_conv(x, ws, wc, 2, st, backend="triton"), ref) == 0.0
        assert calls == [1]
    with pytest.raises(ValueError, match="backend"):
        ops.causal_conv(x, ws, wc, 2, st, backend="cuda")


def test_causal_conv_bad_inputs_name_the_argument():
    x, ws, wc, st = _inputs(1, 4, 2, 8, 2, 2, True)
    with pytest.raises(ValueError, match="num_heads"):
        causal_conv_triton(x, ws, wc, 3, st)
    with pytest.raises(ValueError, match="seq_weight"):
        causal_conv_triton(x, ws[:, :1].expand(-1, 5), wc, 2, st)
    with pytest.raises(ValueError, match="chan_weight"):
        causal_conv_triton(x, ws, wc[:, :4], 2, st)
    with pytest.raises(ValueError, match="state"):
        causal_conv_triton(x, ws, wc, 2, st[:, :1])


@CUDA_ONLY
@pytest.mark.parametrize("B,T,H,h,Ks,Kc,with_state", [(8, 1024, 6, 32, 4, 2, False), (2, 257, 8, 56, 3, 1, True)])
def test_causal_conv_cuda_bf16(B, T, H, h, Ks, Kc, with_state):
    x, ws, wc, st = _inputs(B, T, H, h, Ks, Kc, with_state, dtype=torch.bfloat16)
    leaves = [t for t in (x, ws, wc, st) if t is not None]
    out = causal_conv_triton(x, ws, wc, H, st)
    # reference in fp32 on the same bf16 values: the kernel accumulates in fp32 and rounds once
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    x32, ws32, wc32 = leaves32[:3]
    st32 = leaves32[3] if with_state else None
    ref = causal_conv_ref(x32, ws32, wc32, H, st32)
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < 1e-2
    grad = torch.randn_like(ref)
    g_tri = torch.autograd.grad(out, leaves, grad.bfloat16())
    g_ref = torch.autograd.grad(ref, leaves32, grad.bfloat16().float())
    for a, b in zip(g_tri, g_ref):
        assert a.dtype == torch.bfloat16
        assert rel(a, b) < 1e-2
