"""VisionZip (Yang et al., CVPR 2025, https://arxiv.org/abs/2412.04467), training-free, as its official code runs
it (dvlab-research/VisionZip, `clip_encoder.py`, `utils.py`).

In the vision tower's feature-select layer (LLaVA's `hidden_states[-2]`): the [CLS] query's attention, summed over
heads, ranks the patches; the `dominant - 1` best patches and [CLS] itself are kept, in their original order with
[CLS] first. The other tokens are merged into `contextual` tokens: on their head-averaged keys (L2-normalised), every
`step = max(1, R // contextual)`-th of the R remaining tokens is a target (the first `contextual`), each other token
joins its most similar target, and a contextual token is the target's output plus the mean output of its members.
The language model receives [dominant, contextual] through the projector: `dominant + contextual` image tokens
(64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30), contiguous positions. They take the first image slots; the kept
indices reported are those slots, the scores are the patches' [CLS] attention.

Where the features are the patch embeddings (feature layer -2 of a one-layer tower, as in the embedded demo model) no
attention layer produced them; the [CLS] attention and keys are then those of the first encoder layer, the one that
reads the features — a fallback the official code never meets (CLIP ViT-L has 24 layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..selection import gather_rows, ordered_positions
from . import register_method
from .base import Choice, PruningMethod, Stage, StageInputs, check_range


@register_method
@dataclass
class VisionZip(PruningMethod):
    """dominant: tokens kept by [CLS] attention, [CLS] included (>= 1); contextual: merged tokens (>= 0)."""

    name: ClassVar[str] = "visionzip"
    display_name: ClassVar[str] = "VisionZip"
    budget_parameter: ClassVar[str] = "dominant"
    presets: ClassVar[dict[str, dict]] = {
        "192": {"dominant": 162, "contextual": 30}, "128": {"dominant": 108, "contextual": 20},
        "64": {"dominant": 54, "contextual": 10},
    }

    dominant: int = 54
    contextual: int = 10

    def __post_init__(self) -> None:
        check_range("dominant", self.dominant, 1, None, integer=True)
        check_range("contextual", self.contextual, 0, None, integer=True)

    def stages(self, num_layers: int) -> list[Stage]:
        return [Stage(layer=0, vision=True, compact_positions=True)]

    def kept_per_stage(self, num_layers: int, num_image_tokens: int) -> list[tuple[int, int]]:
        return [(0, self.dominant + self.contextual)]

    def choose(self, stage_index: int, inputs: StageInputs) -> Choice:
        vision = inputs.vision
        batch, tokens, width = vision.hidden_states.shape
        if self.dominant + self.contextual > min(tokens, inputs.num_image_tokens):
            raise ValueError(f"VisionZip keeps {self.dominant + self.contextual} tokens (dominant + contextual) but "
                             f"the image has {inputs.num_image_tokens} image tokens")
        patch_scores = vision.cls_attention.sum(dim=1)[:, 1:]  # [batch, T - 1]
        top = patch_scores.topk(self.dominant - 1, dim=-1).indices.sort(dim=-1).values + 1
        dominant = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)  # [batch, D], [CLS] first
        features = [gather_rows(vision.hidden_states, dominant, 1)]
        if self.contextual:
            features.append(self._contextual(vision, dominant))
        merged = torch.cat(features, dim=1)  # [batch, D + C, width]
        replacement = inputs.adapter.project_image_features(merged)
        slots = torch.arange(merged.shape[1], device=merged.device).expand(batch, -1)
        scores = patch_scores if patch_scores.shape[1] == inputs.num_image_tokens else None
        return Choice(kept=slots, replacement=replacement, scores=scores)

    def _contextual(self, vision, dominant: torch.Tensor) -> torch.Tensor:
        """[batch, C, width]: targets' outputs plus the mean output of the tokens assigned to them."""
        batch, tokens, width = vision.hidden_states.shape
        rest_mask = torch.ones(batch, tokens, dtype=torch.bool, device=dominant.device).scatter(1, dominant, False)
        remaining = tokens - dominant.shape[1]
        rest = ordered_positions(rest_mask, remaining)  # [batch, R], in order
        keys = torch.nn.functional.normalize(gather_rows(vision.keys.float(), rest, 1), dim=-1)
        hidden = gather_rows(vision.hidden_states, rest, 1)  # [batch, R, width]
        step = max(1, remaining // self.contextual)
        target_list = list(range(0, remaining, step))[: self.contextual]
        member_list = sorted(set(range(remaining)) - set(target_list))
        targets = torch.tensor(target_list, device=dominant.device)
        members = torch.tensor(member_list, dtype=torch.long, device=dominant.device)
        similarity = keys[:, members] @ keys[:, targets].transpose(1, 2)  # [batch, members, C]
        assignment = torch.nn.functional.one_hot(similarity.argmax(dim=-1), targets.shape[0]).to(hidden.dtype)
        sums = assignment.transpose(1, 2) @ hidden[:, members]  # [batch, C, width]
        counts = assignment.sum(dim=1)[..., None]  # [batch, C, 1]
        mean = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
        return hidden[:, targets] + mean
