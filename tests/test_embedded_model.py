"""The shipped tiny LLaVA (models/tiny-llava-scienceqa): it loads like any llava-hf checkpoint, has LLaVA-1.5's
image geometry, reproduces its recorded accuracy on a slice of the shipped test split, and needs the image."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from fastv_advanced import FastVConfig, prompting
from fastv_advanced.embedded import IMAGE_FOLDER, MODEL_PATH, QUESTION_FILE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import measure_embedded_model  # noqa: E402


@pytest.fixture(scope="module")
def info() -> dict:
    return json.loads((MODEL_PATH / "training_info.json").read_text())


@pytest.fixture(scope="module")
def loaded():
    return measure_embedded_model.load_model(MODEL_PATH)


def _rows(info: dict) -> dict[str, dict]:
    return {row["configuration"]: row for row in info["accuracy"]["rows"]}


def _slice_correct(model, processor, size: int, fastv: FastVConfig | None = None) -> int:
    """Correct answers on the first `size` questions of the shipped test split, measured as the recorded table was
    (`scripts/measure_embedded_model.py`: greedy decoding, LLaVA's answer parser, `random` reseeded per question)."""
    questions, _ = measure_embedded_model.load_questions(QUESTION_FILE, IMAGE_FOLDER, size)
    correct, _ = measure_embedded_model.evaluate(model, processor, questions, fastv)
    return sum(correct)


def test_checkpoint_is_small_and_has_llava_15_image_geometry(loaded):
    model, processor = loaded
    assert (MODEL_PATH / "model.safetensors").stat().st_size < 8 * 1024 * 1024
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (336, 14)
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert prompting.num_image_tokens(model.config) == 576
    _, inputs = prompting.build_inputs("<image>\nWhat colour is the shape in the centre?\nA. red\nB. green",
                                       Image.new("RGB", (336, 336), "white"), processor, model.config)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)


def test_recorded_quality_meets_the_requirements(info):
    rows = _rows(info)
    assert rows["baseline"]["total"] == info["accuracy"]["num_questions"] >= 200
    assert rows["baseline"]["accuracy"] >= 0.9


def test_baseline_reproduces_its_recorded_count_on_a_slice(loaded, info):
    model, processor = loaded
    size = info["accuracy"]["slice_size"]
    recorded = _rows(info)["baseline"][f"correct_first_{size}"]
    assert _slice_correct(model, processor, size) == recorded


def test_dropping_every_image_token_loses_most_of_the_accuracy(loaded, info):
    """Rank 0 at K=2 must reproduce its record and lose at least half of the baseline's gain over chance."""
    model, processor = loaded
    size = info["accuracy"]["slice_size"]
    rows = _rows(info)
    blind_row = rows["rank 0 (all image tokens dropped)"]
    blind = _slice_correct(model, processor, size, FastVConfig(agg_layer=2, attention_rank=0))
    assert blind == blind_row[f"correct_first_{size}"]
    baseline, chance = rows["baseline"]["accuracy"], info["accuracy"]["chance_accuracy"]
    assert blind_row["accuracy"] <= (baseline + chance) / 2
    assert blind <= (rows["baseline"][f"correct_first_{size}"] + chance * size) / 2
