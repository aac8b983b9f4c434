"""PyramidDrop (Xing et al., CVPR 2025, https://arxiv.org/abs/2410.17247), as its official code runs at inference.

Stages at `layers` (default 8, 16, 24). Stage s runs before layer `layers[s]`: that layer's own input norm and q/k
projections (with RoPE) give the last prompt position's attention over the image tokens still present, averaged
over heads; the image tokens kept are `int(n_image * ratio ** (s + 1))` of the prompt's original n_image
(576 -> 288 -> 144 -> 72 with ratio 0.5). Text tokens are never dropped. Positions are renumbered after each drop
(the official code resets position ids to 0..S'-1; here each kept token's position goes down by the number of
tokens dropped before it, which is the same for an unpadded row and keeps left-padded rows consistent).

Low budgets: the authors suggest earlier layers, e.g. `layers=[2,8,16]` with ratio 0.19 (about 64 tokens on
average over 32 layers), 0.42 (about 128) or 0.56 (about 192).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import register_method
from .base import Choice, PruningMethod, Stage, StageInputs, check_range, is_int


@register_method
@dataclass
class PyramidDrop(PruningMethod):
    """layers: the stage layers, ascending, each in [1, L-1]; ratio: lambda in [0, 1]."""

    name: ClassVar[str] = "pdrop"
    display_name: ClassVar[str] = "PyramidDrop"
    budget_parameter: ClassVar[str] = "ratio"
    layer_parameters: ClassVar[dict[str, int]] = {"layers": 0}
    presets: ClassVar[dict[str, dict]] = {  # the authors' low-budget layers; lambda solved for the 32-layer mean
        "192": {"layers": (2, 8, 16), "ratio": 0.56}, "128": {"layers": (2, 8, 16), "ratio": 0.42},
        "64": {"layers": (2, 8, 16), "ratio": 0.19},
    }

    layers: tuple[int, ...] = (8, 16, 24)
    ratio: float = 0.5

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        if not self.layers or not all(is_int(x) for x in self.layers) or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers={list(self.layers)!r} is invalid: give distinct ascending integer layers")
        check_range("ratio", self.ratio, 0.0, 1.0)

    def stages(self, num_layers: int) -> list[Stage]:
        if not 1 <= self.layers[0] or self.layers[-1] >= num_layers:
            raise ValueError(
                f"layers={list(self.layers)} is outside the allowed range [1, {num_layers - 1}] for this model with "
                f"{num_layers} decoder layers"
            )
        return [Stage(layer=x, attention_layer=x, compact_positions=True) for x in self.layers]

    def num_kept(self, stage_index: int, num_original: int) -> int:
        """Image tokens left after stage `stage_index` of a prompt with `num_original` image tokens."""
        return int(num_original * self.ratio ** (stage_index + 1))

    def kept_per_stage(self, num_layers: int, num_image_tokens: int) -> list[tuple[int, int]]:
        return [(layer, self.num_kept(s, num_image_tokens)) for s, layer in enumerate(self.layers)]

    def choose(self, stage_index: int, inputs: StageInputs) -> Choice:
        scores = inputs.attention.mean(dim=1)  # [batch, heads, n] -> [batch, n]
        num_original = inputs.num_original_image_tokens
        return Choice(scores, min(self.num_kept(stage_index, num_original), inputs.num_image_tokens))
