"""The embedded model's training script: the swapped-picture curriculum and a two-step run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fastv_advanced import prompting, tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_tiny_llava  # noqa: E402

PROMPTS = ["<image>\nWhat colour is the shape?\nA. red\nB. blue",
           "<image>\nContext: A drawing.\nWhich colour is the shape?\nA. green\nB. red\nC. blue",
           "<image>\nWhat colour?\nA. blue\nB. green"]


@pytest.fixture(scope="module")
def model_and_batch():
    model, processor = tiny.build_tiny_llava(num_layers=3)
    side = model.config.vision_config.image_size
    examples = []
    for index, prompt in enumerate(PROMPTS):
        pixels = (np.random.RandomState(index).rand(side, side, 3) * 255).astype("uint8")
        _, inputs = prompting.build_inputs(prompt, Image.fromarray(pixels), processor, model.config,
                                           single_pred_prompt=True)
        ids = inputs["input_ids"][0].tolist()
        examples.append((ids, ids, inputs["pixel_values"][0]))
    batch = train_tiny_llava.collate(examples, pad_id=0)  # right-padded: the rows have different lengths
    return model.eval(), batch


def _last_logits(model, batch) -> torch.Tensor:
    """[B, vocab] logits at each row's last real token."""
    with torch.no_grad():
        logits = model(**batch).logits
    last = batch["attention_mask"].sum(dim=1) - 1
    return logits[torch.arange(logits.shape[0]), last]


def test_swapping_every_layer_equals_reading_the_next_rows_picture(model_and_batch):
    """With all layers swapped, text sees only the next row's image tokens, which themselves attended to their own
    picture: the same as the plain model given the pictures rolled by one row."""
    model, batch = model_and_batch
    plain = _last_logits(model, batch)
    rolled = _last_logits(model, {**batch, "pixel_values": batch["pixel_values"].roll(1, dims=0)})
    swap = train_tiny_llava.ImageSwappedForText(model, model.config.image_token_id, num_layers=3)
    try:
        swap.set_batch(batch["input_ids"], batch["attention_mask"])
        swapped = _last_logits(model, batch)
    finally:
        swap.remove()
    assert (plain - rolled).abs().max() > 1e-3  # the pictures matter to this random model
    torch.testing.assert_close(swapped, rolled, rtol=1e-4, atol=1e-5)


def test_swapping_the_first_layer_only_changes_the_output_and_remove_restores_it(model_and_batch):
    model, batch = model_and_batch
    plain = _last_logits(model, batch)
    rolled = _last_logits(model, {**batch, "pixel_values": batch["pixel_values"].roll(1, dims=0)})
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    swap = train_tiny_llava.ImageSwappedForText(model, model.config.image_token_id, num_layers=1)
    swap.set_batch(batch["input_ids"], batch["attention_mask"])
    first_only = _last_logits(model, batch)
    swap.enabled = False
    disabled = _last_logits(model, batch)
    swap.remove()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
    torch.testing.assert_close(disabled, plain)
    torch.testing.assert_close(_last_logits(model, batch), plain)
    assert (first_only - plain).abs().max() > 1e-4 and (first_only - rolled).abs().max() > 1e-4


def test_swap_needs_the_image_at_the_same_positions(model_and_batch):
    model, batch = model_and_batch
    swap = train_tiny_llava.ImageSwappedForText(model, model.config.image_token_id, num_layers=1)
    try:
        shifted = batch["input_ids"].clone()
        shifted[0] = shifted[0].roll(1)
        with pytest.raises(ValueError, match="same positions"):
            swap.set_batch(shifted, batch["attention_mask"])
    finally:
        swap.remove()


@pytest.mark.usefixtures("one_torch_thread")  # restores the thread count the script sets
def test_two_training_steps_save_a_plain_llava_with_its_record(tmp_path):
    output = tmp_path / "model"
    code = train_tiny_llava.main(["--output", str(output), "--steps", "2", "--warmup-steps", "1", "--num-train", "16",
                                  "--num-validation", "2", "--eval-every", "2", "--skip-measure",
                                  "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "3",
                                  "--vision-hidden-size", "16", "--vision-layers", "2"])
    assert code == 0
    assert ALL_ATTENTION_FUNCTIONS["sdpa"].__name__ == "sdpa_attention_forward"
    info = json.loads((output / "training_info.json").read_text())
    assert info["swap_image_layers"] == 2 and info["steps"] == 2 and info["shapes"]["image_tokens"] == 576
    assert {"validation_first_token_accuracy", "validation_rank0_first_token_accuracy"} <= set(info["history"][-1])
    model = LlavaForConditionalGeneration.from_pretrained(output)
    assert model.config.text_config.num_hidden_layers == 3
