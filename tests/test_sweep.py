"""fastv-sweep and the guide's suite script: one model load, the same files as single runs, resume, refusals.

All on tiny offline LLaVAs (conftest.py); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from fastv_advanced import model_loading, run_loop
from fastv_advanced.run_config import RunConfig, result_file_name
from fastv_advanced.cli import eval_scivqa
from fastv_advanced.cli import sweep as sweep_cli
from fastv_advanced.sweep import SweepGrid, expand_grid
from test_eval_scivqa import read_jsonl, subprocess_env

SUITE = REPO_ROOT / "src" / "HiMAP" / "inference" / "eval_scivqa_fastv_advanced.sh"
COMPARE = REPO_ROOT / "src" / "HiMAP" / "inference" / "compare_fastv_results.py"
GUIDE_FILES = [
    "scienceqa_results_baseline.json",
    "scienceqa_results_fastv_max_head.json",
    "scienceqa_results_fastv_avg_all_heads.json",
    "scienceqa_results_fastv_weighted_combination_alpha0.3.json",
    "scienceqa_results_fastv_weighted_combination_alpha0.5.json",
    "scienceqa_results_fastv_weighted_combination_alpha0.7.json",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def guide_model_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA with LLaVA-1.5's image geometry (336 px, patch 14 -> 576 image tokens): rank 288 is valid."""
    from fastv_advanced.tiny import save_tiny_llava

    path = tmp_path_factory.mktemp("models") / "tiny-llava-576"
    save_tiny_llava(path, seed=0, image_size=336, patch_size=14)
    return path


def data_args(model_dir, question_set, out, *extra) -> list[str]:
    question_file, images = question_set
    return ["--model-path", str(model_dir), "--question-file", str(question_file), "--image-folder", str(images),
            "--single-pred-prompt", "--output-dir", str(out), "--max-new-tokens", "3", "--no-progress",
            *map(str, extra)]


def sweep(*args) -> int:
    return sweep_cli.main([str(a) for a in args])


# -- the grid -------------------------------------------------------------------------------------------------------


def test_grid_order_alphas_only_for_weighted_combination_and_no_duplicates():
    template = RunConfig(single_pred_prompt=True, seed=3)
    grid = SweepGrid(methods=("weighted_combination", "max_head", "max_head"), alphas=(0.7, 0.3),
                     ranks=(144, 288, 288), agg_layers=(2, 1))
    configs = expand_grid(grid, template, sys_length=35, image_token_length=576)
    assert [result_file_name(c) for c in configs] == [
        "scienceqa_results_baseline.json",
        "scienceqa_results_fastv_weighted_combination_alpha0.7_rank144_k2.json",
        "scienceqa_results_fastv_weighted_combination_alpha0.7_rank144_k1.json",
        "scienceqa_results_fastv_weighted_combination_alpha0.7.json",
        "scienceqa_results_fastv_weighted_combination_alpha0.7_rank288_k1.json",
        "scienceqa_results_fastv_weighted_combination_alpha0.3_rank144_k2.json",
        "scienceqa_results_fastv_weighted_combination_alpha0.3_rank144_k1.json",
        "scienceqa_results_fastv_weighted_combination_alpha0.3.json",
        "scienceqa_results_fastv_weighted_combination_alpha0.3_rank288_k1.json",
        "scienceqa_results_fastv_max_head_rank144_k2.json",
        "scienceqa_results_fastv_max_head_rank144_k1.json",
        "scienceqa_results_fastv_max_head.json",
        "scienceqa_results_fastv_max_head_rank288_k1.json",
    ]
    max_head = configs[-2]
    # What a single run with the guide's flags builds: alpha at its default 0.5, the span flags and the seed kept.
    assert max_head.method.weighted_alpha == 0.5 and max_head.method.seed == 3
    assert (max_head.method.sys_length, max_head.method.image_token_length) == (35, 576)
    assert all(c.single_pred_prompt for c in configs)
    assert expand_grid(SweepGrid(methods=(), baseline=True), template)[0].method is None


# -- the guide's suite script ---------------------------------------------------------------------------------------


def test_suite_script_end_to_end_then_the_guide_compare_command(guide_model_dir, question_set, tmp_path):
    """`bash .../eval_scivqa_fastv_advanced.sh` with the settings in the environment and the results in the
    current directory (the guide's default), then `python .../compare_fastv_results.py` in the same directory."""
    question_file, images = question_set
    work = tmp_path / "work"
    work.mkdir()
    env = subprocess_env(MODEL_PATH=str(guide_model_dir), QUESTION_FILE=str(question_file),
                         IMAGE_FOLDER=str(images), NUM_SAMPLES="3", PYTHON=sys.executable)
    env.pop("GPU", None)
    done = subprocess.run(["bash", str(SUITE), "--max-new-tokens", "3", "--no-progress"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stems = [name[: -len(".json")] for name in GUIDE_FILES]
    expected = [f"{s}.json" for s in stems] + [f"{s}.jsonl" for s in stems]
    assert sorted(p.name for p in work.iterdir()) == sorted(expected)
    assert done.stdout.count("loading ") == 1  # one model load for the six configurations
    assert "6 computed of 6 configurations" in done.stdout
    assert "FastV Advanced 结果比较" in done.stdout  # the suite ends with the comparison
    for name in GUIDE_FILES:
        result = json.loads((work / name).read_text())
        assert result["total_samples"] == 3 and result["complete"] and result["model_config"]["max_new_tokens"] == 3
        if name != "scienceqa_results_baseline.json":
            config = result["model_config"]
            assert (config["fast_v_attention_rank"], config["fast_v_agg_layer"]) == (288, 2)
            assert (config["fast_v_sys_length"], config["fast_v_image_token_length"]) == (35, 576)
            assert result["tokens"]["avg_kept_image_tokens"] == 288
    alpha = json.loads((work / GUIDE_FILES[3]).read_text())["model_config"]
    assert alpha["fast_v_token_selection_method"] == "weighted_combination" and alpha["fast_v_weighted_alpha"] == 0.3

    compared = subprocess.run([sys.executable, str(COMPARE)], cwd=work, env=subprocess_env(), capture_output=True,
                              text=True, timeout=120)
    assert compared.returncode == 0, compared.stderr
    rows = [line.split("  ")[0] for line in compared.stdout.splitlines()
            if line.startswith(("Baseline", "FastV - ")) and "/576" in line]  # table rows, not wrapped notes
    assert rows == ["Baseline", "FastV - max_head", "FastV - avg_all_heads", "FastV - weighted α=0.3",
                    "FastV - weighted α=0.5", "FastV - weighted α=0.7"]

    # A re-run recomputes nothing and does not even load the model.
    before = {name: (work / name).read_text() for name in GUIDE_FILES}
    again = subprocess.run(["bash", str(SUITE), "--max-new-tokens", "3", "--no-progress", "--no-compare"], cwd=work,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 skipped of 6 configurations" in again.stdout and "model not loaded" in again.stdout
    assert "loading " not in again.stdout and "结果比较" not in again.stdout
    assert {name: (work / name).read_text() for name in GUIDE_FILES} == before


def test_suite_script_stops_at_the_failing_step_and_names_it(tmp_path):
    env = subprocess_env(MODEL_PATH=str(tmp_path / "no-model"), QUESTION_FILE=str(tmp_path / "none.json"),
                         PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SUITE), "--output-dir", str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "none.json does not exist" in done.stderr
    assert "FAILED at step 'sweep (6 configurations, one model load)'" in done.stderr
    assert "step 2/2" not in done.stdout  # stopped: the comparison did not run


def test_suite_script_help_and_gpu_setting(tmp_path):
    done = subprocess.run(["bash", str(SUITE), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "MODEL_PATH" in done.stdout and "set -euo" not in done.stdout
    assert os.access(SUITE, os.X_OK)
    env = subprocess_env(GPU="", PYTHON=sys.executable, QUESTION_FILE=str(tmp_path / "none.json"))
    done = subprocess.run(["bash", str(SUITE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "CUDA_VISIBLE_DEVICES= (GPU given)" in done.stdout


# -- sweeps in process ----------------------------------------------------------------------------------------------

GRID = ["--methods", "max_head", "avg_all_heads", "--ranks", "16", "--agg-layers", "2"]


def test_interrupted_sweep_resumes_without_duplicates_and_skips_finished(tiny_model_dir, question_set, tmp_path,
                                                                          monkeypatch, capsys):
    out = tmp_path / "out"
    args = data_args(tiny_model_dir, question_set, out, *GRID)
    calls = []
    run_sample = run_loop.run_sample

    def interrupted(ctx, question, warmup):
        calls.append(question.id)
        if len(calls) == 9:  # baseline (6 samples) done, the third sample of max_head in flight
            raise KeyboardInterrupt
        return run_sample(ctx, question, warmup)

    monkeypatch.setattr(run_loop, "run_sample", interrupted)
    assert sweep(*args) == 130
    printed = capsys.readouterr()
    assert "interrupted: finished configurations and samples are saved" in printed.err
    assert "interrupted FastV max_head (R=16, K=2)" in printed.out.replace("  ", " ").replace("  ", " ")
    assert (out / "scienceqa_results_baseline.json").exists()
    assert not (out / "scienceqa_results_fastv_max_head_rank16_k2.json").exists()
    _, partial = read_jsonl(out / "scienceqa_results_fastv_max_head_rank16_k2.jsonl")
    assert [r["id"] for r in partial] == ["10", "11"]

    calls.clear()

    def counted(ctx, question, warmup):
        calls.append(question.id)
        return run_sample(ctx, question, warmup)

    monkeypatch.setattr(run_loop, "run_sample", counted)
    assert sweep(*args) == 0
    printed = capsys.readouterr().out
    assert "[1/3] baseline: already finished (6 samples, accuracy" in printed and "skipped" in printed
    assert "[2/3] FastV max_head (R=16, K=2): computing (resuming, 2 of 6 samples already done)" in printed
    assert "2 computed, 1 skipped of 3 configurations" in printed
    assert calls == ["12", "13", "14", "99"] + ["10", "11", "12", "13", "14", "99"]  # nothing done twice
    for stem in ("baseline", "fastv_max_head_rank16_k2", "fastv_avg_all_heads_rank16_k2"):
        _, records = read_jsonl(out / f"scienceqa_results_{stem}.jsonl")
        assert [r["id"] for r in records] == ["10", "11", "12", "13", "14", "99"]
        result = json.loads((out / f"scienceqa_results_{stem}.json").read_text())
        assert result["total_samples"] == 6 and result["complete"]

    # Everything finished: the model is not loaded at all.
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert sweep(*args) == 0
    assert "3 skipped of 3 configurations" in capsys.readouterr().out


def test_errors_that_a_rerun_cannot_fix_do_not_reload_the_model(tiny_model_dir, question_set, tmp_path,
                                                                monkeypatch, capsys):
    """A missing image is recorded as an error (as in single runs); while it is still missing a re-run skips the
    configuration instead of loading the model to fail again; once the image is back, only that sample runs."""
    out = tmp_path / "out"
    image = question_set[1] / "12" / "image.png"
    saved = image.read_bytes()
    image.unlink()
    args = data_args(tiny_model_dir, question_set, out, "--methods")  # baseline only
    assert sweep(*args) == 0
    assert json.loads((out / "scienceqa_results_baseline.json").read_text())["errors"] == 1
    capsys.readouterr()
    load_model = model_loading.load_model
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert sweep(*args) == 0
    assert "already finished (6 samples, 1 recorded errors that cannot be fixed" in capsys.readouterr().out
    image.write_bytes(saved)
    monkeypatch.setattr(model_loading, "load_model", load_model)
    assert sweep(*args) == 0
    assert "computing (resuming, 5 of 6 samples already done)" in capsys.readouterr().out
    assert json.loads((out / "scienceqa_results_baseline.json").read_text())["errors"] == 0


def test_embedded_setting_applies_to_the_sweep(tiny_model_dir, question_set, tmp_path, monkeypatch, capsys,
                                               no_model_load):
    from fastv_advanced import embedded

    monkeypatch.setattr(embedded, "MODEL_PATH", tiny_model_dir)
    monkeypatch.setattr(embedded, "QUESTION_FILE", question_set[0])
    monkeypatch.setattr(embedded, "IMAGE_FOLDER", question_set[1])
    monkeypatch.setenv("FASTV_EMBEDDED", "1")
    assert sweep("--model-path", "liuhaotian/llava-v1.5-7b", "--question-file", "/nowhere/q.json", "--ranks", "16",
                 "--output-dir", tmp_path / "out", "--dry-run") == 0
    printed = capsys.readouterr().out
    assert printed.startswith("FASTV_EMBEDDED=1: using the embedded tiny model")
    assert "4 decoder layers, 64 image tokens" in printed and "4 configurations" in printed


def normalised_result(path: Path) -> dict:
    """A result file without what legitimately differs between two runs: timings, timestamps, the command."""
    result = json.loads(path.read_text())
    for key in ("avg_latency", "wall_time_s", "finished", "command", "peak_gpu_memory_bytes"):
        result.pop(key, None)
    for key in ("prefill_mean", "prefill_median", "generate_mean", "generate_median"):
        result["latency"].pop(key)
    for key in ("questions_per_s", "prefill_tokens_per_s"):
        result["throughput"].pop(key)
    result["environment"].pop("busy_cores")  # the machine's load when each run started
    return result


def normalised_samples(path: Path) -> tuple[dict, list[dict]]:
    header, records = read_jsonl(path)
    for key in ("created", "command"):
        header.pop(key)
    header["environment"].pop("busy_cores")
    for record in records:
        for key in ("prefill_s", "generate_s", "peak_memory_bytes"):
            record.pop(key)
    return header, records


def test_sweep_files_equal_single_run_files(tiny_model_dir, question_set, tmp_path, capsys):
    """Same names, same content (timings aside), as the single eval_scivqa.py runs with the same flags, also for
    configurations evaluated after others on the same model (the pruning hooks are removed in between)."""
    single, swept = tmp_path / "single", tmp_path / "sweep"
    common = ["--fast-v-sys-length", "35", "--seed", "7"]
    assert eval_scivqa.main(data_args(tiny_model_dir, question_set, single, *common)) == 0
    for method, extra in (("weighted_combination", ["--fast-v-weighted-alpha", "0.3"]), ("random", []),
                          ("max_head", [])):
        assert eval_scivqa.main(data_args(tiny_model_dir, question_set, single, *common, "--use-fast-v",
                                          "--fast-v-attention-rank", "16", "--fast-v-agg-layer", "2",
                                          "--fast-v-token-selection-method", method, *extra)) == 0
    capsys.readouterr()
    assert sweep(*data_args(tiny_model_dir, question_set, swept, *common, "--methods", "max_head",
                            "weighted_combination", "random", "--alphas", "0.3", "--ranks", "16")) == 0
    # The guide-span mismatch is the same for every configuration: one notice line for the whole sweep.
    err = capsys.readouterr().err
    assert err.count("notice: FastV: sys_length=35 but the image starts at") == 1 and "UserWarning" not in err
    names = sorted(p.name for p in single.iterdir())
    assert names == sorted(p.name for p in swept.iterdir()) and len(names) == 8
    for name in names:
        if name.endswith(".json"):
            assert normalised_result(swept / name) == normalised_result(single / name), name
        else:
            assert normalised_samples(swept / name) == normalised_samples(single / name), name
    # A single run resumes the sweep's files (same fingerprint): nothing is left to do.
    assert eval_scivqa.main(data_args(tiny_model_dir, question_set, swept, *common, "--use-fast-v",
                                      "--fast-v-attention-rank", "16", "--fast-v-agg-layer", "2",
                                      "--fast-v-token-selection-method", "random")) == 0
    assert "6 of 6 samples already done" in capsys.readouterr().out


@pytest.fixture()
def no_model_load(monkeypatch):
    monkeypatch.setattr(model_loading, "load_model",
                        lambda *a, **k: pytest.fail("the model was loaded before the error"))


@pytest.mark.parametrize(
    "grid,message",
    [
        (["--ranks", "16", "65"], "--ranks 65 is larger than the 64 image tokens"),
        (["--ranks", "16", "--agg-layers", "2", "4"], r"--agg-layers 4 is outside the allowed range \[1, 3\]"),
        (["--ranks", "16", "--methods", "weighted_combination", "--alphas", "0.5", "1.5"],
         r"--alphas 1.5 is outside the allowed range \[0, 1\]"),
        (["--ranks", "16", "--methods", "maxhead"], "--methods 'maxhead' is not a registered strategy"),
        (["--ranks", "16", "--agg-layers", "0"], "--agg-layers 0"),
        (["--no-baseline", "--methods"], "nothing to evaluate"),
    ],
)
def test_bad_grid_values_fail_before_the_model_loads(tiny_model_dir, question_set, tmp_path, capsys, no_model_load,
                                                     grid, message):
    assert sweep(*data_args(tiny_model_dir, question_set, tmp_path / "out", *grid)) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_a_file_stops_the_sweep_before_the_model_loads(tiny_model_dir, question_set,
                                                                                 tmp_path, capsys, no_model_load):
    out = tmp_path / "results"
    out.write_text("my notes")
    assert sweep(*data_args(tiny_model_dir, question_set, out, *GRID)) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --output-dir {out} is a file, not a folder"]
    assert out.read_text() == "my notes"


def test_files_of_another_configuration_stop_the_sweep_before_anything_runs(tiny_model_dir, question_set,
                                                                            tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scienceqa_results_fastv_avg_all_heads_rank16_k2.json").write_text("my notes")
    assert sweep(*data_args(tiny_model_dir, question_set, out, *GRID)) == 1
    err = capsys.readouterr().err
    assert "1 of 3 configurations have files of another configuration in the way (nothing was evaluated)" in err
    assert "FastV avg_all_heads (R=16, K=2)" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["scienceqa_results_fastv_avg_all_heads_rank16_k2.json"]


def test_dry_run_lists_the_plan(tiny_model_dir, question_set, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    assert sweep(*data_args(tiny_model_dir, question_set, out, *GRID, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "Dry run: nothing is evaluated." in printed and "3 configurations, one model load" in printed
    assert "1. baseline" in printed and "compute" in printed
    assert "scienceqa_results_fastv_avg_all_heads_rank16_k2.json" in printed
    assert sorted(out.iterdir()) == []
