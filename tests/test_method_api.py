"""The method API: the documented example method, the registry, parameters from strings, the generic naming."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import fastv_reference as ref
from fastv_advanced import apply_pruning, build_method, get_method_class
from fastv_advanced import methods as methods_module
from fastv_advanced.methods import available_methods, describe_methods, method_from_result, method_record
from test_pruning import PROMPTS, logits, make_inputs, tiny  # noqa: F401  (fixture)

README = Path(__file__).resolve().parents[1] / "FASTV_ADVANCED_README.md"


@pytest.fixture()
def documented_method(tmp_path, monkeypatch):
    """The README's example written to `my_methods.py` on the path, as a user would."""
    code = re.search(r"```python\n(# my_methods\.py\n.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "my_methods.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield code
    sys.modules.pop("my_methods", None)
    methods_module._REGISTRY.pop("top_heads", None)  # registered by the example: other tests see the built-ins


def test_documented_example_is_short_and_keeps_what_its_rule_says(tiny, documented_method):
    assert len(documented_method.strip().splitlines()) <= 40
    model, processor, eager = tiny
    cls = get_method_class("my_methods:TopHeads")
    method = build_method("my_methods:TopHeads", {"heads": "3", "keep": "20"})
    assert (method.heads, method.keep) == (3, 20) and "top_heads" in available_methods()
    inputs = make_inputs(processor, PROMPTS, seeds=[2, 3])
    with apply_pruning(model, method) as pruner:
        logits(model, inputs)
    attention = ref.last_row_image_attention(eager, inputs, agg_layer=2)
    for b, attn in enumerate(attention):  # [heads, n]: independent top-3-head mean
        totals = [float(attn[h].sum()) for h in range(attn.shape[0])]
        heads = sorted(range(len(totals)), key=lambda h: -totals[h])[:3]
        scores = sum(attn[h] for h in heads) / 3
        assert pruner.last_selection.kept_image_indices[b].tolist() == ref.reference_kept(scores, 20)
    assert method.file_stem() == "top_heads_heads3_keep20"
    assert method_record(method)["name"] == "top_heads" and cls.name == "top_heads"
    with pytest.raises(ValueError, match=r"heads=0 is outside the allowed range \[1, inf\]"):
        build_method("top_heads", {"heads": "0"})


def test_unknown_method_and_parameter_are_named():
    with pytest.raises(ValueError, match="'nope' is not registered; registered: .*fastv.*pdrop"):
        build_method("nope")
    with pytest.raises(ValueError, match="has no parameter 'alpha'; its parameters: layers, ratio"):
        build_method("pdrop", {"alpha": "1"})
    with pytest.raises(ValueError, match="ratio: 'x' is not a valid float"):
        build_method("pdrop", {"ratio": "x"})
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        build_method("no_such_module:Thing")


def test_parameters_parse_by_field_type():
    method = build_method("pdrop", {"layers": "[2,8,16]", "ratio": "0.19"})
    assert method.layers == (2, 8, 16) and method.ratio == 0.19
    fastv = build_method("fastv", {"attention_rank": "144", "keep_ratio": "none", "agg_layer": "3"})
    assert (fastv.attention_rank, fastv.keep_ratio, fastv.agg_layer) == (144, None, 3)
    assert "pdrop: layers=(8, 16, 24), ratio=0.5" in describe_methods()


def test_generic_names_and_result_round_trip():
    method = build_method("pdrop", {"ratio": "0.3"})
    assert method.file_stem() == "pdrop_ratio0.3"
    assert method.label() == "PyramidDrop (ratio=0.3)"
    section = {"use_fast_v": True, "pruning_method": method_record(method)}
    assert method_from_result(section) == method
    assert method_from_result({"use_fast_v": False}) is None


def test_fastv_keeps_the_guide_names_and_reads_guide_result_files():
    fastv = build_method("fastv", {"token_selection_method": "weighted_combination", "weighted_alpha": "0.7",
                                   "attention_rank": "288"})
    assert fastv.file_stem() == "fastv_weighted_combination_alpha0.7"
    assert fastv.label() == "FastV - weighted α=0.7"
    assert build_method("fastv", {"attention_rank": "144"}).file_stem() == "fastv_avg_all_heads_rank144_k2"
    legacy = {"use_fast_v": True, "fast_v_agg_layer": 2, "fast_v_attention_rank": 288, "fast_v_keep_ratio": None,
              "fast_v_token_selection_method": "max_head", "fast_v_weighted_alpha": 0.5, "seed": 0}
    restored = method_from_result(legacy)
    assert restored.token_selection_method == "max_head" and restored.attention_rank == 288
    assert "weighted_alpha" not in restored.result_parameters()


def test_every_registered_method_prunes_the_tiny_model(tiny):
    """A method that registers is run here without a line of its own: it prunes, keeps at most what it saw at
    every stage, and generation on its cache runs."""
    model, processor, _ = tiny
    inputs = make_inputs(processor, PROMPTS, seeds=[4, 5])
    small = {"fastv": {"attention_rank": "16"}, "pdrop": {"layers": "1,3"}, "dart": {"max_num_truncation": "16"},
             "visionzip": {"dominant": "8", "contextual": "4"}, "sparsevlm": {"layers": "0,1", "keep": "30,12"}}
    for name in available_methods():
        method = build_method(name, small.get(name, {}))
        with apply_pruning(model, method) as pruner:
            out = logits(model, inputs)
            assert pruner.selections, name
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=2, do_sample=False)
        counts = [s.num_kept for s in pruner.selections]
        assert counts == sorted(counts, reverse=True) and counts[-1] < 64, name
        planned = method.kept_per_stage(len(model.model.language_model.layers), 64)
        assert planned == [(s.layer, s.num_kept) for s in pruner.selections], name
        assert out.shape[1] == pruner.last_selection.kept_positions.shape[1], name


def test_budget_solving_meets_a_flops_target_for_every_method():
    from fastv_advanced.budget import planned_flops, solve_budget
    from fastv_advanced.flops import DecoderShape, layer_flops

    shape = DecoderShape(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                         head_dim=128)
    tokens = 35 + 576 + 90
    fastv = solve_budget(build_method("fastv"), 0.5, shape, tokens, 576)
    kept = fastv.attention_rank
    by_hand = [(2 * layer_flops(shape, tokens) + 30 * layer_flops(shape, tokens - 576 + r)) / (32 * layer_flops(shape, tokens))
               for r in (kept - 1, kept, kept + 1)]
    assert abs(by_hand[1] - 0.5) <= min(abs(by_hand[0] - 0.5), abs(by_hand[2] - 0.5))
    for name in available_methods():
        method = build_method(name, {"layers": "2,8,16"} if name == "pdrop" else {})
        solved = solve_budget(method, 0.35, shape, tokens, 576)
        assert abs(planned_flops(solved, shape, tokens, 576)["ratio"] - 0.35) < 0.03, name
        for label, params in type(method).presets.items():
            assert build_method(name, params).kept_per_stage(32, 576), (name, label)
    with pytest.raises(ValueError, match=r"outside the allowed range \(0, 1\]"):
        solve_budget(build_method("dart"), 1.5, shape, tokens, 576)


def test_presets_move_to_the_same_relative_depth():
    pdrop = build_method("pdrop", {"layers": "2,8,16"})
    assert pdrop.scaled_to(32) is pdrop
    assert pdrop.scaled_to(40).layers == (3, 10, 20)  # 2.5, 10, 20 rounded half up
    assert pdrop.scaled_to(8).layers == (1, 2, 4)  # 0.5 -> 1; 2; 4
    assert pdrop.scaled_to(4).layers == (1, 2, 3)  # 0.25 -> 1, 1 -> after 1: 2, 2 -> after 2: 3
    sparse = build_method("sparsevlm", {"budget": "64"})  # rates at 2, 6, 15: stages 3, 7, 16
    assert sparse.scaled_to(4).layers == (0, 1, 2) and sparse.scaled_to(4).keep_table() == (66, 30, 17)
    assert sparse.scaled_to(8).layers == (0, 1, 3)  # stages 0.75 -> 1, 1.75 -> 2, 4 -> rating layers 0, 1, 3
    assert build_method("fastv").scaled_to(16).agg_layer == 1 and build_method("dart").scaled_to(64).layer == 4
    assert build_method("visionzip").scaled_to(4) == build_method("visionzip")


def test_a_method_without_stages_is_refused(tiny):
    from dataclasses import dataclass
    from typing import ClassVar

    from fastv_advanced import PruningMethod

    @dataclass
    class NoStages(PruningMethod):
        name: ClassVar[str] = "no_stages"

        def stages(self, num_layers):
            return []

    with pytest.raises(ValueError, match="no_stages: stages\\(\\) returned no stage"):
        apply_pruning(tiny[0], NoStages())
