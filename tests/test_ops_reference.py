"""The op references themselves: the fast causal-conv reference equals two stacked conv1d."""

import pytest
import torch
import torch.nn.functional as F

from hydra_hf.ops.reference import causal_conv_ref


@pytest.mark.parametrize("Ks, Kc", [(3, 1), (2, 2), (1, 1), (4, 2)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [13, 1])  # 1: the single-token (decoding) path
def test_causal_conv_ref_equals_conv1d(Ks, Kc, with_state, T):
    torch.manual_seed(0)
    B, H, h = 2, 3, 8
    C = H * h
    x, w, w2 = torch.randn(B, T, C), torch.randn(C, Ks), torch.randn(C, h, Kc)
    state = torch.randn(B, Ks + Kc - 2, C) if with_state else None
    padded = torch.cat([state if with_state else torch.zeros(B, Ks + Kc - 2, C), x], 1).transpose(1, 2)
    expected = F.conv1d(F.conv1d(padded, w.unsqueeze(1), groups=C), w2, groups=H).transpose(1, 2)
    torch.testing.assert_close(causal_conv_ref(x, w, w2, H, state), expected, atol=1e-5, rtol=1e-5)


def test_causal_conv_ref_restarts_at_each_packed_sequence():
    """With sequence ids, each sequence is convolved as if it started from a zero history."""
    torch.manual_seed(1)
    B, H, h, Ks, Kc = 1, 2, 4, 3, 2
    C = H * h
    lengths = [4, 1, 6]
    x, w, w2 = torch.randn(B, sum(lengths), C), torch.randn(C, Ks), torch.randn(C, h, Kc)
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    packed = causal_conv_ref(x, w, w2, H, sequence_ids=ids)
    alone = torch.cat([causal_conv_ref(part, w, w2, H) for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-6, rtol=1e-6)
