"""The embedded model's training script: the swapped-picture and swapped-value curricula, the attention target, and
a two-step run end to end."""

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


def _swap_reference(query, key, value, is_image, padding, scaling, mode, image_queries):
    """Plain-loop eager attention of the swap: query i of row b attends to keys j <= i that are not padding; it reads
    key j and value j of the previous row (roll(1): row b reads row b - 1) where j is an image position and i is a
    text position - or, with `image_queries`, any other image position -, and of its own row elsewhere; in the
    `values` mode the key always stays its own row's. Returns [B, S, H, D]."""
    batch, num_heads, length, _ = query.shape
    group = num_heads // key.shape[1]
    out = torch.zeros(batch, length, num_heads, query.shape[-1])
    for b in range(batch):
        other = (b - 1) % batch
        for h in range(num_heads):
            kv = h // group
            for i in range(length):
                allowed = [j for j in range(i + 1) if padding[b, j]]
                sources = [other if bool(is_image[b, j]) and (not bool(is_image[b, i]) or (image_queries and j != i))
                           else b for j in allowed]
                keys = [key[source if mode == "picture" else b, kv, j] for source, j in zip(sources, allowed)]
                weights = (torch.stack([query[b, h, i] @ k for k in keys]) * scaling).softmax(dim=0)
                for weight, source, j in zip(weights, sources, allowed):
                    out[b, i, h] += weight * value[source, kv, j]
    return out, None


@pytest.mark.parametrize("mode,image_queries", [("values", False), ("values", True), ("picture", True)])
def test_swapping_the_first_layer_equals_a_loop_reference(model_and_batch, mode, image_queries):
    """Layer 0 swapped (`values`: the text's attention weights come from its own picture, what it reads at the image
    positions from the next row's; `image_queries`: image tokens also read the next row's other image tokens)
    gives the same logits as layer 0 replaced by a plain-loop computation of that rule."""
    model, batch = model_and_batch
    is_image = batch["input_ids"] == model.config.image_token_id
    first = model.model.language_model.layers[0].self_attn
    plain = _last_logits(model, batch)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def reference(module, query, key, value, attention_mask, **kwargs):
        if module is not first:
            return sdpa(module, query, key, value, attention_mask, **kwargs)
        return _swap_reference(query, key, value, is_image, batch["attention_mask"].bool(), kwargs["scaling"], mode,
                               image_queries)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = reference
    try:
        expected = _last_logits(model, batch)
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
    swap = train_tiny_llava.ImageSwappedForText(model, model.config.image_token_id, 1, mode, image_queries)
    try:
        swap.set_batch(batch["input_ids"], batch["attention_mask"])
        swapped = _last_logits(model, batch)
    finally:
        swap.remove()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
    assert (swapped - plain).abs().max() > 1e-4  # the swap changes the answer of this random model
    torch.testing.assert_close(swapped, expected, rtol=1e-4, atol=1e-5)


def test_swapping_values_of_identical_pictures_changes_nothing(model_and_batch):
    model, batch = model_and_batch
    same = {**batch, "pixel_values": batch["pixel_values"][:1].expand_as(batch["pixel_values"]).clone()}
    plain = _last_logits(model, same)
    swap = train_tiny_llava.ImageSwappedForText(model, model.config.image_token_id, num_layers=3, mode="values",
                                                image_queries=True)
    try:
        swap.set_batch(same["input_ids"], same["attention_mask"])
        swapped = _last_logits(model, same)
    finally:
        swap.remove()
    torch.testing.assert_close(swapped, plain, rtol=1e-4, atol=1e-5)


def _object_patches(num_image: int, rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    patches = torch.rand(rows, num_image, generator=generator) < 0.2
    patches[:, 0] = True  # at least one object patch per row
    return patches


@pytest.mark.parametrize("layer,kind", [(0, "share"), (1, "share"), (1, "cover")])
def test_attention_target_equals_the_eager_attention_of_the_last_prompt_position(model_and_batch, layer, kind):
    """The share AttentionTarget computes in a right-padded batch with tokens after the prompt equals, for each row
    alone cut at its prompt end, the eager model's attention of the last position averaged over heads: the object
    patches' part of the image columns (what FastV's avg_all_heads scores at K = layer + 1); `cover`'s loss is the
    cross-entropy of those image columns, normalised, against a uniform distribution over the object patches."""
    model, batch = model_and_batch
    is_image = batch["input_ids"] == model.config.image_token_id
    num_image = int(is_image[0].sum())
    objects = _object_patches(num_image, len(PROMPTS))
    prompt_end = batch["attention_mask"].sum(dim=1) - 3  # two more real tokens follow, as the answer does
    target = train_tiny_llava.AttentionTarget(model, layer, kind)
    try:
        target.set_batch(prompt_end, is_image, objects)
        with torch.no_grad():
            model(**batch)
        share, loss = target.object_share, target.loss
    finally:
        target.remove()
    eager, _ = tiny.build_tiny_llava(num_layers=3, attn_implementation="eager")
    expected, cross_entropy = [], []
    for row in range(len(PROMPTS)):
        end = int(prompt_end[row]) + 1
        with torch.no_grad():
            attentions = eager(input_ids=batch["input_ids"][row : row + 1, :end],
                               pixel_values=batch["pixel_values"][row : row + 1], output_attentions=True).attentions
        probs = attentions[layer][0, :, -1].mean(dim=0)  # [S]
        image = probs[:end][is_image[row, :end]]
        expected.append(float(image[objects[row]].sum() / image.sum()))
        cross_entropy.append(float(-(image / image.sum())[objects[row]].log().mean()))
    expected = torch.tensor(expected)
    assert (expected - 0.2).abs().max() > 1e-3  # not uniform: the test would not see a wrong column order
    torch.testing.assert_close(share, expected, rtol=1e-4, atol=1e-6)
    expected_loss = -expected.log().mean() if kind == "share" else torch.tensor(cross_entropy).mean()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", train_tiny_llava.ImageSwappedForText.MODES)
@pytest.mark.parametrize("kind", train_tiny_llava.AttentionTarget.KINDS)
def test_attention_target_sees_the_rows_own_keys_under_the_swap(model_and_batch, mode, kind):
    """Installed after the swap, the target scores each row's own picture (layer 0's query and keys do not depend
    on what the swap changes), and its gradient reaches the scoring layer's query and key projections."""
    model, batch = model_and_batch
    is_image = batch["input_ids"] == model.config.image_token_id
    objects = _object_patches(int(is_image[0].sum()), len(PROMPTS))
    prompt_end = batch["attention_mask"].sum(dim=1) - 1
    shares = []
    for swapped in (False, True):
        swap = (train_tiny_llava.ImageSwappedForText(model, model.config.image_token_id, 1, mode, image_queries=True)
                if swapped else None)
        target = train_tiny_llava.AttentionTarget(model, 0, kind)
        try:
            if swap is not None:
                swap.set_batch(batch["input_ids"], batch["attention_mask"])
            target.set_batch(prompt_end, is_image, objects)
            model.zero_grad()
            model(**batch)
            target.loss.backward()
            shares.append(target.object_share)
        finally:
            target.remove()
            if swap is not None:
                swap.remove()
    torch.testing.assert_close(shares[0], shares[1])
    attention = model.model.language_model.layers[0].self_attn
    assert attention.q_proj.weight.grad.abs().max() > 0 and attention.k_proj.weight.grad.abs().max() > 0
    model.zero_grad()


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
    assert info["swap_mode"] == "picture" and info["attention_target"] == {"kind": "share", "weight": 1.0, "layer": 1,
                                                                   "read_layers": []}
    model = LlavaForConditionalGeneration.from_pretrained(output)
    assert model.config.text_config.num_hidden_layers == 3


@pytest.mark.usefixtures("one_torch_thread")
def test_two_training_steps_with_swapped_values_and_the_attention_target(tmp_path):
    output = tmp_path / "model"
    code = train_tiny_llava.main(["--output", str(output), "--steps", "2", "--warmup-steps", "1", "--num-train", "16",
                                  "--num-validation", "2", "--eval-every", "2", "--skip-measure",
                                  "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "3",
                                  "--vision-hidden-size", "16", "--vision-layers", "1", "--swap-mode", "values",
                                  "--swap-image-queries", "--attention-target", "cover",
                                  "--attention-target-weight", "0.5", "--read-target-layers", "2"])
    assert code == 0
    assert ALL_ATTENTION_FUNCTIONS["sdpa"].__name__ == "sdpa_attention_forward"
    info = json.loads((output / "training_info.json").read_text())
    assert info["swap_mode"] == "values" and info["swap_image_queries"]
    assert info["attention_target"] == {"kind": "cover", "weight": 0.5, "layer": 1, "read_layers": [2]}
    assert 0 < info["history"][-1]["train_object_attention_share"] < 1
    assert 0 < info["history"][-1]["train_read_layers_object_attention_share"] < 1
