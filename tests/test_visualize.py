"""fastv-visualize on a small results folder written here: 3 configurations (baseline, two pruned, one with scores)
on 3 questions whose images are not square, 16 image tokens (a 4 x 4 patch grid)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import draw_image, llava_entry
from fastv_advanced import visualize
from fastv_advanced.cli import visualize as visualize_cli
from fastv_advanced.prompting import expand_to_square

pytest.importorskip("matplotlib")

N, SIDE = 16, 4
IDS = ["1", "2", "3"]
KEPT = {  # configuration -> question id -> kept patch indices
    "max_head": {"1": [8, 9, 12, 13], "2": [9, 10, 13, 14], "3": [0, 12, 13, 15]},
    "random": {"1": [0, 5, 10, 15], "2": [1, 2, 3, 4], "3": [12, 13, 14, 15]},
}
CORRECT = {"baseline": {"1", "2", "3"}, "max_head": {"2"}, "random": {"1", "2"}}


def result_files(folder: Path, name: str, question_file: Path, images: Path, method: str | None) -> None:
    """A result JSON with the fields the comparison reads and its JSONL (header + one record per question)."""
    records = []
    for qid in IDS:
        record = {"type": "sample", "id": qid, "image": f"{qid}/image.png", "label": "A", "num_image_tokens": N,
                  "prediction": "A" if qid in CORRECT[name] else "B", "correct": qid in CORRECT[name],
                  "pruned": method is not None, "kept_image_indices": KEPT[name][qid] if method else None}
        if name == "random":
            record["image_scores"] = [float((7 * i) % N) for i in range(N)]
        records.append(record)
    stem = f"scienceqa_results_{name}"
    header = {"type": "header", "fingerprint": name, "selection": {"ids": IDS}}
    (folder / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [header] + records))
    config = {"model_path": str(folder / "no-model"), "use_fast_v": method is not None, "image_aspect_ratio": "pad",
              "fast_v_token_selection_method": method, "fast_v_attention_rank": 4 if method else None,
              "fast_v_agg_layer": 2 if method else None, "num_image_tokens": N}
    result = {"accuracy": len(CORRECT[name]) / 3, "total_samples": 3, "correct_samples": len(CORRECT[name]),
              "model_config": config, "latency": {}, "flops_info": {}, "tokens": {}, "fingerprint": name,
              "question_file": {"path": str(question_file), "sha256": "same"}, "image_folder": str(images),
              "samples_file": f"{stem}.jsonl"}
    (folder / f"{stem}.json").write_text(json.dumps(result))


@pytest.fixture()
def results(tmp_path) -> Path:
    images = tmp_path / "images"
    for k, qid in enumerate(IDS):
        draw_image(images / qid / "image.png", k, size=(40 + 4 * k, 30))
    question_file = tmp_path / "questions.json"
    question_file.write_text(json.dumps([llava_entry(qid, f"Which shape is red? ({qid})", ["circle", "square"], "A",
                                                     f"{qid}/image.png") for qid in IDS]))
    folder = tmp_path / "results"
    folder.mkdir()
    for name, method in (("baseline", None), ("max_head", "max_head"), ("random", "random")):
        result_files(folder, name, question_file, images, method)
    return folder


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = visualize_cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_keep_counts_match_an_independent_count(results):
    configurations, warnings = visualize.load_configurations(results)
    assert warnings == [] and [c.label for c in configurations] == ["Baseline", "max_head R=4 K=2", "random R=4 K=2"]
    for configuration in configurations[1:]:
        expected = np.zeros((SIDE, SIDE), dtype=int)
        for kept in KEPT[configuration.run.group].values():
            for index in kept:
                expected[index // SIDE, index % SIDE] += 1
        counts = visualize.keep_counts(list(configuration.records.values()), N)
        assert counts.tolist() == expected.tolist()
    assert visualize.keep_counts(list(configurations[0].records.values()), N).sum() == 0  # the baseline drops none


def test_both_pictures_are_drawn_with_the_documented_size(results, tmp_path, capsys):
    kept, frequency = tmp_path / "out" / "kept.png", tmp_path / "out" / "frequency.png"
    (results / "scienceqa_results_torn.json").write_text('{"accuracy": 0.5, "total_')
    code, out, err = run_cli(capsys, "--results-dir", results, "--question-id", "1", "3", "--output", kept,
                             "--frequency-output", frequency)
    assert code == 0, err
    assert "warning: skipping" in err and "scienceqa_results_torn.json: it is not valid JSON" in err
    assert f"written to {kept}" in out and f"written to {frequency}" in out
    v = visualize
    columns, blocks = 3, 2  # each question block: the kept row and, for `random`'s scores, a score row
    width = 2 * v.MARGIN_IN + columns * v.PANEL_IN + (columns - 1) * v.GAP_IN
    height = 2 * v.MARGIN_IN + blocks * (v.HEADER_IN + 2 * (v.TITLE_IN + v.PANEL_IN)) + (blocks - 1) * v.GAP_IN
    with Image.open(kept) as image:
        assert image.format == "PNG" and image.size == (round(width * v.DPI), round(height * v.DPI))
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # pictures, not a blank canvas
    width = 2 * v.MARGIN_IN + 2 * v.PANEL_IN + v.GAP_IN + v.COLORBAR_IN  # the two pruned configurations
    height = 2 * v.MARGIN_IN + v.HEADER_IN + v.TITLE_IN + v.PANEL_IN
    with Image.open(frequency) as image:
        assert image.format == "PNG" and image.size == (round(width * v.DPI), round(height * v.DPI))


def test_default_questions_are_those_the_configurations_disagree_on_and_default_outputs_sit_in_the_folder(
        results, capsys):
    configurations, _ = visualize.load_configurations(results)
    assert visualize.default_question_ids(configurations, count=2) == ["1", "3"]  # all right on question 2
    code, out, err = run_cli(capsys, "--results-dir", results)
    assert code == 0, err
    assert (results / "kept_patches.png").is_file() and (results / "keep_frequency.png").is_file()
    assert "question(s) 1, 3, 2 x 3 configurations" in out


def test_the_image_is_drawn_as_the_model_saw_it():
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    mean = (0.48145466, 0.4578275, 0.40821073)
    padded = visualize.model_view(image, mean, "pad")
    assert padded.size == (40, 40) and padded.getpixel((0, 0)) == (122, 116, 104)
    assert np.array_equal(np.asarray(padded), np.asarray(expand_to_square(image, (122, 116, 104))))
    assert visualize.model_view(image, mean, "crop").size == (30, 30)


def test_errors_name_the_flag_file_or_question(results, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--results-dir", tmp_path / "nowhere")
    assert code == 2 and "--results-dir" in err and "does not exist" in err
    code, _, err = run_cli(capsys, "--results-dir", results, "--question-id", "42")
    assert code == 2 and "--question-id 42: not in the question file" in err and "1, 2, 3" in err
    code, _, err = run_cli(capsys, "--results-dir", results, "--image-folder", tmp_path / "elsewhere")
    assert code == 2 and str(tmp_path / "elsewhere" / "1" / "image.png") in err and "--image-folder" in err
    for name in ("max_head", "random"):
        path = results / f"scienceqa_results_{name}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "kept_image_indices"}) + "\n"
                                for r in lines))
    code, _, err = run_cli(capsys, "--results-dir", results)
    assert code == 2 and "no per-sample record has kept_image_indices" in err and "--save-selection" in err


def test_run_mode_evaluates_a_few_questions_then_draws(tiny_model_dir, question_set, tmp_path, capsys,
                                                      one_torch_thread):
    from fastv_advanced.cli import visualize as visualize_cli

    question_file, images = question_set
    out = tmp_path / "pictures"
    code = visualize_cli.main(["--results-dir", str(out), "--run", "2", "--", "--model-path", str(tiny_model_dir),
                               "--question-file", str(question_file), "--image-folder", str(images),
                               "--max-new-tokens", "2", "--no-progress", "--no-baseline",
                               "--pruning-method", "dart", "uniform", "--pruning-param", "max_num_truncation=16"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "scienceqa_results_dart_max_num_truncation16.jsonl").open()]
    samples = [r for r in records if r["type"] == "sample"]
    assert len(samples) == 2 and len(samples[0]["kept_image_indices"]) == 20
    assert (out / "kept_patches.png").stat().st_size > 0 and (out / "keep_frequency.png").stat().st_size > 0
    assert visualize_cli.main(["--results-dir", str(out), "--run", "0", "--", "--model-path", "x"]) == 2
