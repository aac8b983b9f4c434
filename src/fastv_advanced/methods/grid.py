"""Spatial baselines on the patch grid of the image tokens, before the language model: the grid the model gives
(Qwen-VL's h x w merged patches, `StageInputs.image_grid`), else a square one (g x g image tokens, g = sqrt(n)).

`uniform`: keep the regular sub-grid of every `stride`-th row and column, starting at `stride // 2` (the middle of
each stride x stride cell): stride 2 keeps 144 of 576, stride 3 keeps 64.
`pool`: 2-D average pooling of the projected image embeddings with a `size` x `size` window and the same stride
(floor mode): size 2 gives 144 of 576, size 3 gives 64 (on an h x w grid, (h // size) x (w // size)). The pooled
tokens take the first image slots. Both shorten the sequence from layer 0, so positions are contiguous (where the
model's positions are 1-D; Qwen-VL's 3-D ones stay as they were). The literature names these baselines
without one reference implementation; these are the usual conventions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..selection import gather_rows
from . import register_method
from .base import Choice, PruningMethod, Stage, StageInputs, check_range


def grid_side(num_image_tokens: int) -> int:
    """g for a square g x g grid; ValueError when the image tokens do not form one."""
    side = math.isqrt(num_image_tokens)
    if side * side != num_image_tokens:
        raise ValueError(f"the {num_image_tokens} image tokens do not form a square patch grid, and the model gives "
                         "no grid for them (anyres tiles with newline tokens, several images in a prompt)")
    return side


def grid_shape(inputs: StageInputs) -> tuple[int, int]:
    """(rows, cols) of the image tokens: the model's grid where it gives one, else the square one."""
    if inputs.image_grid is not None:
        return inputs.image_grid
    side = grid_side(inputs.num_image_tokens)
    return side, side


@register_method
@dataclass
class UniformGrid(PruningMethod):
    """stride: keep every stride-th row and column of patches (>= 1)."""

    name: ClassVar[str] = "uniform"
    display_name: ClassVar[str] = "Uniform grid"
    budget_parameter: ClassVar[str] = "stride"
    needs_patch_grid: ClassVar[bool] = True
    presets: ClassVar[dict[str, dict]] = {"144": {"stride": 2}, "64": {"stride": 3}}

    stride: int = 2

    def __post_init__(self) -> None:
        check_range("stride", self.stride, 1, None, integer=True)

    def stages(self, num_layers: int) -> list[Stage]:
        return [Stage(layer=0, compact_positions=True)]

    def kept_per_stage(self, num_layers: int, num_image_tokens: int) -> list[tuple[int, int]]:
        side = grid_side(num_image_tokens)
        return [(0, len(range(self.stride // 2, side, self.stride)) ** 2)]

    def choose(self, stage_index: int, inputs: StageInputs) -> Choice:
        rows, cols = grid_shape(inputs)
        device = inputs.image_positions.device
        row_lines = torch.arange(self.stride // 2, rows, self.stride, device=device)
        col_lines = torch.arange(self.stride // 2, cols, self.stride, device=device)
        kept = (row_lines[:, None] * cols + col_lines[None, :]).flatten()  # row-major patch indices
        return Choice(kept=kept.expand(inputs.image_positions.shape[0], -1))


@register_method
@dataclass
class AveragePool(PruningMethod):
    """size: the pooling window and stride (>= 1)."""

    name: ClassVar[str] = "pool"
    display_name: ClassVar[str] = "Average pooling"
    budget_parameter: ClassVar[str] = "size"
    needs_patch_grid: ClassVar[bool] = True
    presets: ClassVar[dict[str, dict]] = {"144": {"size": 2}, "64": {"size": 3}}

    size: int = 2

    def __post_init__(self) -> None:
        check_range("size", self.size, 1, None, integer=True)

    def stages(self, num_layers: int) -> list[Stage]:
        return [Stage(layer=0, hidden_states=True, compact_positions=True)]

    def kept_per_stage(self, num_layers: int, num_image_tokens: int) -> list[tuple[int, int]]:
        return [(0, (grid_side(num_image_tokens) // self.size) ** 2)]

    def choose(self, stage_index: int, inputs: StageInputs) -> Choice:
        rows, cols = grid_shape(inputs)
        hidden = inputs.hidden_states
        image = gather_rows(hidden, inputs.image_positions, 1)  # [batch, n, hidden]
        grid = image.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[-1], rows, cols)
        pooled = torch.nn.functional.avg_pool2d(grid, self.size)  # [batch, hidden, g', g']
        pooled = pooled.flatten(2).transpose(1, 2)  # [batch, g'^2, hidden], row-major
        kept = torch.arange(pooled.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        return Choice(kept=kept, replacement=pooled)
