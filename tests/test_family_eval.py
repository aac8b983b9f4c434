"""The evaluation CLI and the suite on a tiny checkpoint of every other family (`fastv_advanced.tiny_families`,
saved to disk and loaded back the way a downloaded checkpoint is): the chat-template prompt, the image tokens each
family makes of the shipped 336 x 336 pictures, the pruning recorded per sample, the model card, batched runs
equal to one question at a time, and a clear error for an unsupported model.

The pruning itself is checked against an independent eager computation in tests/test_families.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from fastv_advanced.cli import eval_scivqa
from fastv_advanced.prompting import SINGLE_PRED_PROMPT
from fastv_advanced.tiny_families import TINY_FAMILIES, save_tiny_family

QUESTIONS = REPO_ROOT / "data" / "scienceqa" / "himap-inference-MCQ.json"
IMAGES = REPO_ROOT / "data" / "scienceqa" / "images" / "test"

# Image tokens of one 336 x 336 picture, from each family's geometry (tiny_families): Qwen2-VL / Qwen2.5-VL at
# 672 px with 14 px patches and Qwen3-VL at 768 px with 16 px patches are 48 x 48 patches merged 2 x 2 = 24 x 24;
# Gemma 3 declares 576 per image; the anyres families add to the 24 x 24 base image one 24 x 24 tile (the
# 336 x 336 grid point) with a newline embedding after each of its 24 rows.
EXPECTED_IMAGE_TOKENS = {"qwen2_vl": 576, "qwen2_5_vl": 576, "qwen3_vl": 576, "gemma3": 576,
                         "llava_next": 24 * 24 + 24 * 24 + 24, "llava_onevision": 24 * 24 + 24 * 24 + 24}
# (start of the user turn, end of turn + assistant prompt) of each tiny family's chat template
TURNS = {"llava_next": ("USER: ", " ASSISTANT:"),
         "llava_onevision": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
         "gemma3": ("<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n")}
for _name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
    TURNS[_name] = ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for name in TINY_FAMILIES:
        save_tiny_family(name, root / name)
    return root


def question_texts(count: int) -> dict[str, str]:
    entries = json.loads(QUESTIONS.read_text())[:count]
    return {str(entry["id"]): entry["conversations"][0]["value"] for entry in entries}


def run_eval(model_dir, out, batch_size: int, *extra: str) -> tuple[dict, list[dict]]:
    code = eval_scivqa.main([
        "--model-path", str(model_dir), "--question-file", str(QUESTIONS), "--image-folder", str(IMAGES),
        "--single-pred-prompt", "--use-fast-v", "--fast-v-agg-layer", "2", "--fast-v-attention-rank", "288",
        "--fast-v-token-selection-method", "avg_all_heads", "--num-samples", "3", "--max-new-tokens", "3",
        "--batch-size", str(batch_size), "--save-selection", "--no-progress", "--output-dir", str(out), *extra,
    ])
    assert code == 0
    result = json.loads((out / "scienceqa_results_fastv_avg_all_heads.json").read_text())
    lines = (out / "scienceqa_results_fastv_avg_all_heads.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r.get("type") == "sample"]
    return result, records


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_eval_cli_runs_every_family(family, family_dirs, tmp_path):
    result, records = run_eval(family_dirs / family, tmp_path / "batched", 3)
    assert result["complete"] and result["errors"] == 0 and result["total_samples"] == 3
    card = result["model_config"]["model_card"]
    assert card["model_type"] == family and card["prompt_format"] == "chat_template"
    assert result["model_config"]["num_layers"] == 4
    texts = question_texts(3)
    begin, end = TURNS[family]
    for record in records:
        assert record["num_image_tokens"] == EXPECTED_IMAGE_TOKENS[family]
        assert record["pruned"] and record["num_kept_image_tokens"] == 288
        assert record["kept_per_stage"] == [[2, 288]] and len(record["kept_image_indices"]) == 288
        assert record["flops_ratio"] < 1
        question = texts[record["id"]].replace("<image>", "").strip()
        assert record["prompt"].startswith(begin)
        assert record["prompt"].endswith(f"{question}\n{SINGLE_PRED_PROMPT}{end}")
        assert record["batch_size"] == 3
        assert record["vision_flops"] > 0
    flops = result["flops_info"]  # the vision tower's cost, unchanged by pruning, dilutes the decoder's saving
    assert flops["flops_ratio"] < flops["flops_ratio_with_vision"] < 1
    assert flops["avg_vision_flops"] == pytest.approx(sum(r["vision_flops"] for r in records) / 3)

    _, single = run_eval(family_dirs / family, tmp_path / "single", 1)
    keys = ("id", "prompt", "output", "num_tokens", "num_image_tokens", "kept_image_indices", "prefill_flops",
            "vision_flops")
    assert [{k: r[k] for k in keys} for r in single] == [{k: r[k] for k in keys} for r in records]


def test_suite_script_runs_on_a_family_checkpoint(family_dirs, tmp_path):
    """The guide's suite (baseline, max_head, avg_all_heads, weighted_combination at three alphas) from the command
    line on LLaVA-NeXT."""
    out = tmp_path / "suite"
    env = {k: v for k, v in os.environ.items() if k != "FASTV_EMBEDDED"}
    env.update(NUM_SAMPLES="2", OUTPUT_DIR=str(out), GPU="", PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", "./src/HiMAP/inference/eval_scivqa_fastv_advanced.sh", "--model-path", str(family_dirs / "llava_next"),
         "--question-file", str(QUESTIONS), "--image-folder", str(IMAGES), "--max-new-tokens", "2", "--no-progress"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(path.name for path in out.glob("scienceqa_results_*.json"))
    assert results == ["scienceqa_results_baseline.json", "scienceqa_results_fastv_avg_all_heads.json",
                       "scienceqa_results_fastv_max_head.json"] + [
        f"scienceqa_results_fastv_weighted_combination_alpha{alpha}.json" for alpha in ("0.3", "0.5", "0.7")]
    for path in out.glob("scienceqa_results_*.json"):
        result = json.loads(path.read_text())
        assert result["complete"] and result["model_config"]["model_card"]["model_type"] == "llava_next"
    assert "Baseline" in done.stdout and "avg_all_heads" in done.stdout


def test_unsupported_model_type_names_the_supported_families(tmp_path, capsys):
    model = tmp_path / "blip"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    code = eval_scivqa.main(["--model-path", str(model), "--question-file", str(QUESTIONS), "--image-folder",
                             str(IMAGES), "--output-dir", str(tmp_path / "out")])
    assert code != 0
    message = capsys.readouterr().err
    assert "blip-2" in message and "qwen2_5_vl" in message and "llava_next" in message


def test_flops_target_on_a_family_without_a_fixed_image_token_count_says_why(family_dirs, tmp_path, capsys):
    from fastv_advanced.cli import sweep

    code = sweep.main(["--model-path", str(family_dirs / "qwen2_5_vl"), "--question-file", str(QUESTIONS),
                       "--image-folder", str(IMAGES), "--pruning-method", "fastv", "--flops-target", "0.5",
                       "--num-samples", "2", "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert code != 0
    message = capsys.readouterr().err
    assert "fixed number of image tokens" in message and "keep_ratio" in message


def test_sweep_marks_methods_that_cannot_prune_the_family_and_goes_on(family_dirs, tmp_path, capsys):
    """The method zoo on LLaVA-NeXT: VisionZip (no [CLS]-patch correspondence) and the patch-grid baselines (anyres
    tokens form no grid) are marked not applicable with the reason; the others are computed, exit status 0."""
    from fastv_advanced.cli import sweep

    out = tmp_path / "out"
    code = sweep.main(["--model-path", str(family_dirs / "llava_next"), "--question-file", str(QUESTIONS),
                       "--image-folder", str(IMAGES), "--pruning-method", "visionzip", "uniform", "dart",
                       "--num-samples", "2", "--max-new-tokens", "2", "--output-dir", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert sorted(path.name for path in out.glob("*.json")) == ["scienceqa_results_baseline.json",
                                                               "scienceqa_results_dart.json"]
    assert "2 computed, 2 not applicable of 4 configurations" in printed
    assert "[CLS] attention needs a CLIP tower" in printed and "form no one grid" in printed


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_batched_run_on_pictures_of_different_sizes(family, family_dirs, tmp_path):
    """Pictures of four shapes give three or four image-token counts; one batch holds them all, each row keeps its own
    quarter, and every record equals the one-question-at-a-time run."""
    from PIL import Image

    images = tmp_path / "images"
    for index, size in enumerate([(336, 336), (336, 200), (200, 336), (500, 220)], start=1):
        (images / str(index)).mkdir(parents=True)
        Image.open(IMAGES / str(index) / "image.png").convert("RGB").resize(size).save(images / str(index) / "image.png")
    runs = {}
    for batch_size in (4, 1):
        out = tmp_path / f"batch{batch_size}"
        code = eval_scivqa.main([
            "--model-path", str(family_dirs / family), "--question-file", str(QUESTIONS), "--image-folder",
            str(images), "--single-pred-prompt", "--pruning-method", "fastv", "--pruning-param", "agg_layer=2",
            "--pruning-param", "keep_ratio=0.25", "--pruning-param", "token_selection_method=avg_all_heads",
            "--num-samples", "4", "--max-new-tokens", "3", "--batch-size", str(batch_size), "--save-selection",
            "--no-progress", "--output-dir", str(out)])
        assert code == 0
        (jsonl,) = out.glob("*.jsonl")
        runs[batch_size] = [r for r in map(json.loads, jsonl.read_text().splitlines()) if r.get("type") == "sample"]
    batched = {r["id"]: r for r in runs[4]}
    counts = [r["num_image_tokens"] for r in runs[1]]
    assert len(set(counts)) >= 3  # Qwen-VL resizes to a pixel budget: the two transposed shapes match
    for single in runs[1]:
        record = batched[single["id"]]
        assert record["batch_size"] == 4
        assert record["num_kept_image_tokens"] == round(0.25 * record["num_image_tokens"])
        assert len(record["kept_image_indices"]) == record["num_kept_image_tokens"]
        assert len(record["image_scores"]) == record["num_image_tokens"]
        keys = ("output", "num_tokens", "num_image_tokens", "kept_image_indices", "kept_per_stage", "prefill_flops")
        assert {k: record[k] for k in keys} == {k: single[k] for k in keys}
