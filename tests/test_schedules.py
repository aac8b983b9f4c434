"""Schedules of several stages (original and renumbered positions) against an independent masked eager
computation (tests/fastv_reference.py): kept tokens, logits, cached greedy generation; single and left-padded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import fastv_reference as ref
from fastv_advanced import Choice, PruningMethod, Stage, apply_pruning, build_method
from test_pruning import PROMPTS, logits, make_inputs, tiny  # noqa: F401  (fixture)

NUM_IMAGE = 64


@dataclass
class TwoStageMaxHead(PruningMethod):
    """Test method: before layer 1 keep `first` tokens by layer 0's max-head attention, before layer 3 keep
    `second` by layer 2's head mean, original positions."""

    name: ClassVar[str] = "two_stage_test"
    first: int = 40
    second: int = 12

    def stages(self, num_layers):
        return [Stage(layer=1, attention_layer=0), Stage(layer=3, attention_layer=2)]

    def choose(self, stage_index, inputs):
        attention = inputs.attention  # [batch, heads, n]
        if stage_index == 0:
            head = attention.sum(-1).argmax(-1)
            return Choice(attention[torch.arange(attention.shape[0]), head], self.first, head)
        return Choice(attention.mean(1), self.second)


def top_by(scores: torch.Tensor, count: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    return order[:count]


def max_head_keep(count):
    def keep(attention):
        totals = [float(attention[h].sum()) for h in range(attention.shape[0])]
        return top_by(attention[max(range(len(totals)), key=totals.__getitem__)], count)
    return keep


def mean_keep(count):
    return lambda attention: top_by(sum(attention[h] for h in range(attention.shape[0])) / attention.shape[0], count)


SCHEDULES = {
    # name: (method, reference stages (layer, attention layer, renumbered, keep_fn))
    "original positions": (TwoStageMaxHead(first=40, second=12),
                           [(1, 0, False, max_head_keep(40)), (3, 2, False, mean_keep(12))]),
    "pdrop, renumbered": (build_method("pdrop", {"layers": "1,3", "ratio": "0.5"}),
                          [(1, 1, True, mean_keep(32)), (3, 3, True, mean_keep(16))]),
}


def reference(model, eager, inputs, stages, positions):
    embeds = ref.embeddings(model, inputs)
    image = inputs["input_ids"] == model.config.image_token_id
    kept, dropped, compacted = ref.run_schedule(eager, embeds, inputs["attention_mask"], positions, image, stages)
    expected, _ = ref.segmented_forward(eager, embeds, inputs["attention_mask"], positions, dropped, compacted)
    return kept, dropped, compacted, expected, embeds


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("rows", [1, 2])
def test_schedule_matches_masked_reference(tiny, schedule, rows):
    model, processor, eager = tiny
    method, stages = SCHEDULES[schedule]
    inputs = make_inputs(processor, PROMPTS[:rows], seeds=[11, 12][:rows])  # two rows: left padding
    with apply_pruning(model, method) as pruner:
        pruned = logits(model, inputs)
        selections = list(pruner.selections)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    seq_len = inputs["input_ids"].shape[1]
    positions = torch.arange(seq_len).expand(rows, -1)
    kept, dropped, compacted, expected, embeds = reference(model, eager, inputs, stages, positions)

    assert [s.layer for s in selections] == [stage[0] for stage in stages]
    for stage_index, selection in enumerate(selections):
        assert selection.kept_image_indices.tolist() == kept[stage_index]
    final = selections[-1].kept_positions  # [batch, S']
    assert pruned.shape[1] == final.shape[1]
    for b in range(rows):
        real = inputs["attention_mask"][b].bool()[final[b]]
        torch.testing.assert_close(pruned[b][real], expected[b, final[b]][real], rtol=1e-4, atol=1e-4)

    expected_tokens = ref.schedule_greedy_generate(eager, embeds, inputs["attention_mask"], dropped, compacted, 5)
    assert out[:, seq_len:].tolist() == expected_tokens.tolist()


def test_every_stage_selection_is_kept_and_nested(tiny):
    model, processor, _ = tiny
    inputs = make_inputs(processor, PROMPTS, seeds=[1, 2])
    with apply_pruning(model, TwoStageMaxHead(first=30, second=10)) as pruner:
        logits(model, inputs)
    first, second = pruner.selections
    assert first.num_kept == 30 and second.num_kept == 10 and second.num_image_tokens == 30
    for b in range(2):
        assert set(second.kept_image_indices[b].tolist()) <= set(first.kept_image_indices[b].tolist())
        assert second.candidate_image_indices[b].tolist() == first.kept_image_indices[b].tolist()
    assert first.head_index is not None and second.head_index is None
    assert "kept 10 of 30 image tokens" in repr(second)
