"""compare_fastv_results.py / fastv-compare on fixed result files (tests/data/compare, see its README.md).

The McNemar p-values below are computed by hand from the fixtures' per-question correctness.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from fastv_advanced import compare
from fastv_advanced.comparison_rows import pareto_front
from fastv_advanced.cli import compare as compare_cli
from fastv_advanced.statistics import bootstrap_delta_interval

FIXTURES = Path(__file__).parent / "data" / "compare"
IDS = [str(i) for i in range(1, 11)]
CORRECT = {  # the fixtures' correct question ids
    "baseline": {1, 2, 3, 4, 5, 6, 7},
    "max_head": {1, 2, 3, 4, 8},
    "avg_all_heads": {1, 2, 3, 4, 5, 6, 7},
    "alpha0.3": {1, 2},
    "alpha0.5": set(range(1, 11)),
    "alpha0.7": {8, 9, 10},
    "rank144": set(),
}
# (strategy label, key into CORRECT, b, c, p by hand, prefill s) in the expected row order
EXPECTED = [
    ("Baseline", "baseline", None, None, None, 0.200),
    ("FastV - max_head (R=144, K=2)", "rank144", 7, 0, 2 / 2**7, 0.100),
    ("FastV - max_head", "max_head", 3, 1, 2 * (1 + 4) / 2**4, 0.125),
    ("FastV - avg_all_heads", "avg_all_heads", 0, 0, 1.0, 0.128),
    ("FastV - weighted α=0.3", "alpha0.3", 5, 0, 2 / 2**5, 0.130),
    ("FastV - weighted α=0.5", "alpha0.5", 0, 3, 2 / 2**3, 0.131),
    ("FastV - weighted α=0.7", "alpha0.7", 7, 3, 2 * (1 + 10 + 45 + 120) / 2**10, 0.129),
]


def correctness(key: str) -> list[bool]:
    return [int(qid) in CORRECT[key] for qid in IDS]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = compare_cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def results(tmp_path) -> Path:
    """A writable copy of the fixtures."""
    folder = tmp_path / "results"
    shutil.copytree(FIXTURES, folder)
    (folder / "README.md").unlink()
    return folder


def test_statistics_in_json_match_hand_computed_values(capsys):
    code, out, err = run_cli(capsys, "--results-dir", FIXTURES, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["baseline"] == "scienceqa_results_baseline.json"
    rows = report["rows"]
    assert [r["strategy"] for r in rows] == [e[0] for e in EXPECTED]
    for row, (label, key, b, c, p, prefill) in zip(rows, EXPECTED):
        accuracy = len(CORRECT[key]) / 10
        assert row["accuracy"] == pytest.approx(accuracy)
        assert row["samples"] == 10
        assert row["prefill_speedup"] == pytest.approx(0.200 / prefill)
        assert row["delta"] == pytest.approx(accuracy - 0.7)
        if key == "baseline":
            assert row["baseline"] and row["p_value"] is None and row["mcnemar_b"] is None
            continue
        assert (row["mcnemar_b"], row["mcnemar_c"], row["paired_samples"]) == (b, c, 10), label
        assert row["p_value"] == pytest.approx(p), label
        low, high = bootstrap_delta_interval(correctness("baseline"), correctness(key), resamples=10000, seed=0)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
        assert low <= row["delta"] <= high
        assert row["kept_image_tokens"] == (144 if key == "rank144" else 288) and row["image_tokens"] == 576
    assert report["baseline_standard_error"] == pytest.approx((0.7 * 0.3 / 10) ** 0.5)


def test_table_has_the_guide_layout_and_the_hand_computed_values(capsys):
    code, out, _ = run_cli(capsys, "--results-dir", FIXTURES)
    assert code == 0
    lines = out.splitlines()
    assert set(lines[0]) == {"="} and lines[1].strip() == "FastV Advanced 结果比较" and set(lines[2]) == {"="}
    header = lines[4]
    for column in ("策略", "准确率", "平均延迟(s)", "FLOPs比例", "样本数", "预填充加速", "图像token", "McNemar p",
                   "Δ 95% CI"):
        assert column in header
    assert set(lines[5]) == {"-"}
    rows = lines[6:13]
    assert [r.split("  ")[0] for r in rows] == [e[0] for e in EXPECTED]
    assert set(lines[13]) == {"-"}
    baseline, rank144, max_head = rows[0], rows[1], rows[2]
    assert "0.7000 " in baseline and "1.00x" in baseline and "100.00%" in baseline and "576/576" in baseline
    assert "0.5000 (-0.2000)" in max_head and "0.180000" in max_head and "0.125000" in max_head
    assert "1.60x" in max_head and "60.17%" in max_head and "288/576" in max_head and " 0.625 " in max_head
    assert "0.016 *" in rank144 and "2.00x" in rank144 and "45.22%" in rank144 and "144/576" in rank144
    assert "0.7000 (+0.0000)" in rows[3] and " 1.000 " in rows[3] and "[+0.0000, +0.0000]" in rows[3]
    assert "0.062 " in rows[4] and "*" not in rows[4]  # 0.0625 is not below 0.05
    notes = "\n".join(lines[14:])
    assert "McNemar" in notes and "±14.5 points" in notes and "noise" in notes

    # Columns line up in terminal cells (CJK headers count two cells each).
    def cell_start(line: str, text: str) -> int:
        return compare.display_width(line[: line.index(text)])

    assert cell_start(header, "平均延迟(s)") == cell_start(max_head, "0.180000") == cell_start(baseline, "0.260000")
    assert cell_start(header, "样本数") == cell_start(max_head, "10 ") == cell_start(rank144, "10 ")


def test_markdown_csv_and_json_formats(capsys):
    code, out, _ = run_cli(capsys, "--results-dir", FIXTURES, "--format", "markdown")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("| Strategy | Accuracy (Δ) |") and lines[1].startswith("|---|---:|")
    assert [line.split(" | ")[0] for line in lines[2:9]] == [f"| {e[0]}" for e in EXPECTED]
    assert lines[9] == "" and lines[10].startswith("- Δ: accuracy minus")

    code, out, _ = run_cli(capsys, "--results-dir", FIXTURES, "--format", "csv")
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["strategy"] for r in table] == [e[0] for e in EXPECTED]
    assert table[0]["p_value"] == "" and table[0]["baseline"] == "True"
    assert float(table[2]["p_value"]) == pytest.approx(0.625) and float(table[2]["flops_ratio"]) == 0.6017
    assert json.loads(table[4]["parameters"])["weighted_alpha"] == 0.3 and table[4]["method"] == "fastv"
    assert json.loads(table[1]["parameters"])["attention_rank"] == 144 and json.loads(table[1]["parameters"])["agg_layer"] == 2

    code, out, _ = run_cli(capsys, "--results-dir", FIXTURES, "--format", "json")
    assert code == 0 and len(json.loads(out)["rows"]) == 7


def test_mixed_question_sets_and_models_are_refused_unless_allowed(results, capsys):
    path = results / "scienceqa_results_fastv_max_head.json"
    data = json.loads(path.read_text())
    data["question_file"]["sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    code, out, err = run_cli(capsys, "--results-dir", results)
    assert code == 2 and out == ""
    assert "refusing to compare runs on different question sets" in err
    assert "scienceqa_results_fastv_max_head.json" in err and "--allow-mixed" in err

    code, out, err = run_cli(capsys, "--results-dir", results, "--allow-mixed", "--format", "json")
    assert code == 0 and "different question sets" in err
    row = next(r for r in json.loads(out)["rows"] if r["strategy"] == "FastV - max_head")
    assert row["delta"] is None and row["p_value"] is None  # other questions: nothing to pair

    data["question_file"]["sha256"] = json.loads((results / "scienceqa_results_baseline.json").read_text())[
        "question_file"]["sha256"]
    data["model_config"]["model_path"] = "/models/llava-1.5-13b-hf"
    path.write_text(json.dumps(data))
    code, _, err = run_cli(capsys, "--results-dir", results)
    assert code == 2 and "different models" in err and "llava-1.5-13b-hf" in err


def test_missing_baseline_shows_na_with_a_note(results, capsys):
    for suffix in (".json", ".jsonl"):
        (results / f"scienceqa_results_baseline{suffix}").unlink()
    code, out, _ = run_cli(capsys, "--results-dir", results)
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("FastV - ")]
    assert len(rows) == 6
    assert all("(n/a)" in r and r.count("n/a") >= 4 for r in rows)
    assert "no baseline result (scienceqa_results_baseline.json)" in out
    code, out, _ = run_cli(capsys, "--results-dir", results, "--format", "json")
    report = json.loads(out)
    assert report["baseline"] is None and all(r["prefill_speedup"] is None for r in report["rows"])


def test_unreadable_partial_and_foreign_files_are_skipped_with_a_warning(results, capsys):
    (results / "scienceqa_results_torn.json").write_text('{"accuracy": 0.5, "total_')
    partial = json.loads((results / "scienceqa_results_fastv_max_head.json").read_text())
    partial.update(complete=False, total_samples=4)
    (results / "scienceqa_results_fastv_random.json").write_text(json.dumps(partial))
    (results / "scienceqa_results_notes.json").write_text('{"comment": "mine"}')
    (results / "scienceqa_results_fastv_avg_all_heads.jsonl").unlink()
    code, out, err = run_cli(capsys, "--results-dir", results, "--format", "json")
    assert code == 0
    assert "skipping" in err and "scienceqa_results_torn.json: it is not valid JSON" in err
    assert "scienceqa_results_fastv_random.json: it is partial (4 samples, complete: false)" in err
    assert "scienceqa_results_notes.json: it is not a fastv_advanced result file" in err
    assert "scienceqa_results_fastv_avg_all_heads.jsonl cannot be read" in err
    rows = json.loads(out)["rows"]
    assert len(rows) == 7
    avg = next(r for r in rows if r["strategy"] == "FastV - avg_all_heads")
    assert avg["delta"] == 0.0 and avg["p_value"] is None  # accuracy still compared, significance n/a


def test_nothing_to_compare_exits_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--results-dir", tmp_path)
    assert code == 2 and "no result files (scienceqa_results_*.json)" in err


def test_pareto_front():
    points = [(100, 70), (60, 50), (60, 70), (45, 0), (60, 100), (80, 90)]
    assert pareto_front(points) == [3, 4]
    assert pareto_front([(1, 1), (2, 2), (3, 1.5), (4, 3)]) == [0, 1, 3]


def test_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    target = tmp_path / "plots" / "results.png"
    code, _, err = run_cli(capsys, "--results-dir", FIXTURES, "--plot", target)
    assert code == 0 and f"plot written to {target}" in err
    assert target.stat().st_size > 20_000
    with Image.open(target) as image:
        assert image.format == "PNG" and image.width >= 1500 and image.height >= 700
        # Two panels of drawn content: the picture is far from a blank canvas.
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200


def imported_modules(module: str) -> set[str]:
    """The package modules `fastv_advanced.<module>` imports (`from .x import`, `from . import x`, absolute)."""
    import ast

    import fastv_advanced

    source = (Path(fastv_advanced.__file__).parent / f"{module}.py").read_text(encoding="utf-8")
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = (node.module or "").removeprefix("fastv_advanced.").lstrip(".")
            found |= {base} if base else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("fastv_advanced.") for alias in node.names}
    return found


def test_compare_and_plotting_do_not_import_each_other():
    assert "plotting" not in imported_modules("compare")
    assert "compare" not in imported_modules("plotting")
    assert "comparison_rows" in imported_modules("compare") & imported_modules("plotting")


def has_cjk(text: str) -> bool:
    return any(compare.display_width(ch) == 2 for ch in text)


def test_notes_name_the_columns_as_the_chosen_format_heads_them(capsys):
    _, markdown, _ = run_cli(capsys, "--results-dir", FIXTURES, "--format", "markdown")
    header, notes = markdown.splitlines()[0], markdown.split("\n\n", 1)[1]
    assert not has_cjk(header) and not has_cjk(notes)
    for english in ("Prefill speed-up", "FLOPs ratio", "Image tokens kept", "McNemar p", "Δ 95% CI"):
        assert f"| {english} |" in header and f"{english}:" in notes
    _, table, _ = run_cli(capsys, "--results-dir", FIXTURES)
    for chinese in ("预填充加速", "FLOPs比例", "图像token"):
        assert chinese in table.splitlines()[4] and f"{chinese} (" in " ".join(table.split("\n")[14:])


def test_help_names_the_command_it_was_called_by_and_shows_plain_percent(capsys):
    import subprocess
    import sys

    with pytest.raises(SystemExit):
        compare_cli.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: fastv-compare ") and "95% interval" in out and "%%" not in out
    guide_script = Path(__file__).resolve().parents[1] / "src" / "HiMAP" / "inference" / "compare_fastv_results.py"
    out = subprocess.run([sys.executable, str(guide_script), "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("usage: compare_fastv_results.py ") and "%%" not in out


def test_a_missing_or_file_results_dir_is_named_as_such(tmp_path, capsys):
    code, out, err = run_cli(capsys, "--results-dir", tmp_path / "nonexistent")
    assert code == 2 and out == "" and "the folder does not exist" in err and "no result files" not in err
    (tmp_path / "file.json").write_text("{}")
    code, _, err = run_cli(capsys, "--results-dir", tmp_path / "file.json")
    assert code == 2 and "is a file, not a folder" in err


def test_output_closed_by_its_reader_ends_quietly():
    """`fastv-compare --format json | head`: the reader is gone before anything is written."""
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "fastv_advanced.cli.compare", "--results-dir", str(FIXTURES), "--format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait() == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def edit_result(folder: Path, name: str, edit) -> None:
    path = folder / f"scienceqa_results_{name}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_trustworthy_timings_get_no_warning(capsys):
    _, out, _ = run_cli(capsys, "--results-dir", FIXTURES, "--format", "json")
    assert json.loads(out)["timing"] == {"speedup_from": "median prefill time (time to first token, warm-up excluded)",
                                         "trustworthy": True, "problems": []}
    _, out, _ = run_cli(capsys, "--results-dir", FIXTURES)
    assert "Timings not trustworthy" not in out


def test_untrustworthy_timings_are_named_next_to_the_table_and_the_speedup_uses_medians(results, capsys):
    edit_result(results, "fastv_max_head", lambda d: d["latency"].update(prefill_mean=0.5))  # median 0.125
    edit_result(results, "fastv_avg_all_heads", lambda d: d.setdefault("environment", {}).update(busy_cores=1.0))
    jsonl = results / "scienceqa_results_fastv_max_head_rank144_k2.jsonl"
    lines = jsonl.read_text().splitlines()
    spread = [lines[0]] + [json.dumps({**json.loads(line), "prefill_s": 0.05 * (i + 1)})
                           for i, line in enumerate(lines[1:])]
    jsonl.write_text("\n".join(spread) + "\n")  # 0.05 .. 0.5 s: interquartile range 0.275 s, median 0.275 s

    _, out, _ = run_cli(capsys, "--results-dir", results, "--format", "json")
    report = json.loads(out)
    rows = {r["strategy"]: r for r in report["rows"]}
    assert rows["FastV - max_head"]["prefill_speedup"] == pytest.approx(0.200 / 0.125)
    assert rows["FastV - max_head"]["prefill_speedup_mean"] == pytest.approx(0.200 / 0.5)
    assert rows["FastV - max_head (R=144, K=2)"]["prefill_spread"] == pytest.approx(1.0)
    timing = report["timing"]
    assert not timing["trustworthy"] and len(timing["problems"]) == 3
    assert "FastV - max_head (4.00×)" in timing["problems"][0]
    assert "FastV - max_head (R=144, K=2) (100%)" in timing["problems"][1]
    assert "busy" in timing["problems"][2] and "FastV - avg_all_heads (1.0)" in timing["problems"][2]

    _, out, _ = run_cli(capsys, "--results-dir", results)
    lines = out.splitlines()
    assert set(lines[13]) == {"-"} and lines[14].startswith("Timings not trustworthy: mean prefill far from")
    assert "1.60x" in next(line for line in lines if line.startswith("FastV - max_head  "))


def test_a_tiny_model_s_timings_are_flagged(results, capsys):
    edit_result(results, "baseline", lambda d: d["latency"].update(prefill_median=0.02, prefill_mean=0.02))
    _, out, _ = run_cli(capsys, "--results-dir", results, "--format", "markdown")
    note = next(line for line in out.splitlines() if line.startswith("- Timings not trustworthy"))
    assert "Baseline's median prefill is 20 ms, below 50 ms" in note and "Prefill speed-up compares median" in note


def test_results_of_the_embedded_model_say_what_its_numbers_mean(results, capsys):
    _, out, _ = run_cli(capsys, "--results-dir", FIXTURES)
    assert "Embedded toy model" not in out
    for name in ("baseline", "fastv_max_head"):  # from another checkout: recognised by the folder names
        edit_result(results, name, lambda d: d["model_config"].update(
            model_path="/elsewhere/checkout/models/tiny-llava-scienceqa"))
    _, out, _ = run_cli(capsys, "--results-dir", results, "--allow-mixed")
    lines = out.splitlines()
    assert set(lines[13]) == {"-"} and lines[14].startswith("Embedded toy model (models/tiny-llava-scienceqa): ")
    assert "reads the picture only in layers 2-3" in " ".join(lines) and "not LLaVA (docs/embedded_demo.md)" in " ".join(lines)
    _, out, _ = run_cli(capsys, "--results-dir", results, "--allow-mixed", "--format", "json")
    report = json.loads(out)
    assert report["embedded_model"] and report["notes"][0] == compare.EMBEDDED_NOTE


def test_narrow_width_splits_the_columns_into_blocks_and_loses_nothing(capsys):
    _, full, _ = run_cli(capsys, "--results-dir", FIXTURES)
    _, narrow, _ = run_cli(capsys, "--results-dir", FIXTURES, "--width", "80")
    lines = narrow.splitlines()
    assert max(compare.display_width(line) for line in lines) <= 80 < max(map(compare.display_width, full.splitlines()))
    headers = [line for line in lines if line.startswith("策略")]
    assert len(headers) >= 2
    for _, chinese, _ in compare.COLUMNS:  # every column, the guide's and the others, in some block
        assert sum(chinese in header for header in headers) == (len(headers) if chinese == "策略" else 1)
    rows = json.loads(run_cli(capsys, "--results-dir", FIXTURES, "--format", "json")[1])["rows"]
    for row in rows:  # each value of each row appears on a line that starts with the row's short label
        label = "Baseline" if row["baseline"] else row["strategy"].removeprefix("FastV - ").replace(" (", " ") \
            .replace(", ", " ").rstrip(")")
        shown = " ".join(line for line in lines if line.startswith(label + "  "))
        assert f"{row['accuracy']:.4f}" in shown and f"{row['avg_latency_s']:.6f}" in shown
        assert f"{100 * row['flops_ratio']:.2f}%" in shown and f" {row['samples']} " in shown
        assert row["baseline"] or f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]" in shown


def test_the_table_fits_a_terminal_and_stays_whole_in_a_pipe(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    _, piped, _ = run_cli(capsys, "--results-dir", FIXTURES)
    assert piped == run_cli(capsys, "--results-dir", FIXTURES, "--width", "0")[1]
    assert len([line for line in piped.splitlines() if line.startswith("策略")]) == 1
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    _, terminal, _ = run_cli(capsys, "--results-dir", FIXTURES)
    assert terminal != piped and terminal == run_cli(capsys, "--results-dir", FIXTURES, "--width", "80")[1]


def test_configurations_of_the_same_flops_far_apart_in_time_are_flagged(results, capsys):
    edit_result(results, "fastv_weighted_combination_alpha0.5", lambda d: d["latency"].update(
        prefill_median=0.2, prefill_mean=0.2))  # the others of FLOPs 0.6017 take 0.125-0.130 s
    _, out, _ = run_cli(capsys, "--results-dir", results, "--format", "json")
    assert json.loads(out)["timing"]["problems"] == [
        "configurations of the same FLOPs far apart in median prefill, so the machine's speed changed between them: "
        "FastV - weighted α=0.5 vs FastV - max_head (1.60×)"]
