"""Rows with different numbers of image tokens in one batch (images of different sizes on anyres and
dynamic-resolution models, different numbers of images per prompt): a budget given as a ratio keeps each row its
own share, a fixed count is checked against every row, and each row is pruned as if it were alone.

FastV is checked against the independent masked eager computation of `test_families` (the unmodified model's
eager attention picks each row's tokens; the dropped ones are blocked as keys from layer K on): kept tokens, logits
and cached greedy generation, under SDPA and eager attention, on Qwen2-VL (16 and 8 image tokens), Gemma 3 (two
images and one) and LLaVA-NeXT with its Llama and Mistral decoders (a square and a wide picture: 1,176 and 926
tokens). A multi-stage method that renumbers positions (PyramidDrop) is checked against each row run alone.
"""

from __future__ import annotations

import pytest
import torch
from test_families import END, GRID, IMAGE, PAD, START, build, eager_copy, masked_run

from fastv_advanced.methods import get_method_class
from fastv_advanced.methods.fastv import FastVConfig
from fastv_advanced.pruning import apply_pruning
from fastv_advanced.tiny_families import build_tiny_family


def left_padded(rows: list[list[int]]) -> dict:
    length = max(map(len, rows))
    return {"input_ids": torch.tensor([[PAD] * (length - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])}


def qwen_inputs() -> dict:
    """Row 0: an 8 x 8 patch image (16 tokens); row 1: an 8 x 4 one (8 tokens), so row 1 is left-padded."""
    grids = [(GRID, GRID), (GRID, GRID // 2)]
    rows = [[5, 6, 7, START] + [IMAGE] * (h * w // 4) + [END, 9, 10, 11, 12] for h, w in grids]
    inputs = left_padded(rows)
    generator = torch.Generator().manual_seed(1)
    inputs["pixel_values"] = torch.randn(sum(h * w for h, w in grids), 3 * 2 * 4 * 4, generator=generator)
    inputs["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in grids])
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE).long()
    return inputs


def gemma_inputs() -> dict:
    """Row 0: two images (32 image tokens); row 1: one (16)."""
    image = [START] + [IMAGE] * 16 + [END]
    rows = [[5, 6] + image + [7] + image + [9, 10, 11], [5, 6] + image + [9, 10, 11, 12]]
    inputs = left_padded(rows)
    inputs["pixel_values"] = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    inputs["token_type_ids"] = (inputs["input_ids"] == IMAGE).long()
    return inputs


def anyres_inputs(processor, sizes=((336, 336), (336, 200))) -> dict:
    """One chat prompt per picture size, left-padded: the anyres layout gives each its own image token count."""
    from PIL import Image, ImageDraw

    pictures, prompts = [], []
    for size, colour in zip(sizes, ("red", "blue")):
        picture = Image.new("RGB", size, "white")
        ImageDraw.Draw(picture).ellipse((30, 40, 160, 150), fill=colour)
        pictures.append([picture])
        prompts.append(processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour is it?"}]}],
            add_generation_prompt=True, tokenize=False))
    return dict(processor(text=prompts, images=pictures, padding=True, padding_side="left", return_tensors="pt"))


def image_positions(inputs: dict, image: int) -> list[list[int]]:
    return [[j for j, token in enumerate(ids) if token == image] for ids in inputs["input_ids"].tolist()]


def reference_kept(reference, inputs: dict, layer: int, ranks: list[int], image: int) -> list[list[int]]:
    """Per row, the positions of its `ranks[row]` image tokens with the highest head-mean attention of the last
    position in layer `layer` (eager weights of the unmodified model), ascending."""
    with torch.no_grad():
        attention = reference(**inputs, output_attentions=True).attentions[layer]  # [batch, heads, S, S]
    kept = []
    for row, positions in enumerate(image_positions(inputs, image)):
        scores = [float(attention[row, :, -1, p].mean()) for p in positions]
        best = sorted(range(len(positions)), key=lambda i: -scores[i])[: ranks[row]]
        kept.append(sorted(positions[i] for i in best))
    return kept


def check_fastv(model, inputs: dict, image: int, k: int, method: FastVConfig, ranks: list[int], atol=2e-5):
    reference = eager_copy(model)
    kept = reference_kept(reference, inputs, k - 1, ranks, image)
    logits, tokens = masked_run(reference, inputs, k, kept, 3, image)
    with apply_pruning(model, method) as pruner, torch.no_grad():
        pruned_logits = model(**inputs).logits[:, -1]
        selection = pruner.last_selection
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    counts = [len(p) for p in image_positions(inputs, image)]
    assert len(set(counts)) == 2 and selection.num_candidates_per_row == counts
    assert selection.num_kept_per_row == ranks
    got = [[positions[i] for i in selection.kept_in_row(row).tolist()]
           for row, positions in enumerate(image_positions(inputs, image))]
    assert got == kept
    # rows are one length again: the row that dropped more carries padding tokens, closed to attention
    real = [inputs["input_ids"].shape[1] - count + rank for count, rank in zip(counts, ranks)]
    assert selection.kept_positions.shape[1] == max(real)
    assert selection.padding.sum(dim=1).tolist() == [max(real) - n for n in real]
    torch.testing.assert_close(pruned_logits, logits, atol=atol, rtol=0)
    assert torch.equal(generated[:, inputs["input_ids"].shape[1]:], tokens)
    with torch.no_grad():  # the control: pruning changed the answer's logits
        assert (model(**inputs).logits[:, -1] - logits).abs().max() > 1e-4


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("budget", [{"keep_ratio": 0.5}, {"attention_rank": 6}])
def test_qwen2_vl_rows_of_16_and_8_image_tokens(attention, budget):
    model = build("qwen2_vl")
    model.set_attn_implementation({"text_config": attention, "vision_config": "eager"})
    ranks = [8, 4] if "keep_ratio" in budget else [6, 6]
    check_fastv(model, qwen_inputs(), IMAGE, 2, FastVConfig(agg_layer=2, token_selection_method="avg_all_heads",
                                                           **budget), ranks)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gemma3_rows_with_two_images_and_one(attention):
    model = build("gemma3")
    model.set_attn_implementation({"text_config": attention, "vision_config": "eager"})
    method = FastVConfig(agg_layer=3, keep_ratio=0.25, token_selection_method="avg_all_heads")
    check_fastv(model, gemma_inputs(), IMAGE, 3, method, [8, 4])


@pytest.mark.parametrize("decoder", ["llama", "mistral"])
def test_llava_next_pictures_of_two_shapes(decoder):
    model, processor = build_tiny_family("llava_next", decoder=decoder)
    assert model.config.text_config.model_type == decoder
    inputs = anyres_inputs(processor)
    counts = [len(p) for p in image_positions(inputs, model.config.image_token_id)]
    assert counts == [1176, 926]
    method = FastVConfig(agg_layer=2, keep_ratio=0.1, token_selection_method="avg_all_heads")
    check_fastv(model, inputs, model.config.image_token_id, 2, method, [round(0.1 * n) for n in counts])


def test_a_fixed_count_is_checked_against_every_row():
    model = build("qwen2_vl")
    with apply_pruning(model, FastVConfig(agg_layer=2, attention_rank=12)), torch.no_grad(), \
            pytest.raises(ValueError, match="attention_rank=12 is larger than the 8 image tokens"):
        model(**qwen_inputs())


def test_text_only_row_next_to_an_image_row_is_not_pruned():
    model = build("qwen2_vl")
    inputs = qwen_inputs()
    text_row = [5, 6, 7, 9, 10, 11, 12]
    inputs = {**inputs, **left_padded([inputs["input_ids"][0].tolist(), text_row])}
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE).long()
    inputs["pixel_values"] = inputs["pixel_values"][: GRID * GRID]
    inputs["image_grid_thw"] = inputs["image_grid_thw"][:1]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([text_row])).logits[0, -1]
    with apply_pruning(model, FastVConfig(agg_layer=2, keep_ratio=0.5)) as pruner, torch.no_grad():
        batched = model(**inputs).logits[1, -1]
    assert pruner.last_selection.num_kept_per_row == [8, 0]
    torch.testing.assert_close(batched, alone, atol=2e-5, rtol=0)


def test_pyramid_drop_rows_match_each_row_alone():
    """Three stages, positions renumbered after each (a per-row shift in decode steps), padding carried from stage
    to stage: every row's kept tokens, prefill logits and decode-step logits are those of the row run alone
    (itself checked against an independent reference in test_schedules)."""
    model, processor = build_tiny_family("llava_next")
    image = model.config.image_token_id
    inputs = anyres_inputs(processor, sizes=((336, 336), (200, 336)))
    method = get_method_class("pdrop")(layers=(1, 2, 3), ratio=0.5)
    rows = []
    with apply_pruning(model, method) as pruner, torch.no_grad():
        for row in range(2):
            alone = row_alone(inputs, row)
            logits = model(**alone).logits[0, -1]
            kept = [s.kept_in_row(0).tolist() for s in pruner.selections]
            steps = model.generate(**alone, max_new_tokens=4, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True).logits
            rows.append((logits, kept, torch.stack([step[0] for step in steps])))
        batched_logits = model(**inputs).logits[:, -1]
        selections = list(pruner.selections)
        generated = torch.stack(model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                               return_dict_in_generate=True).logits, dim=1)  # [batch, steps, vocab]
    counts = [len(p) for p in image_positions(inputs, image)]
    assert counts[0] != counts[1]
    for row, (logits, kept, steps) in enumerate(rows):
        assert [s.num_kept_per_row[row] for s in selections] == [int(counts[row] * 0.5 ** i) for i in (1, 2, 3)]
        assert [s.kept_in_row(row).tolist() for s in selections] == kept
        torch.testing.assert_close(batched_logits[row], logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(generated[row], steps, atol=1e-4, rtol=0)  # every decode step's logits


def noise_pictures_inputs(processor, sizes) -> dict:
    """One chat prompt per (width, height) of random-noise picture (no two patches alike), left-padded."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))] for w, h in sizes]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour is it?"}]}],
        add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[prompt] * len(sizes), images=pictures, padding=True, padding_side="left",
                          return_tensors="pt"))


def row_alone(inputs: dict, row: int) -> dict:
    """Row `row` of a left-padded batch without its padding, with its own image inputs."""
    pad = int((inputs["attention_mask"][row] == 0).sum())
    alone = {key: inputs[key][row:row + 1, pad:] for key in ("input_ids", "attention_mask", "mm_token_type_ids")
             if key in inputs}
    if "image_grid_thw" in inputs:
        patches = [int(t * h * w) for t, h, w in inputs["image_grid_thw"].tolist()]
        alone["pixel_values"] = inputs["pixel_values"][sum(patches[:row]) : sum(patches[: row + 1])]
        alone["image_grid_thw"] = inputs["image_grid_thw"][row:row + 1]
    else:
        alone["pixel_values"] = inputs["pixel_values"][row:row + 1]
        alone["image_sizes"] = inputs["image_sizes"][row:row + 1]
    return alone


ZOO = {"fastv": {}, "pdrop": {}, "dart": {}, "divprune": {}, "sparsevlm": {"recycle": False}, "uniform": {},
       "pool": {}}
RAGGED_FAMILIES = {"llava_next": ((336, 336), (336, 200)), "qwen2_5_vl": ((336, 336), (336, 196))}


@pytest.mark.parametrize("family", sorted(RAGGED_FAMILIES))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_method_prunes_each_row_of_a_ragged_batch_as_alone(family, name):
    """The zoo's methods at the model's depth (SparseVLM without its randomly tie-broken recycling): each row's kept
    tokens at every stage and its last-position logits equal those of the row run alone. Position ids follow the
    attention mask, as under `generate` (FastV-style key norms after RoPE depend on absolute positions)."""
    model, processor = build_tiny_family(family)
    inputs = noise_pictures_inputs(processor, RAGGED_FAMILIES[family])
    if family == "llava_next" and name in ("uniform", "pool"):  # anyres tiles with newlines form no single grid
        with pytest.raises(ValueError, match="form no one grid"):
            apply_pruning(model, get_method_class(name)())
        return
    if family == "llava_next":
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    method = get_method_class(name)(**ZOO[name]).scaled_to(len(model.model.language_model.layers))
    with apply_pruning(model, method) as pruner, torch.no_grad():
        alone = []
        for row in range(2):
            logits = model(**row_alone(inputs, row)).logits[0, -1]
            alone.append((logits, [s.kept_in_row(0).tolist() for s in pruner.selections]))
        batched = model(**inputs).logits[:, -1]
        selections = list(pruner.selections)
    assert selections[0].num_candidates_per_row[0] != selections[0].num_candidates_per_row[1]
    for row, (logits, kept) in enumerate(alone):
        assert [s.kept_in_row(row).tolist() for s in selections] == kept
        torch.testing.assert_close(batched[row], logits, atol=1e-4, rtol=0)
