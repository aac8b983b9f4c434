"""SparseVLM v1.5 (Zhang et al., ICML 2025, https://arxiv.org/abs/2410.04417), as its official code runs it
(Gumpest/SparseVLMs main, `modelling_sparse_llama.py`, `score.py`, `utils.py`).

Raters: from the language model's input embeddings E, M = softmax over the text axis of V·Tᵀ (V the image rows,
T the tokens after the image block: question and "ASSISTANT:"); r_t = mean of M over the image rows; the text
tokens with r_t above the row's mean rate. At each layer l of `layers` (2, 6, 15), layer l runs on every token
still present; its attention probabilities (head mean) of the raters' rows, averaged over raters, score the image
tokens, and the `min(keep[s], n - 1)` best stay for the layers after it. Recycling (`recycle`): of the deleted
tokens, the ⌊0.3·|D|⌋ + 1 best-scored are clustered by DPC-kNN on layer l's outputs (distances / √hidden,
density over the c nearest, c = ⌊m/10⌋ + 1 clusters, a U(0, 1e-6) tie-break from the seeded generator) and each
cluster's mean is inserted right after the kept image tokens, so a stage leaves k + c image tokens. Positions are
renumbered. The kept indices reported for a recycling stage are the image slots it fills (kept tokens first, then
the merged ones), its scores the raters' attention.

Keep tables (image tokens after layers 2 / 6 / 15) by budget: 192: 300/200/110; 128: 303/110/36; 96: 238/48/26;
64: 66/30/17. `keep` overrides the table for other layer lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..selection import gather_rows
from . import register_method
from .base import Choice, PruningMethod, Stage, StageInputs, check_range, is_int

KEEP_TABLES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}


@register_method
@dataclass
class SparseVLM(PruningMethod):
    """budget: 192, 128, 96 or 64 (chooses the keep table); layers: the rating layers; keep: image tokens kept
    after each (None: the budget's table); recycle: merge the best deleted tokens back."""

    name: ClassVar[str] = "sparsevlm"
    display_name: ClassVar[str] = "SparseVLM"
    budget_parameter: ClassVar[str] = "budget"
    layer_parameters: ClassVar[dict[str, int]] = {"layers": 1}  # it rates at layer l and prunes before l + 1
    presets: ClassVar[dict[str, dict]] = {str(n): {"budget": n} for n in (192, 128, 64)}
    budget_choices: ClassVar[tuple[int, ...]] = tuple(sorted(KEEP_TABLES))

    budget: int = 192
    layers: tuple[int, ...] = (2, 6, 15)
    keep: tuple[int, ...] | None = None
    recycle: bool = True
    _raters: tuple = field(default=(None, None), init=False, repr=False, compare=False)  # (embeddings, raters)

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        if self.keep is None and self.budget not in KEEP_TABLES:
            raise ValueError(f"budget={self.budget!r} has no keep table; choose one of {sorted(KEEP_TABLES)} or give keep")
        if self.keep is not None:
            self.keep = tuple(self.keep)
            if not all(is_int(k) and k >= 0 for k in self.keep):
                raise ValueError(f"keep={list(self.keep)!r} is invalid: give non-negative integers")
        if len(self.keep_table()) != len(self.layers):
            raise ValueError(f"keep has {len(self.keep_table())} entries for {len(self.layers)} layers {list(self.layers)}")
        if list(self.layers) != sorted(set(self.layers)) or not all(is_int(x) and x >= 0 for x in self.layers):
            raise ValueError(f"layers={list(self.layers)!r} is invalid: give distinct ascending layers >= 0")

    def keep_table(self) -> tuple[int, ...]:
        return self.keep if self.keep is not None else KEEP_TABLES[self.budget]

    def stages(self, num_layers: int) -> list[Stage]:
        check_range("layers[-1]", self.layers[-1], 0, num_layers - 2, integer=True)
        return [Stage(layer=layer + 1, attention_layer=layer, attention_rows="text", hidden_states=self.recycle,
                      compact_positions=True, embeddings=True) for layer in self.layers]

    def kept_per_stage(self, num_layers: int, num_image_tokens: int) -> list[tuple[int, int]]:
        counts, n = [], num_image_tokens
        for layer, keep in zip(self.layers, self.keep_table()):
            kept = min(keep, n - 1)
            n = kept + (recycled_clusters(n - kept) if self.recycle else 0)
            counts.append((layer + 1, n))
        return counts

    def choose(self, stage_index: int, inputs: StageInputs) -> Choice:
        attention = inputs.attention.mean(dim=1)  # [batch, Q, n]
        raters = self.raters(inputs) & inputs.query_is_text  # [batch, Q]
        weights = raters.float() / raters.sum(dim=1, keepdim=True).clamp(min=1)
        scores = (weights[:, :, None] * attention).sum(dim=1)  # [batch, n]
        n = inputs.num_image_tokens
        num_kept = min(self.keep_table()[stage_index], n - 1)
        if not self.recycle:
            return Choice(scores=scores, num_kept=num_kept)
        return self._recycled(scores, num_kept, inputs)

    def raters(self, inputs: StageInputs) -> torch.Tensor:
        """BoolTensor[batch, Q]: the rating text tokens among the last Q positions of the prompt (computed once per
        prompt: later stages see the same input embeddings)."""
        if self._raters[0] is inputs.embeddings:
            return self._raters[1]
        embeddings = inputs.embeddings.float()
        rows = inputs.query_is_text.shape[1]
        image = gather_rows(embeddings, inputs.original_image_positions, 1)  # [batch, N, hidden]
        text = embeddings[:, -rows:]  # [batch, Q, hidden]
        is_text = inputs.query_is_text  # the text after the image never leaves the sequence
        logits = (image @ text.transpose(1, 2)).masked_fill(~is_text[:, None, :], float("-inf"))  # [batch, N, Q]
        relevance = logits.softmax(dim=-1).mean(dim=1)  # [batch, Q]
        mean = (relevance * is_text).sum(dim=1, keepdim=True) / is_text.sum(dim=1, keepdim=True).clamp(min=1)
        self._raters = (inputs.embeddings, relevance > mean)
        return self._raters[1]

    def _recycled(self, scores: torch.Tensor, num_kept: int, inputs: StageInputs) -> Choice:
        """Keep the best `num_kept`, then the cluster means of the best deleted ones, in the first image slots."""
        n = inputs.num_image_tokens
        order = scores.argsort(dim=-1, descending=True)  # [batch, n]
        kept = order[:, :num_kept].sort(dim=-1).values
        deleted = n - num_kept
        recycled = order[:, num_kept : num_kept + recycled_count(deleted)]  # [batch, m], best first
        hidden = inputs.hidden_states
        image = gather_rows(hidden, inputs.image_positions, 1)  # [batch, n, hidden]
        kept_hidden = gather_rows(image, kept, 1)
        points = gather_rows(image, recycled, 1)  # [batch, m, hidden]
        merged = dpc_knn_means(points, recycled_clusters(deleted), inputs.generator)
        replacement = torch.cat([kept_hidden, merged.to(hidden.dtype)], dim=1)
        slots = torch.arange(replacement.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        return Choice(kept=slots, replacement=replacement, scores=scores)


def recycled_count(deleted: int) -> int:
    """How many of the deleted tokens are clustered: ⌊0.3·|D|⌋ + 1."""
    return int(0.3 * deleted) + 1


def recycled_clusters(deleted: int) -> int:
    """How many merged tokens recycling adds for `deleted` deleted tokens: ⌊m/10⌋ + 1."""
    return recycled_count(deleted) // 10 + 1


def dpc_knn_means(points: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Density-peak clustering with k nearest neighbours (k = `clusters`), as SparseVLM's `cluster_and_merge`:
    points [batch, m, hidden] -> the mean of each cluster [batch, clusters, hidden], clusters in centre order."""
    batch, count, width = points.shape
    x = points.float()
    distance = torch.cdist(x, x) / math.sqrt(width)  # [batch, m, m]
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    noise = torch.rand(batch, count, generator=generator).to(x.device) * 1e-6
    density = (-(nearest**2).mean(dim=-1)).exp() + noise  # [batch, m]
    higher = density[:, None, :] > density[:, :, None]  # [batch, i, j]: j denser than i
    farthest = distance.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(higher, distance, farthest).min(dim=-1).values  # [batch, m]
    centres = (density * delta).topk(clusters, dim=-1).indices  # [batch, c]
    to_centre = distance.gather(2, centres[:, None, :].expand(-1, count, -1))  # [batch, m, c]
    assignment = to_centre.argmin(dim=-1)  # [batch, m]
    assignment.scatter_(1, centres, torch.arange(clusters, device=x.device).expand(batch, -1))
    one_hot = torch.nn.functional.one_hot(assignment, clusters).to(x.dtype)  # [batch, m, c]
    return (one_hot.transpose(1, 2) @ x) / one_hot.sum(dim=1)[..., None]
