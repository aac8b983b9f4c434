"""Functional checks of the guide's three strategies on a tiny offline LLaVA.

Run as `python test_fastv_advanced.py` (as the user's guide does) or through pytest. The full suite is in tests/.
"""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastv_advanced import FastVConfig, apply_fastv
from fastv_advanced.prompting import build_inputs
from fastv_advanced.tiny import build_tiny_llava


@pytest.fixture(scope="module")
def setup():
    model, processor = build_tiny_llava(seed=1, qk_scale=8.0)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(40, 32, 3), dtype=np.uint8))
    _, inputs = build_inputs("Which shape is red?\nA. circle\nB. square", image, processor, model.config)
    return model, inputs


def select(model, inputs, **config):
    with apply_fastv(model, FastVConfig(agg_layer=2, attention_rank=16, **config)) as fastv, torch.no_grad():
        logits = model(**inputs).logits
    return fastv.last_selection, logits


@pytest.mark.parametrize("method", ["max_head", "avg_all_heads", "weighted_combination"])
def test_each_strategy_keeps_rank_tokens_and_shortens_the_sequence(setup, method):
    model, inputs = setup
    selection, logits = select(model, inputs, token_selection_method=method)
    kept = selection.kept_image_indices[0].tolist()
    assert len(kept) == 16 and kept == sorted(set(kept))
    assert logits.shape[1] == inputs["input_ids"].shape[1] - (selection.num_image_tokens - 16)


def test_weighted_alpha_one_is_max_head(setup):
    model, inputs = setup
    max_head, _ = select(model, inputs, token_selection_method="max_head")
    weighted, _ = select(model, inputs, token_selection_method="weighted_combination", weighted_alpha=1.0)
    assert weighted.kept_image_indices.tolist() == max_head.kept_image_indices.tolist()


def test_weighted_alpha_one_over_heads_is_avg_all_heads(setup):
    model, inputs = setup
    heads = model.config.text_config.num_attention_heads
    average, _ = select(model, inputs, token_selection_method="avg_all_heads")
    weighted, _ = select(model, inputs, token_selection_method="weighted_combination", weighted_alpha=1.0 / heads)
    torch.testing.assert_close(weighted.scores, average.scores)


def test_generation_continues_on_the_pruned_cache(setup):
    model, inputs = setup
    with apply_fastv(model, FastVConfig(agg_layer=2, attention_rank=8)) as fastv, torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 5
    assert fastv.last_selection.num_kept == 8


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
