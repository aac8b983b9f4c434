"""The spatial baselines (`uniform`, `pool`) on Qwen-VL's rectangular image grids, and a batch mixing grids.

Qwen-VL images of any aspect ratio become h x w merged tokens; the methods take that grid from `image_grid_thw`.
The check is independent of the methods' row-major arithmetic: each image token's (row, column) comes from the
model's own M-RoPE position ids (`get_rope_index`), the kept tokens of `uniform` must be exactly those at rows and
columns stride // 2 + k * stride, and each token `pool` writes must be the mean of the layer-0 inputs of the
size x size block of tokens with those coordinates in an unpruned run. A batch of a wide and a tall picture (equal
counts, different grids) gives each row its own grid.
"""

from __future__ import annotations

import pytest
import torch
from test_ragged_batches import noise_pictures_inputs

from fastv_advanced.methods import get_method_class
from fastv_advanced.pruning import apply_pruning
from fastv_advanced.tiny_families import build_tiny_family

SIZES = ((336, 196), (196, 336))  # (width, height): a wide and a tall picture


@pytest.fixture(scope="module")
def qwen():
    model, processor = build_tiny_family("qwen2_5_vl")
    return model, noise_pictures_inputs(processor, SIZES)


def coordinates(model, inputs: dict) -> list[list[tuple[int, int]]]:
    """Per row, the (row, column) M-RoPE coordinates of its image tokens, in sequence order."""
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"],
                                              attention_mask=inputs["attention_mask"])  # [3, batch, S]
    result = []
    for row, ids in enumerate(inputs["input_ids"]):
        image = (ids == model.config.image_token_id).nonzero().flatten().tolist()
        result.append([(int(positions[1, row, p] - positions[1, row, image[0]]),
                        int(positions[2, row, p] - positions[2, row, image[0]])) for p in image])
    return result


def layer0_inputs(model, inputs: dict, method=None) -> tuple[torch.Tensor, object]:
    """The hidden states entering decoder layer 0 ([batch, S', hidden], after the pruner's own layer-0 hook) and
    the pruner's selection (None unpruned)."""
    captured = []
    pruner = apply_pruning(model, method) if method is not None else None
    handle = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
        if pruner is not None:
            pruner.remove()
    return captured[0], (pruner.last_selection if pruner is not None else None)


def test_the_pictures_give_equal_counts_on_different_grids(qwen):
    model, inputs = qwen
    grids = inputs["image_grid_thw"][:, 1:].tolist()
    assert grids[0] != grids[1] and grids[0][0] * grids[0][1] == grids[1][0] * grids[1][1]


@pytest.mark.parametrize("stride,call", [(2, "forward"), (3, "forward"), (2, "generate")])
def test_uniform_keeps_every_stride_th_row_and_column_of_each_rows_grid(qwen, stride, call):
    """A plain forward call gives the pruner `image_grid_thw`; `generate` encodes the images first and gives it the
    3-D positions instead."""
    model, inputs = qwen
    with apply_pruning(model, get_method_class("uniform")(stride=stride)) as pruner, torch.no_grad():
        if call == "generate":
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        else:
            model(**inputs)
    selection = pruner.last_selection
    for row, coords in enumerate(coordinates(model, inputs)):
        expected = [i for i, (r, c) in enumerate(coords) if r % stride == stride // 2 and c % stride == stride // 2]
        assert selection.kept_in_row(row).tolist() == expected
    height, width = (inputs["image_grid_thw"][0, 1:] // 2).tolist()
    assert selection.num_kept_per_row[0] == len(range(stride // 2, height, stride)) * len(range(stride // 2, width,
                                                                                               stride))


def test_pool_averages_each_block_of_the_rows_own_grid(qwen):
    model, inputs = qwen
    size = 2
    original, _ = layer0_inputs(model, inputs)  # [batch, S, hidden]
    pruned, selection = layer0_inputs(model, inputs, get_method_class("pool")(size=size))
    for row, coords in enumerate(coordinates(model, inputs)):
        image = (inputs["input_ids"][row] == model.config.image_token_id).nonzero().flatten()
        rows, cols = max(r for r, _ in coords) + 1, max(c for _, c in coords) + 1
        blocks = [[i for i, (r, c) in enumerate(coords) if r // size == br and c // size == bc]
                  for br in range(rows // size) for bc in range(cols // size)]
        expected = torch.stack([original[row, image[block]].mean(dim=0) for block in blocks])
        first = int(image[0])  # the pooled tokens take the first image slots, after the same text
        assert selection.num_kept_per_row[row] == len(blocks)
        torch.testing.assert_close(pruned[row, first : first + len(blocks)], expected, atol=1e-5, rtol=1e-5)
