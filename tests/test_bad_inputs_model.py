"""Bad model input, as a table: each gets one clear error naming the field and what is allowed, raised before
any computation (no index error inside the embedding, no reshape error inside attention)."""

import logging

import pytest
import torch

from hydra_hf import HydraCache

from conftest import tiny_model

VOCAB = 97  # tiny_model's vocab_size

BAD_INPUTS = [
    # (case, kwargs builder, error type, message pattern)
    ("id >= vocab_size", lambda: dict(input_ids=torch.tensor([[1, 2, VOCAB]])), ValueError, r"token id 97.*\[0, 96\]"),
    ("negative id", lambda: dict(input_ids=torch.tensor([[1, -3, 2]])), ValueError, r"token id -3.*\[0, 96\]"),
    ("float ids", lambda: dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError, r"input_ids must be an integer tensor"),
    ("bool ids", lambda: dict(input_ids=torch.tensor([[True, False]])), TypeError, r"input_ids must be an integer tensor"),
    ("1-D ids", lambda: dict(input_ids=torch.tensor([1, 2, 3])), ValueError, r"input_ids must be \(batch, seq_len\)"),
    ("empty sequence", lambda: dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, r"input is empty.*seq_len 0"),
    ("empty batch", lambda: dict(input_ids=torch.zeros(0, 8, dtype=torch.long)), ValueError, r"input is empty.*batch 0"),
    (
        "mask batch differs",
        lambda: dict(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(3, 5, dtype=torch.long)),
        ValueError, r"attention_mask has batch size 3 but the input has 2",
    ),
    (
        "4D mask",
        lambda: dict(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 1, 4, 4)),
        ValueError, r"attention_mask must be a 2D",
    ),
    (
        "mask shorter than the input",
        lambda: dict(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long)),
        ValueError, r"attention_mask covers 2 positions but the input has 4",
    ),
    (
        "position_ids batch differs",
        lambda: dict(input_ids=torch.ones(2, 4, dtype=torch.long), position_ids=torch.arange(4).expand(3, 4)),
        ValueError, r"position_ids has batch size 3",
    ),
    (
        "ids and embeds",
        lambda: dict(input_ids=torch.ones(1, 4, dtype=torch.long), inputs_embeds=torch.zeros(1, 4, 64)),
        ValueError, r"exactly one of input_ids or inputs_embeds",
    ),
]


@pytest.mark.parametrize("case, make, error, pattern", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_model_input_is_one_clear_error(case, make, error, pattern):
    model = tiny_model().eval()
    with torch.no_grad(), pytest.raises(error, match=pattern) as caught:
        model(**make())
    assert "\n" not in str(caught.value)


def test_a_non_hydra_cache_with_content_names_the_limitation():
    from transformers import DynamicCache

    model = tiny_model().eval()
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(ValueError, match="must be a HydraCache"):
        model(torch.ones(1, 2, dtype=torch.long), cache=cache, use_cache=True)
    # PEFT's prefix tuning under transformers >= 5.24: its prefix comes as past_key_values while generate() passes
    # its own cache as `cache`; the reason (prefix tuning) is the error, not the name clash
    with pytest.raises(ValueError, match="prefix tuning is not supported"):
        model(torch.ones(1, 2, dtype=torch.long), cache=HydraCache(model.config), past_key_values=cache, use_cache=True)


def test_longer_than_max_position_embeddings_warns_naming_the_field(caplog):
    """Decision: like Llama, HYDRA still computes (RoPE extrapolates), but it warns once, naming the field and the
    fix (RoPE scaling), because positions past max_position_embeddings were never trained."""
    model = tiny_model(max_position_embeddings=16).eval()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(torch.ones(1, 16, dtype=torch.long))  # at the limit: quiet
        assert not [r for r in caplog.records if "max_position_embeddings" in r.getMessage()]
        out = model(torch.ones(1, 20, dtype=torch.long))
        cache = HydraCache(model.config)
        model(torch.ones(1, 15, dtype=torch.long), cache=cache, use_cache=True)
        model(torch.ones(1, 3, dtype=torch.long), cache=cache, use_cache=True)  # past + new > limit
    warned = [r.getMessage() for r in caplog.records if "max_position_embeddings=16" in r.getMessage()]
    assert len(warned) == 2 and "20 positions" in warned[0] and "rope_type" in warned[0], warned
    assert "18 positions" in warned[1]  # past + new tokens count
    assert torch.isfinite(out.logits).all()
