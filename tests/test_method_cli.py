"""A method written in its own file outside the package runs from the command lines and appears, with its
parameter, in the result file name, the comparison table, the plot and a sweep grid; no other file is edited."""

from __future__ import annotations

import json
import sys

import pytest

from fastv_advanced import methods
from fastv_advanced.cli import compare as compare_cli
from fastv_advanced.cli import eval_scivqa, sweep
from fastv_advanced.compare import build_comparison, load_results

OUTSIDE_METHOD = '''
from dataclasses import dataclass
from typing import ClassVar

import torch

from fastv_advanced import Choice, PruningMethod, Stage


@dataclass
class KeepEvery(PruningMethod):
    """Before layer 1, keep every x-th image token."""

    name: ClassVar[str] = "keep_every"
    display_name: ClassVar[str] = "Keep every"
    budget_parameter: ClassVar[str] = "x"
    x: int = 2

    def stages(self, num_layers):
        return [Stage(layer=1)]

    def kept_per_stage(self, num_layers, num_image_tokens):
        return [(1, len(range(0, num_image_tokens, self.x)))]

    def choose(self, stage_index, inputs):
        kept = torch.arange(0, inputs.num_image_tokens, self.x, device=inputs.image_positions.device)
        return Choice(kept=kept.expand(inputs.image_positions.shape[0], -1))
'''


@pytest.fixture()
def outside_method(tmp_path, monkeypatch):
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "my_outside_method.py").write_text(OUTSIDE_METHOD)
    monkeypatch.syspath_prepend(str(folder))
    yield "my_outside_method:KeepEvery"
    sys.modules.pop("my_outside_method", None)


def common_args(model_dir, question_set, out) -> list[str]:
    question_file, images = question_set
    return ["--model-path", str(model_dir), "--question-file", str(question_file), "--image-folder", str(images),
            "--single-pred-prompt", "--output-dir", str(out), "--max-new-tokens", "2", "--no-progress"]


def test_outside_method_runs_from_eval_sweep_compare_and_plot(tiny_model_dir, question_set, tmp_path, outside_method,
                                                              capsys, one_torch_thread):
    out = tmp_path / "out"
    args = common_args(tiny_model_dir, question_set, out)
    assert eval_scivqa.main(args + ["--pruning-method", outside_method, "--pruning-param", "x=3"]) == 0
    result = json.loads((out / "scienceqa_results_keep_every_x3.json").read_text())
    assert result["model_config"]["pruning_method"] == {"name": outside_method, "parameters": {"x": 3}}
    assert result["tokens"]["avg_kept_image_tokens"] == len(range(0, 64, 3))

    assert sweep.main(args + ["--pruning-method", outside_method, "--pruning-param", "x=3,4"]) == 0
    names = sorted(p.name for p in out.glob("scienceqa_results_*.json"))
    assert names == ["scienceqa_results_baseline.json", "scienceqa_results_keep_every_x3.json",
                     "scienceqa_results_keep_every_x4.json"]
    assert "1 skipped" in capsys.readouterr().out  # x=3 was already done by the single run

    runs, warnings = load_results(out)
    comparison = build_comparison(runs)
    assert [row.strategy for row in comparison.rows] == ["Baseline", "Keep every (x=3)", "Keep every (x=4)"]
    assert [row.group for row in comparison.rows[1:]] == ["keep_every", "keep_every"]
    assert comparison.rows[1].parameters == {"x": 3}
    plot = tmp_path / "plot.png"
    assert compare_cli.main(["--results-dir", str(out), "--plot", str(plot), "--width", "0"]) == 0
    printed = capsys.readouterr().out
    assert "Keep every (x=3)" in printed and "Keep every (x=4)" in printed
    assert plot.stat().st_size > 10_000
    assert "keep_every" not in methods.available_methods()  # nothing registered, nothing edited

    fastv = ["--use-fast-v", "--fast-v-agg-layer", "1", "--fast-v-attention-rank", "16"]
    assert eval_scivqa.main(args + fastv) == 0
    rows = build_comparison(load_results(out)[0]).rows
    keep3 = next(r for r in rows if r.strategy == "Keep every (x=3)")
    assert keep3.reference == "FastV - avg_all_heads (R=16, K=1)"  # the only FastV row: the nearest in FLOPs

    def correct(name):
        records = [json.loads(line) for line in (out / name).open()]
        return {r["id"]: r["correct"] for r in records if r["type"] == "sample"}

    ours, theirs = correct("scienceqa_results_keep_every_x3.jsonl"), correct(
        "scienceqa_results_fastv_avg_all_heads_rank16_k1.jsonl")
    assert keep3.reference_delta == pytest.approx((sum(ours.values()) - sum(theirs.values())) / len(ours))
    assert 0.0 <= keep3.reference_p_value <= 1.0
    assert next(r for r in rows if r.method == "fastv").reference is None


def test_pruning_flags_are_checked_before_the_model_loads(tiny_model_dir, question_set, tmp_path, capsys,
                                                          outside_method):
    args = common_args(tiny_model_dir, question_set, tmp_path / "out")
    assert eval_scivqa.main(args + ["--pruning-method", "nope"]) == 2
    assert "--pruning-method: pruning method 'nope' is not registered" in capsys.readouterr().err
    assert eval_scivqa.main(args + ["--pruning-method", "pdrop", "--pruning-param", "ratio=2"]) == 2
    assert "--pruning-param ratio=2.0 is outside the allowed range [0, 1]" in capsys.readouterr().err
    assert eval_scivqa.main(args + ["--pruning-method", "pdrop"]) == 2  # layers 8, 16, 24 on a 4-layer model
    assert "layers=[8, 16, 24] is outside the allowed range [1, 3]" in capsys.readouterr().err
    assert eval_scivqa.main(args + ["--pruning-method", "dart", "--pruning-preset", "32"]) == 2
    assert "--pruning-preset 32: dart has the presets 192, 128, 64" in capsys.readouterr().err
    assert sweep.main(args + ["--pruning-method", "pdrop", "--pruning-param", "alpha=1"]) == 2
    assert "--pruning-param alpha: no method of --pruning-method pdrop has that parameter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sweep_presets_and_flops_targets(tiny_model_dir, question_set, tmp_path, capsys):
    args = common_args(tiny_model_dir, question_set, tmp_path / "out") + ["--dry-run"]
    assert sweep.main(args + ["--pruning-method", "visionzip", "divprune", "--pruning-preset", "64"]) == 0
    printed = capsys.readouterr().out
    assert "scienceqa_results_visionzip.json" in printed  # the 64 preset is VisionZip's default setting
    assert "scienceqa_results_divprune_ratio0.1111.json" in printed
    assert sweep.main(args + ["--pruning-method", "fastv", "--flops-target", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "scienceqa_results_fastv_avg_all_heads_rank" in printed


@pytest.mark.parametrize("name", ["scienceqa_results_fastv_weighted_combination_alpha0.7",
                                  "scienceqa_results_baseline", "scienceqa_results_fastv_random_rank144_k2"])
def test_files_written_before_methods_keep_their_fingerprint_and_name(name):
    """Headers written by the version before pruning methods existed (tests/data/legacy): the configuration they
    record, read back, has the same fingerprint and file name, so those files are resumed, not refused."""
    from pathlib import Path
    from types import SimpleNamespace

    from fastv_advanced.model_loading import ModelInfo
    from fastv_advanced.run_config import RunConfig, fingerprint_config, result_stem
    from fastv_advanced.run_files import fingerprint_of

    header = json.loads((Path(__file__).parent / "data" / "legacy" / f"{name}.header.json").read_text())
    recorded = header["config"]
    run_config = RunConfig.from_dict(recorded["run"])
    model = recorded["model"]
    info = ModelInfo(model_path=model["path"], model_base=model["base"], format=model["format"], dtype=model["dtype"],
                     device=model["device_type"], device_name="", num_layers=4, num_image_tokens=576,
                     image_processor="", image_aspect_ratio="pad")
    questions = SimpleNamespace(**recorded["questions"])
    assert fingerprint_of(fingerprint_config(run_config, info, questions)) == header["fingerprint"]
    assert result_stem(run_config) + ".json" == header["result_name"] == f"{name}.json"
