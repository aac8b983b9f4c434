"""Functional checks of the guide's three strategies.

Run as `python test_fastv_advanced.py` (as the user's guide does) or through pytest; each test's name says the
model it ran on: `random-tiny-llava` (a tiny LLaVA with random weights, built in memory) or, with FASTV_EMBEDDED=1,
`embedded-model` (the embedded trained toy model, models/tiny-llava-scienceqa, on the first embedded question). The
full suite is in tests/.
"""

if __name__ == "__main__":
    # Before the imports below: pytest imports this file itself, and its plugins must load before torch and
    # transformers import them, or pytest cannot rewrite their asserts and warns.
    import sys

    import pytest

    sys.exit(pytest.main([__file__, "-v"]))

import numpy as np
import pytest
import torch
from PIL import Image

from fastv_advanced import FastVConfig, apply_fastv, embedded
from fastv_advanced.model_loading import load_model
from fastv_advanced.prompting import build_inputs
from fastv_advanced.scienceqa import load_image, load_questions
from fastv_advanced.tiny import build_tiny_llava

MODEL = "embedded-model" if embedded.embedded_enabled() else "random-tiny-llava"


def embedded_inputs():
    """The embedded model and its first question's inputs (input_ids [1, S], pixel_values [1, 3, 336, 336])."""
    loaded = load_model(str(embedded.MODEL_PATH), device="cpu", dtype="float32")
    question = load_questions(embedded.QUESTION_FILE).questions[0]
    image = load_image(embedded.IMAGE_FOLDER, question)
    _, inputs = build_inputs(question.text, image, loaded.processor, loaded.model.config)
    return loaded.model, inputs


def random_inputs():
    """A random-weight tiny LLaVA (64 image tokens) and a noise image's inputs."""
    model, processor = build_tiny_llava(seed=1, qk_scale=8.0)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(40, 32, 3), dtype=np.uint8))
    _, inputs = build_inputs("Which shape is red?\nA. circle\nB. square", image, processor, model.config)
    return model, inputs


@pytest.fixture(scope="module", params=[MODEL])
def setup(request):
    return embedded_inputs() if request.param == "embedded-model" else random_inputs()


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
