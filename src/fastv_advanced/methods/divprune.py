"""DivPrune (Alvar et al., CVPR 2025, https://arxiv.org/abs/2503.02175), as its official code runs it
(vbdi/divprune, `llava_arch.py`).

Before the language model, on the projected image embeddings: D = 1 - cosine similarity; the first token kept is
the one whose nearest other token is farthest (the largest second-smallest entry of its column of D); each next one
maximises its minimum distance to those already kept (greedy max-min diversity). `round(ratio * n)` tokens are
kept, in sequence order; the sequence is shorter from layer 0, so positions are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..selection import gather_rows
from . import register_method
from .base import Choice, PruningMethod, Stage, StageInputs, check_range


@register_method
@dataclass
class DivPrune(PruningMethod):
    """ratio: the fraction of image tokens kept, in [0, 1] (the official default 0.098 keeps 56 of 576)."""

    name: ClassVar[str] = "divprune"
    display_name: ClassVar[str] = "DivPrune"
    budget_parameter: ClassVar[str] = "ratio"
    presets: ClassVar[dict[str, dict]] = {str(n): {"ratio": round(n / 576, 4)} for n in (192, 128, 64)}

    ratio: float = 0.098

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0)

    def stages(self, num_layers: int) -> list[Stage]:
        return [Stage(layer=0, hidden_states=True, compact_positions=True)]

    def kept_per_stage(self, num_layers: int, num_image_tokens: int) -> list[tuple[int, int]]:
        return [(0, round(self.ratio * num_image_tokens))]

    def choose(self, stage_index: int, inputs: StageInputs) -> Choice:
        n = inputs.num_image_tokens
        count = round(self.ratio * n)
        hidden = inputs.hidden_states
        image = gather_rows(hidden, inputs.image_positions, 1)  # [batch, n, hidden]
        unit = torch.nn.functional.normalize(image.float(), dim=-1)
        distance = 1.0 - unit @ unit.transpose(1, 2)  # [batch, n, n]
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        picks = []
        if count:
            first = distance.topk(min(2, n), dim=1, largest=False).values[:, -1].argmax(dim=-1)  # [batch]
            picks.append(first)
            nearest = distance[batch, first].scatter(1, first[:, None], float("-inf"))  # [batch, n]
            for _ in range(count - 1):
                pick = nearest.argmax(dim=-1)  # the farthest from everything kept
                picks.append(pick)
                nearest = torch.minimum(nearest, distance[batch, pick]).scatter_(1, pick[:, None], float("-inf"))
        kept = torch.stack(picks, dim=1) if picks else torch.zeros(hidden.shape[0], 0, dtype=torch.long,
                                                                   device=hidden.device)
        return Choice(kept=kept)
