"""The training loss through the fused linear cross-entropy path (no full logits).

On CPU the fused-op entry point runs the reference, so these tests check the model-side wiring:
the same loss and gradients as transformers' `ForCausalLMLoss` path, `num_items_in_batch`
(gradient accumulation) handled the same way, logits left out only where promised.
"""

import pytest
import torch
from conftest import ROUTING_MODES, tiny_model

from hydra_hf import HydraConfig, modeling_hydra, ops
from hydra_hf.ops.reference import linear_cross_entropy_ref


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _batch(seed=0, B=3, T=11, V=97):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[2, -3:] = -100
    return ids, labels


def _loss_and_grads(fused, mode="all", **forward_kwargs):
    model = tiny_model(seed=3, fused_linear_cross_entropy=fused, **ROUTING_MODES[mode])
    model.train()
    ids, labels = _batch()
    out = model(ids, labels=labels, **forward_kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("mode", ["dense", "all"])
def test_fused_training_loss_matches_logits_path(mode):
    fused_out, fused_grads = _loss_and_grads(True, mode)
    plain_out, plain_grads = _loss_and_grads(False, mode)
    assert fused_out.logits is None and plain_out.logits is not None
    assert rel(fused_out.loss, plain_out.loss) < 1e-6
    assert rel(fused_out.aux_loss, plain_out.aux_loss) < 1e-6 if plain_out.aux_loss is not None else True
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        assert rel(fused_grads[name], plain_grads[name]) < 1e-4, name


def test_fused_loss_with_num_items_in_batch_matches_hf_loss():
    # the Trainer passes num_items_in_batch under gradient accumulation: loss = sum / items
    items = torch.tensor(41)
    fused_out, fused_grads = _loss_and_grads(True, "dense", num_items_in_batch=items)
    plain_out, plain_grads = _loss_and_grads(False, "dense", num_items_in_batch=items)
    mean_out, _ = _loss_and_grads(False, "dense")
    assert rel(fused_out.loss, plain_out.loss) < 1e-6
    assert rel(fused_out.loss, mean_out.loss) > 1e-3  # really a different normalisation
    for name in plain_grads:
        assert rel(fused_grads[name], plain_grads[name]) < 1e-4, name


def test_eval_and_no_labels_keep_logits():
    model = tiny_model(fused_linear_cross_entropy=True)
    ids, labels = _batch()
    model.eval()
    with torch.no_grad():
        out = model(ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (3, 11, 97)
    model.train()
    assert model(ids).logits is not None  # no labels: logits are what the caller wants


def test_auto_setting_follows_whether_the_op_is_really_fused(monkeypatch):
    model = tiny_model()
    assert model.config.fused_linear_cross_entropy is None
    ids, labels = _batch()
    model.train()
    # on CPU the op is not fused, so the default keeps the ordinary logits path
    assert not ops.linear_cross_entropy_is_fused(model.config.kernel_backend, model.lm_head.weight)
    assert model(ids, labels=labels).logits is not None
    # where the op is fused (CUDA + Liger), the default takes it
    asked = []

    def fused_here(backend, *tensors):
        asked.append(backend)
        return True

    monkeypatch.setattr(modeling_hydra, "linear_cross_entropy_is_fused", fused_here)
    assert model(ids, labels=labels).logits is None
    assert asked == [model.config.kernel_backend]
    model.config.fused_linear_cross_entropy = False
    assert model(ids, labels=labels).logits is not None


def test_ops_sum_reduction_and_bad_reduction():
    gen = torch.Generator().manual_seed(0)
    h, W = torch.randn(7, 16, generator=gen), torch.randn(11, 16, generator=gen)
    labels = torch.randint(0, 11, (7,), generator=gen)
    labels[3] = -100
    total = ops.fused_linear_cross_entropy(h, W, labels, reduction="sum")
    mean = ops.fused_linear_cross_entropy(h, W, labels)
    assert rel(total / 6, mean) < 1e-6
    assert rel(total, linear_cross_entropy_ref(h, W, labels, reduction="sum")) < 1e-7
    with pytest.raises(ValueError, match="reduction"):
        ops.fused_linear_cross_entropy(h, W, labels, reduction="none")


@pytest.mark.parametrize("bad", [1, "yes", 0.5])
def test_config_rejects_non_bool_fused_setting(bad):
    with pytest.raises(ValueError, match="fused_linear_cross_entropy"):
        HydraConfig(fused_linear_cross_entropy=bad)
