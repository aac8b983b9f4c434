"""Batches whose rows differ in image tokens: the method is called once per group of rows that share their current
and original image-token counts and their image grid, so each call sees a rectangular batch (a ratio keeps each
group its own share, a fixed count is checked against each), and the groups' choices are merged back into one
padded `Choice` for the pruner.
"""

from __future__ import annotations

import dataclasses

import torch

from .methods import PruningMethod, StageInputs
from .methods.base import Choice, VisionFeatures
from .selection import gather_rows, kept_image_tokens


def row_grids(extents: list[int], images_per_row: list[int], counts: list[int]) -> list[tuple[int, int] | None]:
    """Per row, its image tokens' (rows, cols) grid: the adapter's extents (flattened [batch, 2], or empty) where
    the row holds one image of exactly rows x cols tokens, else None."""
    grids = []
    for row, (images, count) in enumerate(zip(images_per_row, counts)):
        shape = tuple(extents[2 * row : 2 * row + 2])
        grids.append(shape if len(shape) == 2 and images == 1 and shape[0] * shape[1] == count else None)
    return grids


def choose_per_group(method: PruningMethod, stage_index: int, inputs: StageInputs, hidden: torch.Tensor,
                     prompt) -> tuple[Choice, list[int]]:
    """The method's choice for every row of `inputs` (n and N the largest counts; `hidden` [batch, S, hidden]),
    one call per group of rows with equal `prompt.counts`, `prompt.original_counts` and `prompt.grids`. Returns
    the merged `Choice` (`kept` [batch, R] with each row's own first and 0-padded, scores [batch, n] NaN-padded,
    replacements [batch, R, hidden] where a group merges tokens) and each row's kept count (0 for a row without
    image tokens)."""
    batch, width = inputs.image_positions.shape
    device = inputs.image_positions.device
    groups: dict[tuple, list[int]] = {}
    for row, key in enumerate(zip(prompt.counts, prompt.original_counts, prompt.grids)):
        groups.setdefault(key, []).append(row)
    chosen, num_kept = [], [0] * batch
    for (count, original, _), rows in groups.items():
        if count == 0:  # a row without image tokens (a text-only prompt in the batch)
            continue
        index = torch.tensor(rows, device=device)
        group = dataclasses.replace(rows_of(inputs, index, count, original, method.name),
                                    image_grid=prompt.grid_of(rows))
        choice = method.choose(stage_index, group)
        top = kept_image_tokens(method, choice, len(rows), count)  # [rows, R_group]
        chosen.append((index, count, choice, top))
        for row in rows:
            num_kept[row] = top.shape[1]
    merged = Choice(kept=torch.zeros(batch, max(num_kept), dtype=torch.long, device=device))
    for index, count, choice, top in chosen:
        merged.kept[index, : top.shape[1]] = top
        if choice.scores is not None and choice.scores.shape[1] == count:
            if merged.scores is None:
                merged.scores = torch.full((batch, width), float("nan"), device=device)
            merged.scores[index, :count] = choice.scores.float()
        if choice.head_index is not None:
            if merged.head_index is None:
                merged.head_index = torch.zeros(batch, dtype=torch.long, device=device)
            merged.head_index[index] = choice.head_index
    if any(choice.replacement is not None for _, _, choice, _ in chosen):
        merged.replacement = hidden.new_zeros(batch, merged.kept.shape[1], hidden.shape[-1])
        for index, count, choice, top in chosen:
            replacement = choice.replacement
            if replacement is None:  # this group's kept tokens as they are
                replacement = gather_rows(hidden[index], inputs.image_positions[index].gather(1, top), 1)
            merged.replacement[index, : top.shape[1]] = replacement.to(hidden.dtype)
    return merged, num_kept


def rows_of(inputs: StageInputs, rows: torch.Tensor, count: int, original: int, method: str) -> StageInputs:
    """The stage inputs of batch rows `rows` (LongTensor[r]), which hold `count` current and `original` original
    image tokens: each tensor's rows, and its image-token axis cut to the rows' own count."""

    def pick(value: torch.Tensor | None, width: int | None = None) -> torch.Tensor | None:
        if value is None:
            return None
        value = value.index_select(0, rows)
        return value if width is None else value[..., :width]

    vision = inputs.vision
    if vision is not None:
        if vision.hidden_states.shape[0] != inputs.image_positions.shape[0]:
            raise ValueError(f"{method} reads the vision tower per image; it ran {vision.hidden_states.shape[0]} "
                             f"images for {inputs.image_positions.shape[0]} rows, so rows with different numbers "
                             "of image tokens cannot share a batch: run them one at a time")
        vision = VisionFeatures(*(pick(t) for t in (vision.cls_attention, vision.keys, vision.hidden_states)))
    return dataclasses.replace(
        inputs, num_image_tokens=count, num_original_image_tokens=original,
        image_positions=pick(inputs.image_positions, count), image_indices=pick(inputs.image_indices, count),
        attention=pick(inputs.attention, count), hidden_states=pick(inputs.hidden_states), keys=pick(inputs.keys),
        vision=vision, query_is_text=pick(inputs.query_is_text), embeddings=pick(inputs.embeddings),
        original_image_positions=pick(inputs.original_image_positions, original),
    )
