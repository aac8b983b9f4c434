"""DART, duplication-aware reduction of tokens (Wen et al., 2025, https://arxiv.org/abs/2502.11494), as its
official code runs it (ZichenWen1/DART, `modeling_llama_self.py`).

Before layer `layer` (2), from layer `layer - 1`: pivots are the `pivot_image_tokens` image tokens and the
`pivot_text_tokens` tokens after the image block (question and "ASSISTANT:") with the largest L1 norm of their keys
after RoPE (all heads concatenated). The image tokens other than the image pivots are candidates; for each pivot in
ascending sequence order (the official code iterates a Python set of indices, which for these small integers is
usually ascending) the `max_num_truncation // pivots` candidates least similar to it (cosine of the final-norm'ed
hidden states, gain included) are kept and leave the candidates. Kept: the image pivots and every selected token,
so `pivot_image_tokens + pivots * (max_num_truncation // pivots)` image tokens (M = 128 keeps 132), with their
original positions; text and system tokens are all kept.
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
class DART(PruningMethod):
    """layer: prune before it (>= 1); max_num_truncation: M; pivot_image_tokens / pivot_text_tokens: pivots."""

    name: ClassVar[str] = "dart"
    display_name: ClassVar[str] = "DART"
    budget_parameter: ClassVar[str] = "max_num_truncation"
    layer_parameters: ClassVar[dict[str, int]] = {"layer": 0}
    presets: ClassVar[dict[str, dict]] = {str(n): {"max_num_truncation": n} for n in (192, 128, 64)}

    layer: int = 2
    max_num_truncation: int = 128
    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4

    def __post_init__(self) -> None:
        check_range("layer", self.layer, 1, None, integer=True)
        check_range("max_num_truncation", self.max_num_truncation, 0, None, integer=True)
        check_range("pivot_image_tokens", self.pivot_image_tokens, 0, None, integer=True)
        check_range("pivot_text_tokens", self.pivot_text_tokens, 0, None, integer=True)
        if self.pivot_image_tokens + self.pivot_text_tokens == 0:
            raise ValueError("pivot_image_tokens + pivot_text_tokens must be at least 1")

    def stages(self, num_layers: int) -> list[Stage]:
        check_range("layer", self.layer, 1, num_layers - 1, integer=True)
        return [Stage(layer=self.layer, keys_layer=self.layer - 1, hidden_states=True)]

    def num_kept(self, num_image_tokens: int) -> int:
        pivots = self.pivot_image_tokens + self.pivot_text_tokens
        return self.pivot_image_tokens + pivots * (self.max_num_truncation // pivots)

    def kept_per_stage(self, num_layers: int, num_image_tokens: int) -> list[tuple[int, int]]:
        return [(self.layer, min(self.num_kept(num_image_tokens), num_image_tokens))]

    def choose(self, stage_index: int, inputs: StageInputs) -> Choice:
        n = inputs.num_image_tokens
        if self.num_kept(n) > n:
            raise ValueError(f"DART keeps {self.num_kept(n)} image tokens (max_num_truncation="
                             f"{self.max_num_truncation}) but the input has {n}")
        key_norm = inputs.keys.abs().sum(dim=-1)  # [batch, S]
        image = inputs.image_positions  # [batch, n]
        image_pivots = key_norm.gather(1, image).topk(self.pivot_image_tokens, dim=-1).indices  # into n
        order = torch.arange(key_norm.shape[1], device=key_norm.device)
        after_image = order[None] > image[:, -1:]  # [batch, S]
        text_pivots = key_norm.masked_fill(~after_image, float("-inf")).topk(self.pivot_text_tokens, dim=-1).indices
        pivots = torch.cat([image.gather(1, image_pivots), text_pivots], dim=1).sort(dim=-1).values  # positions
        z = torch.nn.functional.normalize(inputs.adapter.final_norm(inputs.hidden_states).float(), dim=-1)
        image_z = gather_rows(z, image, 1)  # [batch, n, hidden]
        available = torch.ones_like(image, dtype=torch.bool).scatter(1, image_pivots, False)
        chosen = [image_pivots]
        per_pivot = self.max_num_truncation // pivots.shape[1]
        for p in range(pivots.shape[1]):
            pivot_z = gather_rows(z, pivots[:, p, None], 1)  # [batch, 1, hidden]
            similarity = (image_z * pivot_z).sum(-1).masked_fill(~available, float("inf"))  # [batch, n]
            least = similarity.topk(per_pivot, dim=-1, largest=False).indices
            available.scatter_(1, least, False)
            chosen.append(least)
        return Choice(kept=torch.cat(chosen, dim=1))
