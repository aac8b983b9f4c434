"""Pruning on the other VLM families (LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3), each checked against an independent
computation: the kept tokens against the eager attention weights of the unmodified model, the logits and the cached
greedy generation against an eager copy in which the dropped image tokens are blocked as keys in every layer from K
on (equal to removing them), single and batched with left padding, under SDPA and eager attention.

The tiny models are random, built offline from their configs. For Qwen-VL and Gemma 3 the inputs are written token by
token (no processor), with `pixel_values` of the right shape; the anyres families (whose image token count comes from
the image size) take their inputs from the offline processors of `fastv_advanced.tiny_families`. Nothing here needs
torchvision or a hub download.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from fastv_advanced.adapters import adapter_for
from fastv_advanced.methods import available_methods, get_method_class
from fastv_advanced.methods.fastv import FastVConfig
from fastv_advanced.pruning import apply_pruning
from fastv_advanced.tiny_families import build_tiny_family

VOCAB, IMAGE, START, END, VIDEO, PAD = 300, 250, 251, 252, 253, 0
GRID = 8  # Qwen: 8 x 8 patches, merged 2 x 2 -> 16 image tokens; Gemma 3: 16 tokens per image
NUM_IMAGE = 16


def _text_config(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=PAD, **extra)


def _qwen(family: str):
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=4,
                      temporal_patch_size=2, spatial_merge_size=2)
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=_text_config(rope_parameters=rope),
                                                             vision_config=vision, **ids))
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, out_hidden_size=64,
                      window_size=16, fullatt_block_indexes=[1], temporal_patch_size=2, spatial_merge_size=2)
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=_text_config(rope_parameters=rope),
                                                                   vision_config=vision, **ids))
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 1], temporal_patch_size=2,
                  spatial_merge_size=2)
    rope["mrope_interleaved"] = True
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=_text_config(rope_parameters=rope),
                                                         vision_config=vision, **ids))


def _gemma3():
    # sliding, sliding, full, sliding, sliding, full: K=1 prunes before the first full layer, K=3 between them
    layer_types = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"]
    text = _text_config(query_pre_attn_scalar=16, layer_types=layer_types, sliding_window=512)
    text["num_hidden_layers"] = 6
    config = Gemma3Config(
        text_config=text, mm_tokens_per_image=NUM_IMAGE, boi_token_index=START, eoi_token_index=END,
        image_token_index=IMAGE,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=4, vision_use_head=False),
    )
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)  # zero-initialised
    return model


FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3")


def build(family: str):
    torch.manual_seed(0)
    model = _gemma3() if family == "gemma3" else _qwen(family)
    with torch.no_grad():  # sharper attention than random init, so the choice is not a near-tie
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return model.eval()


def inputs_for(family: str, padded: bool) -> dict:
    """Two prompts with one image each (16 image tokens), the second shorter and left-padded when `padded`."""
    texts = [([5, 6, 7, 8], [9, 10, 11, 12, 13]), ([15, 16] if padded else [15, 16, 17, 18], [19, 20, 21, 22, 23])]
    rows = [before + [START] + [IMAGE] * NUM_IMAGE + [END] + after for before, after in texts]
    length = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    generator = torch.Generator().manual_seed(1)
    if family == "gemma3":
        inputs["pixel_values"] = torch.randn(2, 3, 32, 32, generator=generator)
        inputs["token_type_ids"] = (input_ids == IMAGE).long()
    else:
        inputs["pixel_values"] = torch.randn(2 * GRID * GRID, 3 * 2 * 4 * 4, generator=generator)
        inputs["image_grid_thw"] = torch.tensor([[1, GRID, GRID]] * 2)
        inputs["mm_token_type_ids"] = (input_ids == IMAGE).long()
    return inputs


def first_row(inputs: dict) -> dict:
    rows = {key: value[:1] for key, value in inputs.items()}
    if "image_grid_thw" in inputs:
        rows["pixel_values"] = inputs["pixel_values"][: GRID * GRID]
    return rows


# -- the independent reference -----------------------------------------------------------------------------------


def eager_copy(model):
    reference = copy.deepcopy(model)
    reference.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    return reference


def reference_kept(reference, inputs: dict, layer: int, rank: int, image: int = IMAGE) -> list[list[int]]:
    """Per row, the sequence positions of the `rank` image tokens with the highest head-mean attention of the last
    position in decoder layer `layer` (eager weights of the unmodified model), ascending."""
    with torch.no_grad():
        attention = reference(**inputs, output_attentions=True).attentions[layer]  # [batch, heads, S, S]
    kept = []
    for row, ids in enumerate(inputs["input_ids"].tolist()):
        positions = [j for j, token in enumerate(ids) if token == image]
        scores = [float(attention[row, :, -1, p].mean()) for p in positions]
        best = sorted(range(len(positions)), key=lambda i: -scores[i])[:rank]
        kept.append(sorted(positions[i] for i in best))
    return kept


def masked_run(reference, inputs: dict, layer: int, kept: list[list[int]], new_tokens: int, image: int = IMAGE):
    """Last-position logits and greedy tokens of the eager copy with every image token not in `kept` blocked as a
    key in decoder layers >= `layer` (prefill and decode)."""
    ids = inputs["input_ids"]
    blocked = torch.zeros(ids.shape, dtype=torch.bool)
    for row, positions in enumerate(kept):
        for position, token in enumerate(ids[row].tolist()):
            blocked[row, position] = token == image and position not in positions

    def block(module, args, kwargs):
        mask = kwargs["attention_mask"]  # eager: always a float [batch, 1, q, kv] mask
        columns = torch.zeros(ids.shape[0], mask.shape[-1], dtype=torch.bool)
        columns[:, : ids.shape[1]] = blocked
        kwargs["attention_mask"] = mask.masked_fill(columns[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    layers = reference.model.language_model.layers
    handles = [layers[i].register_forward_pre_hook(block, with_kwargs=True) for i in range(layer, len(layers))]
    try:
        with torch.no_grad():
            logits = reference(**inputs).logits[:, -1]
            tokens = reference.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[:, ids.shape[1]:]
    finally:
        for handle in handles:
            handle.remove()
    return logits, tokens


# -- tests ----------------------------------------------------------------------------------------------------------

CASES = [(family, k) for family in FAMILIES for k in ((3,) if family == "qwen3_vl" else (1, 3) if family == "gemma3"
                                                        else (2,))]


@pytest.mark.parametrize("family,k", CASES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fastv_matches_masked_eager_reference(family, k, padded, attention):
    model = build(family)
    model.set_attn_implementation({"text_config": attention, "vision_config": "eager"})
    reference = eager_copy(model)
    rank, new_tokens = 6, 4
    batches = [inputs_for(family, padded)] + ([] if padded else [first_row(inputs_for(family, False))])
    for inputs in batches:
        kept = reference_kept(reference, inputs, k - 1, rank)
        logits, tokens = masked_run(reference, inputs, k, kept, new_tokens)
        with apply_pruning(model, FastVConfig(agg_layer=k, attention_rank=rank,
                                              token_selection_method="avg_all_heads")) as pruner, torch.no_grad():
            pruned_logits = model(**inputs).logits[:, -1]
            selection = pruner.last_selection
            got = [[positions[i] for i in row] for positions, row in zip(
                [[j for j, t in enumerate(ids) if t == IMAGE] for ids in inputs["input_ids"].tolist()],
                selection.kept_image_indices.tolist())]
            generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        assert got == kept
        assert selection.kept_positions.shape[1] == inputs["input_ids"].shape[1] - (NUM_IMAGE - rank)
        torch.testing.assert_close(pruned_logits, logits, atol=2e-5, rtol=0)
        assert torch.equal(generated[:, inputs["input_ids"].shape[1]:], tokens)
        with torch.no_grad():  # the control: pruning changed the answer's logits
            assert (model(**inputs).logits[:, -1] - logits).abs().max() > 1e-3


def anyres_inputs(processor, padded: bool) -> dict:
    """Two chat prompts with one 336 x 336 picture each (1,176 image tokens: base image, one tile, row newlines),
    the second with a shorter question and so left-padded when `padded`."""
    from PIL import Image, ImageDraw

    questions = ["Which colour is the shape?", "Colour?" if padded else "Which shape is it?"]
    pictures = []
    for colour in ("red", "blue"):
        picture = Image.new("RGB", (336, 336), "white")
        ImageDraw.Draw(picture).ellipse((60, 90, 200, 260), fill=colour)
        pictures.append([picture])
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                               "text": q}]}],
                                             add_generation_prompt=True, tokenize=False) for q in questions]
    return dict(processor(text=prompts, images=pictures, padding=True, padding_side="left", return_tensors="pt"))


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("padded", [False, True])
def test_anyres_fastv_matches_masked_eager_reference(family, padded):
    """LLaVA-NeXT (Llama decoder) and LLaVA-OneVision (Qwen2 decoder): the row-end newline embeddings carry the
    image token id, so they are candidates like every other image token."""
    model, processor = build_tiny_family(family)
    image = model.config.image_token_id
    reference = eager_copy(model)
    inputs = anyres_inputs(processor, padded)
    num_image = int((inputs["input_ids"][0] == image).sum())
    assert num_image == 24 * 24 * 2 + 24
    k, rank, new_tokens = 2, 100, 3
    kept = reference_kept(reference, inputs, k - 1, rank, image)
    logits, tokens = masked_run(reference, inputs, k, kept, new_tokens, image)
    with apply_pruning(model, FastVConfig(agg_layer=k, attention_rank=rank,
                                          token_selection_method="avg_all_heads")) as pruner, torch.no_grad():
        pruned_logits = model(**inputs).logits[:, -1]
        selection = pruner.last_selection
        generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    positions = [[j for j, t in enumerate(ids) if t == image] for ids in inputs["input_ids"].tolist()]
    got = [[row_positions[i] for i in row] for row_positions, row in zip(positions, selection.kept_image_indices.tolist())]
    assert got == kept
    torch.testing.assert_close(pruned_logits, logits, atol=2e-5, rtol=0)
    assert torch.equal(generated[:, inputs["input_ids"].shape[1]:], tokens)
    with torch.no_grad():  # the control: pruning changed the answer's logits
        assert (model(**inputs).logits[:, -1] - logits).abs().max() > 1e-4


def test_qwen3_vl_refuses_pruning_before_its_deepstack_layers():
    model = build("qwen3_vl")
    with pytest.raises(ValueError, match=r"DeepStack.*K >= 2"):
        apply_pruning(model, FastVConfig(agg_layer=1, attention_rank=4))


def test_gemma3_refuses_a_prompt_as_long_as_its_sliding_window():
    model = build("gemma3")
    model.config.text_config.sliding_window = 20
    with apply_pruning(model, FastVConfig(agg_layer=1, attention_rank=4)), pytest.raises(ValueError,
                                                                                           match="sliding_window=20"):
        model(**inputs_for("gemma3", False))


def test_unsupported_model_names_the_supported_families():
    with pytest.raises(TypeError, match="Qwen2.5-VL.*Gemma 3"):
        adapter_for(torch.nn.Linear(2, 2))


def test_selection_names_the_image_of_each_kept_token():
    model = build("qwen2_vl")
    inputs = inputs_for("qwen2_vl", False)
    # two images in one prompt: the second half of the image block becomes a second image after a separator
    ids = inputs["input_ids"].clone()
    first = (ids[0] == IMAGE).nonzero()[0].item()
    ids = torch.cat([ids[:, : first + 8], torch.full((2, 1), END), torch.full((2, 1), START), ids[:, first + 8:]], 1)
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == IMAGE).long())
    inputs["pixel_values"] = inputs["pixel_values"].view(2, GRID * GRID, -1)
    grid = GRID // 2  # each image 4 x 8 patches -> 8 tokens
    halves = [inputs["pixel_values"][row].view(2, GRID // 2, GRID, -1) for row in range(2)]
    inputs["pixel_values"] = torch.cat([half.reshape(2 * grid * GRID, -1) for pair in halves for half in pair])
    inputs["image_grid_thw"] = torch.tensor([[1, grid, GRID]] * 4)
    with apply_pruning(model, FastVConfig(agg_layer=2, attention_rank=10)) as pruner, torch.no_grad():
        model(**inputs)
    selection = pruner.last_selection
    expected = (selection.kept_image_indices >= 8).long()  # image tokens 0-7 are the first image, 8-15 the second
    assert torch.equal(selection.kept_image_numbers, expected)
    assert set(expected.flatten().tolist()) == {0, 1}


@pytest.mark.parametrize("family", FAMILIES + ("llava_next", "llava_onevision"))
def test_every_method_runs_or_says_why_not(family):
    if family.startswith("llava"):
        model, processor = build_tiny_family(family)
        inputs = anyres_inputs(processor, True)
    else:
        model, inputs = build(family), inputs_for(family, True)
    num_layers = len(model.model.language_model.layers)
    lowest = 2 if family == "qwen3_vl" else 0
    ran = []
    for name in available_methods():
        cls = get_method_class(name)
        preset = next(iter(cls.presets.values()), {}) if getattr(cls, "presets", None) else {}
        method = cls(**preset).scaled_to(num_layers)
        try:
            pruner = apply_pruning(model, method)
        except ValueError as error:  # VisionZip's [CLS] on these towers; a schedule below Qwen3-VL's DeepStack;
            message = str(error)  # the patch-grid baselines on anyres tokens (base image, tiles, newlines)
            grid = family.startswith("llava") and name in ("uniform", "pool") and "form no one grid" in message
            assert "[CLS]" in message or grid or (family == "qwen3_vl" and "DeepStack" in message), (name, message)
            continue
        try:
            with pruner, torch.no_grad():
                tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
                assert tokens.shape[0] == 2
                assert pruner.selections and pruner.selections[0].layer >= lowest
                ran.append(name)
        except ValueError as error:
            message = str(error)
            # what may legitimately refuse: VisionZip's [CLS] on these towers, and budgets above 16 image tokens
            assert "[CLS]" in message or "image tokens" in message, (name, message)
            assert not family.startswith("llava"), (name, message)
    if family.startswith("llava"):
        assert {"fastv", "dart", "pdrop", "sparsevlm", "divprune"} <= set(ran), ran
    elif family != "qwen3_vl":  # on this 4-layer Qwen3-VL every multi-stage preset starts below its DeepStack layers
        assert {"pdrop", "sparsevlm", "divprune", "uniform", "pool"} <= set(ran), ran
