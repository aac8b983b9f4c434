"""eval_scivqa: the guide's command end to end, result files, FLOPs, resume, bad input, chunks, accelerate.

All on tiny offline LLaVAs (conftest.py); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY_IMAGE_TOKENS, draw_image, llava_entry, write_question_set
from fastv_advanced import FastVConfig
from fastv_advanced import model_loading
from fastv_advanced.metrics import format_failures
from fastv_advanced.run_config import FieldError, RunConfig, build_checked, result_file_name, samples_file_name
from fastv_advanced.run_files import SampleJournal
from fastv_advanced.cli import eval_scivqa, merge_chunks
from fastv_advanced.cli.common import flag_error
from fastv_advanced.flops import DecoderShape, prefill_flops
from fastv_advanced.scienceqa import file_sha256

WRAPPER = REPO_ROOT / "src" / "HiMAP" / "inference" / "eval_scivqa.py"
GUIDE_KEYS = {"accuracy", "avg_latency", "total_samples", "correct_samples", "flops_info", "model_config"}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process runs use one thread: the tiny model gains nothing from more, and on a shared 2-core machine
    OpenMP threads spinning against other jobs make each step up to 100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hand_layer_flops(n: int, d: int = 64, m: int = 128, q: int = 64, kv: int = 32) -> int:
    """One tiny-model decoder layer by hand: q/o (d x q), k/v (d x kv) projections, QK^T and AV, SwiGLU FFN."""
    return 2 * (n * d * q * 2 + n * d * kv * 2 + 2 * n * n * q + 3 * n * d * m)


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env.pop(eval_scivqa.ENV_VAR, None)
    env.update(extra)
    return env


def read_jsonl(path: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines[0], lines[1:]


def cli(*args: str) -> int:
    return eval_scivqa.main([str(a) for a in args])


def base_args(model_dir, question_set, out, *extra) -> list[str]:
    question_file, images = question_set
    return ["--model-path", model_dir, "--question-file", question_file, "--image-folder", images,
            "--single-pred-prompt", "--output-dir", out, "--max-new-tokens", "3", "--no-progress", *extra]


FASTV_ARGS = ["--use-fast-v", "--fast-v-attention-rank", "16", "--fast-v-agg-layer", "2",
              "--fast-v-token-selection-method", "avg_all_heads"]


# -- file names -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fastv,name",
    [
        (None, "scienceqa_results_baseline.json"),
        (dict(token_selection_method="max_head"), "scienceqa_results_fastv_max_head.json"),
        (dict(token_selection_method="avg_all_heads"), "scienceqa_results_fastv_avg_all_heads.json"),
        (dict(token_selection_method="weighted_combination", weighted_alpha=0.3),
         "scienceqa_results_fastv_weighted_combination_alpha0.3.json"),
        (dict(token_selection_method="weighted_combination", weighted_alpha=0.7),
         "scienceqa_results_fastv_weighted_combination_alpha0.7.json"),
        (dict(token_selection_method="weighted_combination", weighted_alpha=1.0),
         "scienceqa_results_fastv_weighted_combination_alpha1.0.json"),
        (dict(token_selection_method="random"), "scienceqa_results_fastv_random.json"),
        (dict(token_selection_method="max_head", attention_rank=144),
         "scienceqa_results_fastv_max_head_rank144_k2.json"),
        (dict(token_selection_method="avg_all_heads", agg_layer=4),
         "scienceqa_results_fastv_avg_all_heads_rank288_k4.json"),
        (dict(token_selection_method="weighted_combination", weighted_alpha=0.5, attention_rank=432, agg_layer=1),
         "scienceqa_results_fastv_weighted_combination_alpha0.5_rank432_k1.json"),
        (dict(token_selection_method="slow_strategy:slow_avg_all_heads"),
         "scienceqa_results_fastv_slow_strategy-slow_avg_all_heads.json"),
    ],
)
def test_result_file_names_follow_the_guide(fastv, name):
    if fastv is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        fastv = FastVConfig(**{"agg_layer": 2, "attention_rank": 288, **fastv})
    run_config = RunConfig(method=fastv)
    assert result_file_name(run_config) == name
    assert samples_file_name(run_config) == name[: -len(".json")] + ".jsonl"
    assert samples_file_name(run_config, 4, 1) == name[: -len(".json")] + ".chunk1of4.jsonl"


# -- the guide's command --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guide_model_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA with LLaVA-1.5's image geometry (336 px, patch 14 -> 576 image tokens), for the guide's flags."""
    from fastv_advanced.tiny import save_tiny_llava

    path = tmp_path_factory.mktemp("models") / "tiny-llava-576"
    save_tiny_llava(path, seed=0, image_size=336, patch_size=14)
    return path


def test_guide_command_end_to_end(guide_model_dir, question_set, tmp_path):
    """`python ./src/HiMAP/inference/eval_scivqa.py` with the guide's flags, from the repository root."""
    question_file, images = question_set
    out = tmp_path / "out"
    command = [
        sys.executable, "./src/HiMAP/inference/eval_scivqa.py",
        "--model-path", str(guide_model_dir),
        "--question-file", str(question_file),
        "--image-folder", str(images),
        "--single-pred-prompt",
        "--use-fast-v",
        "--fast-v-sys-length", "35",
        "--fast-v-image-token-length", "576",
        "--fast-v-attention-rank", "288",
        "--fast-v-agg-layer", "2",
        "--fast-v-token-selection-method", "max_head",
        "--num-samples", "100",
        "--output-dir", str(out),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "scienceqa_results_fastv_max_head.json", "scienceqa_results_fastv_max_head.jsonl"
    ]
    result = json.loads((out / "scienceqa_results_fastv_max_head.json").read_text())
    assert GUIDE_KEYS <= set(result)
    assert result["total_samples"] == 6 and result["errors"] == 0 and result["complete"]
    assert result["accuracy"] == result["correct_samples"] / 6
    assert result["model_config"]["fast_v_token_selection_method"] == "max_head"
    assert result["model_config"]["fast_v_attention_rank"] == 288
    assert result["question_file"]["sha256"] == file_sha256(question_file)
    assert result["environment"]["torch"] and result["command"].startswith("./src/HiMAP/inference/eval_scivqa.py")
    assert result["latency"]["warmup_samples_excluded"] == 1 and result["latency"]["timed_samples"] == 5
    assert result["tokens"]["avg_image_tokens"] == 576 and result["tokens"]["avg_kept_image_tokens"] == 288

    header, records = read_jsonl(out / "scienceqa_results_fastv_max_head.jsonl")
    assert header["type"] == "header" and header["fingerprint"] == result["fingerprint"]
    assert [r["id"] for r in records] == ["10", "11", "12", "13", "14", "99"]
    for record in records[:5]:
        assert record["num_image_tokens"] == 576 and record["num_kept_image_tokens"] == 288 and record["pruned"]
        assert record["head_index"] is not None  # max_head picks a head
        assert 0 < record["prefill_s"] <= record["generate_s"]
        # FLOPs by hand: K=2 layers on n tokens, L-K=2 layers on n - 288.
        n = record["num_tokens"]
        flops = 2 * hand_layer_flops(n) + 2 * hand_layer_flops(n - 288)
        assert record["prefill_flops"] == flops
        assert record["baseline_prefill_flops"] == 4 * hand_layer_flops(n)
        assert record["flops_ratio"] == pytest.approx(flops / (4 * hand_layer_flops(n)))
        assert record["prediction"] in {"A", "B", "C", "D", "E", "FAILED"} or len(record["prediction"]) == 1
    text_only = records[5]
    assert text_only["num_image_tokens"] == 0 and not text_only["pruned"] and text_only["flops_ratio"] == 1.0
    total = sum(r["prefill_flops"] for r in records)
    baseline = sum(r["baseline_prefill_flops"] for r in records)
    assert result["flops_info"]["flops_ratio"] == pytest.approx(total / baseline)
    assert 0.5 < result["flops_info"]["flops_ratio"] < 0.8
    # The printed summary and the guide-span notice (the tiny tokenizer puts the image elsewhere than 35): one
    # plain line, not a Python warning with its source line.
    assert "accuracy" in done.stdout and "scienceqa_results_fastv_max_head.json" in done.stdout
    assert done.stderr.count("notice: FastV: sys_length=35 but the image starts at") == 1
    assert "UserWarning" not in done.stderr and "_check_guide_span" not in done.stderr


def test_hand_flops_match_the_flops_model():
    """The hand formula above is the project's FLOPs model for the tiny shape (and 7B is about 0.6 at R=288)."""
    shape = DecoderShape(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                         head_dim=16)
    figures = prefill_flops(shape, 200, 64, 16, 2)
    assert figures["flops"] == 2 * hand_layer_flops(200) + 2 * hand_layer_flops(152)
    assert figures["baseline_flops"] == 4 * hand_layer_flops(200)
    llava7b = DecoderShape(4096, 11008, 32, 32, 32, 128)
    assert 0.57 < prefill_flops(llava7b, 35 + 576 + 90, 576, 288, 2)["ratio"] < 0.62


# -- in-process runs: baseline, answers file, refusal, default output dir -------------------------------------------


def test_baseline_run_writes_guide_files_and_answers(tiny_model_dir, question_set, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # --output-dir defaults to the current directory
    question_file, images = question_set
    answers = tmp_path / "answers" / "tiny.jsonl"
    code = cli("--model-path", tiny_model_dir, "--question-file", question_file, "--image-folder", images,
               "--single-pred-prompt", "--max-new-tokens", "3", "--no-progress", "--answers-file", answers)
    assert code == 0
    result = json.loads((tmp_path / "scienceqa_results_baseline.json").read_text())
    assert GUIDE_KEYS <= set(result)
    assert result["flops_info"]["flops_ratio"] == 1.0 and result["model_config"]["use_fast_v"] is False
    assert result["tokens"]["avg_image_tokens"] == result["tokens"]["avg_kept_image_tokens"] == TINY_IMAGE_TOKENS
    _, records = read_jsonl(tmp_path / "scienceqa_results_baseline.jsonl")
    assert all(r["flops_ratio"] == 1.0 and not r["pruned"] for r in records)
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [a["question_id"] for a in lines] == [r["id"] for r in records]
    assert [a["text"] for a in lines] == [r["output"] for r in records]
    assert "ScienceQA - baseline: 6 samples" in capsys.readouterr().out


def test_a_result_of_another_configuration_is_never_overwritten(tiny_model_dir, question_set, tmp_path, capsys):
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, question_set, out, "--num-samples", "2")
    assert cli(*args) == 0
    result_file = out / "scienceqa_results_baseline.json"
    before = result_file.read_text()
    # Same file name (baseline), different configuration: refused, nothing touched.
    assert cli(*args, "--max-new-tokens", "4") == 1
    err = capsys.readouterr().err
    assert "different configuration" in err and "max_new_tokens: 3 there, 4 now" in err and "--overwrite" in err
    assert result_file.read_text() == before
    # A chunk of another configuration would be merged into that name: refused before it runs.
    assert cli(*args, "--max-new-tokens", "4", "--num-chunks", "2", "--chunk-idx", "0") == 1
    assert not list(out.glob("*.chunk*"))
    # Re-running the same configuration resumes (nothing to do) and keeps the samples.
    assert cli(*args) == 0
    assert "2 of 2 samples already done" in capsys.readouterr().out
    # --overwrite starts over.
    assert cli(*args, "--max-new-tokens", "4", "--overwrite") == 0
    assert json.loads(result_file.read_text())["model_config"]["max_new_tokens"] == 4
    # A foreign file with the same name is not overwritten either.
    result_file.write_text("my notes")
    (out / "scienceqa_results_baseline.jsonl").unlink()
    assert cli(*args, "--max-new-tokens", "4") == 1
    assert result_file.read_text() == "my notes"


def test_more_samples_later_resumes_the_first_ones(tiny_model_dir, question_set, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(*base_args(tiny_model_dir, question_set, out, *FASTV_ARGS, "--num-samples", "2")) == 0
    _, first = read_jsonl(out / "scienceqa_results_fastv_avg_all_heads_rank16_k2.jsonl")
    assert cli(*base_args(tiny_model_dir, question_set, out, *FASTV_ARGS, "--num-samples", "4")) == 0
    assert "2 of 4 samples already done" in capsys.readouterr().out
    _, records = read_jsonl(out / "scienceqa_results_fastv_avg_all_heads_rank16_k2.jsonl")
    assert records[:2] == first and len(records) == 4
    assert [r["warmup"] for r in records] == [True, False, True, False]  # one warm-up per process run
    result = json.loads((out / "scienceqa_results_fastv_avg_all_heads_rank16_k2.json").read_text())
    assert result["total_samples"] == 4 and result["latency"]["timed_samples"] == 2


# -- resume after kill -9 -------------------------------------------------------------------------------------------


def test_resume_after_kill_loses_nothing_and_duplicates_nothing(tiny_model_dir, tmp_path):
    question_file, images = write_question_set(tmp_path / "data", num_image_questions=10, text_only=False)
    out = tmp_path / "out"
    command = [sys.executable, str(WRAPPER), *base_args(tiny_model_dir, (question_file, images), out),
               "--use-fast-v", "--fast-v-attention-rank", "16", "--fast-v-agg-layer", "2", "--save-selection",
               "--fast-v-token-selection-method", "slow_strategy:slow_avg_all_heads"]
    jsonl = out / "scienceqa_results_fastv_slow_strategy-slow_avg_all_heads_rank16_k2.jsonl"
    process = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 1 + 3:
            break
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    _, before = read_jsonl(jsonl)
    assert 3 <= len(before) < 10, "the run was not killed mid-way"
    assert not (out / "scienceqa_results_fastv_slow_strategy-slow_avg_all_heads_rank16_k2.json").exists()

    done = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(before)} of 10 samples already done" in done.stdout
    _, after = read_jsonl(jsonl)
    ids = [r["id"] for r in after]
    assert ids == [str(10 + i) for i in range(10)]  # nothing lost, no duplicates, in question order
    assert after[: len(before)] == before  # finished samples were kept, not recomputed
    for record in after:
        assert len(record["kept_image_indices"]) == 16
        assert record["kept_image_indices"] == sorted(record["kept_image_indices"])
    result = json.loads(jsonl.with_suffix(".json").read_text())
    assert result["total_samples"] == 10 and result["complete"]


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"type": "header", "fingerprint": "x"}\n{"type": "sample", "id": "1"}\n{"type": "sam')
    header, records = SampleJournal.read(path)
    assert header["fingerprint"] == "x" and list(records) == ["1"]
    path.write_text('{"type": "header", "fingerprint": "x"}\n{"type": "sam\n{"type": "sample", "id": "1"}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:2 is not valid JSON"):
        SampleJournal.read(path)


# -- bad input ------------------------------------------------------------------------------------------------------


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: these errors must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(model_loading, "load_model", refuse)


@pytest.mark.parametrize(
    "change,message",
    [
        (["--question-file", "{tmp}/nope.json"], "question file .*nope.json does not exist"),
        (["--use-fast-v", "--fast-v-agg-layer", "2"], "--use-fast-v needs --fast-v-attention-rank"),
        (["--use-fast-v", "--fast-v-attention-rank", "8"], "--use-fast-v needs --fast-v-agg-layer"),
        (["--use-fast-v", "--fast-v-attention-rank", "65", "--fast-v-agg-layer", "2"],
         "--fast-v-attention-rank 65 is larger than the 64 image tokens"),
        (["--use-fast-v", "--fast-v-attention-rank", "8", "--fast-v-agg-layer", "4"],
         r"--fast-v-agg-layer 4 is outside the allowed range \[1, 3\] for this model with 4 decoder layers"),
        (["--use-fast-v", "--fast-v-attention-rank", "8", "--fast-v-agg-layer", "0"], "--fast-v-agg-layer 0"),
        (["--use-fast-v", "--fast-v-attention-rank", "8", "--fast-v-agg-layer", "2",
          "--fast-v-token-selection-method", "weighted_combination", "--fast-v-weighted-alpha", "1.5"],
         r"--fast-v-weighted-alpha 1.5 is outside the allowed range \[0, 1\]"),
        (["--use-fast-v", "--fast-v-attention-rank", "8", "--fast-v-agg-layer", "2",
          "--fast-v-token-selection-method", "maxhead"], "not a registered strategy; registered: .*max_head"),
        (["--model-path", "{tmp}/no-model"], "no-model does not exist"),
        (["--model-path", "liuhaotian/llava-v1.5-7b"], "not present locally.*fastv-convert"),
        (["--image-folder", "{tmp}/no-images"], "--image-folder .*no-images does not exist"),
        (["--split", "test"], "--split 'test' applies to the official release"),
        (["--num-samples", "0"], "--num-samples 0 must be >= 1"),
        (["--num-chunks", "2", "--chunk-idx", "2"], r"--chunk-idx 2 must be in \[0, 1\]"),
        (["--conv-mode", "vicuna_v2"], "--conv-mode 'vicuna_v2' is not supported"),
        (["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--temperature", "-1"],
         "CUDA is not available|temperature"),
    ],
)
def test_bad_flags_and_files_fail_before_the_model_loads(
    tiny_model_dir, question_set, tmp_path, capsys, no_model_load, change, message
):
    args = base_args(tiny_model_dir, question_set, tmp_path / "out") + [c.format(tmp=tmp_path) for c in change]
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_malformed_entry_with_on_error_fail_stops_before_the_model_loads(tiny_model_dir, tmp_path, capsys,
                                                                         no_model_load):
    question_file, images = write_question_set(tmp_path / "data", num_image_questions=2)
    entries = json.loads(question_file.read_text())
    del entries[1]["conversations"][1]
    question_file.write_text(json.dumps(entries))
    assert cli(*base_args(tiny_model_dir, (question_file, images), tmp_path / "out", "--on-error", "fail")) == 2
    err = capsys.readouterr().err
    assert "questions.json: entry 1 (id '11')" in err and "conversations[1]" in err


def test_bad_samples_are_recorded_and_counted(tiny_model_dir, tmp_path, capsys):
    question_file, images = write_question_set(tmp_path / "data", num_image_questions=4)
    entries = json.loads(question_file.read_text())
    entries.append(llava_entry("50", "Which?", ["x", "y"], "A", "50/image.png"))  # image never drawn
    entries.append({"id": "51", "conversations": [{"from": "human", "value": "Which?"}]})  # no label
    question_file.write_text(json.dumps(entries))
    (images / "11" / "image.png").write_bytes(b"not an image at all")  # corrupt
    out = tmp_path / "out"
    assert cli(*base_args(tiny_model_dir, (question_file, images), out, *FASTV_ARGS)) == 0
    captured = capsys.readouterr()
    assert "2 questions cannot be evaluated" in captured.err  # missing image + malformed entry found up front
    result = json.loads((out / "scienceqa_results_fastv_avg_all_heads_rank16_k2.json").read_text())
    assert result["total_samples"] == 7 and result["errors"] == 3 and result["evaluated_samples"] == 4
    assert result["accuracy"] == result["correct_samples"] / 7  # errors count as wrong, as LLaVA's missing answers
    _, records = read_jsonl(out / "scienceqa_results_fastv_avg_all_heads_rank16_k2.jsonl")
    errors = {r["id"]: r["error"] for r in records if r["error"]}
    assert set(errors) == {"11", "50", "51"}
    assert "11/image.png of question '11' cannot be read" in errors["11"]
    assert "50/image.png of question '50' does not exist" in errors["50"]
    assert "entry 6 (id '51')" in errors["51"] and "conversations[1]" in errors["51"]
    assert "errors 3" in captured.out
    # The summary names the failed samples (only the JSONL did before).
    assert "3 samples could not be evaluated" in captured.out
    assert "11/image.png of question '11' cannot be read" in captured.out
    assert "50/image.png of question '50' does not exist" in captured.out and "entry 6 (id '51')" in captured.out

    # Fixed image, same command: only the failed samples are retried.
    draw_image(images / "11" / "image.png", 1)
    assert cli(*base_args(tiny_model_dir, (question_file, images), out, *FASTV_ARGS)) == 0
    result = json.loads((out / "scienceqa_results_fastv_avg_all_heads_rank16_k2.json").read_text())
    assert result["errors"] == 2 and result["total_samples"] == 7

    # --on-error fail: a corrupt image (found only when read) stops the run; the error is in the JSONL.
    (images / "12" / "image.png").write_bytes(b"still not an image")
    out2 = tmp_path / "out2"
    assert cli(*base_args(tiny_model_dir, (question_file, images), out2, *FASTV_ARGS, "--num-samples", "4",
                          "--on-error", "fail")) == 1
    assert "12/image.png of question '12' cannot be read" in capsys.readouterr().err
    _, records = read_jsonl(out2 / "scienceqa_results_fastv_avg_all_heads_rank16_k2.jsonl")
    assert [r["id"] for r in records] == ["10", "11", "12"] and records[-1]["error"]
    assert not (out2 / "scienceqa_results_fastv_avg_all_heads_rank16_k2.json").exists()


def test_the_summary_names_a_few_failed_samples_then_counts_the_rest():
    failed = [f"image {i}/image.png of question '{i}' cannot be read" for i in range(5)]
    lines = format_failures(failed)
    assert lines[0].strip() == "failed        5 samples could not be evaluated (counted wrong):"
    assert [line.strip() for line in lines[1:4]] == [f"- {message}" for message in failed[:3]]
    assert lines[4].strip().startswith("... and 2 more") and len(lines) == 5
    assert format_failures([]) == []


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("kind", ["file", "inside-a-file", "read-only", "sys"])
def test_an_output_folder_that_cannot_be_written_fails_before_the_model_loads(
    tiny_model_dir, question_set, tmp_path, capsys, no_model_load, kind
):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("my notes")
    if kind == "file":
        out, message = a_file, f"--output-dir {a_file} is a file, not a folder"
    elif kind == "inside-a-file":
        out, message = a_file / "out", f"--output-dir {a_file / 'out'} cannot be created: {a_file} is a file"
    elif kind == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        out = tmp_path / "read-only"
        out.mkdir(mode=0o555)
        message = f"--output-dir {out} cannot be written"
    else:
        out = Path("/sys/kernel")
        if not out.is_dir():
            pytest.skip("no /sys/kernel here")
        message = "--output-dir /sys/kernel cannot be written"
    assert cli(*base_args(tiny_model_dir, question_set, out, *FASTV_ARGS)) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and message in _error_lines(err)[0], err
    assert a_file.read_text() == "my notes"
    # The same with --dry-run: the check is one of the flag checks.
    assert cli(*base_args(tiny_model_dir, question_set, out, *FASTV_ARGS, "--dry-run")) == 2
    assert message in capsys.readouterr().err


def test_every_input_problem_is_reported_at_once(tmp_path, capsys, no_model_load):
    """The guide's command where nothing it names exists: one run lists every problem instead of one per run."""
    (tmp_path / "a-file").write_text("")
    assert cli("--model-path", tmp_path / "no-model", "--question-file", tmp_path / "nope.json",
               "--image-folder", tmp_path / "no-images", "--single-pred-prompt", "--use-fast-v",
               "--fast-v-attention-rank", "288", "--fast-v-agg-layer", "2", "--fast-v-token-selection-method",
               "maxhead", "--output-dir", tmp_path / "a-file", "--num-samples", "100") == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 5, errors
    for expected in ("--fast-v-token-selection-method 'maxhead' is not a registered strategy", "no-model does not "
                     "exist", "question file", "nope.json does not exist", "--image-folder", "no-images does not "
                     "exist", "a-file is a file, not a folder"):
        assert any(expected in line for line in errors), (expected, errors)


def test_embedded_setting_without_the_embedded_files_says_where_they_are(tmp_path, monkeypatch, capsys,
                                                                       no_model_load):
    """An installed package (not a source checkout) has no embedded model or data: say so in one line."""
    from fastv_advanced import embedded

    site = tmp_path / "site-packages"
    monkeypatch.setattr(embedded, "MODEL_PATH", site / "models" / "tiny-llava-scienceqa")
    monkeypatch.setattr(embedded, "QUESTION_FILE", site / "data" / "scienceqa" / "himap-inference-MCQ.json")
    monkeypatch.setattr(embedded, "IMAGE_FOLDER", site / "data" / "scienceqa" / "images" / "test")
    monkeypatch.setenv("FASTV_EMBEDDED", "1")
    assert cli("--model-path", "liuhaotian/llava-v1.5-7b", "--single-pred-prompt", "--output-dir", tmp_path) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "source checkout" in errors[0] and "pip install -e ." in errors[0], errors
    assert "tiny-llava-scienceqa" in errors[0]


def test_no_progress_also_hides_the_loading_bar(tiny_model_dir, question_set, tmp_path, capsys):
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    assert cli(*base_args(tiny_model_dir, question_set, tmp_path / "out", "--num-samples", "1")) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    assert transformers_logging.is_progress_bar_enabled() == enabled  # restored for whoever loads next


def test_config_errors_name_their_field_and_the_command_lines_name_their_flag():
    with pytest.raises(FieldError) as caught:
        build_checked("fastv", {"agg_layer": 0, "attention_rank": 8, "token_selection_method": "max_head"})
    assert caught.value.field == "agg_layer" and str(caught.value).startswith("agg_layer=0 is invalid")
    assert flag_error(caught.value).problems == [caught.value.for_flag("--fast-v-agg-layer")]
    assert caught.value.for_flag("--agg-layers").startswith("--agg-layers 0 is invalid")
    with pytest.raises(FieldError) as caught:
        build_checked("fastv", {"agg_layer": 2, "attention_rank": 8, "token_selection_method": "maxhead"})
    assert caught.value.field == "token_selection_method"
    assert flag_error(caught.value).problems[0].startswith("--fast-v-token-selection-method 'maxhead' is not")
    with pytest.raises(FieldError) as caught:
        RunConfig(max_new_tokens=0)
    assert str(caught.value) == "max_new_tokens=0 must be an integer >= 1"
    assert flag_error(caught.value).problems == ["--max-new-tokens 0 must be an integer >= 1"]


def test_dry_run_checks_and_describes_without_evaluating(tiny_model_dir, question_set, tmp_path, capsys,
                                                         no_model_load):
    (question_set[1] / "12" / "image.png").unlink()
    out = tmp_path / "out"
    assert cli(*base_args(tiny_model_dir, question_set, out, *FASTV_ARGS, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "Dry run" in printed and "CUDA available:" in printed
    assert "4 decoder layers, 64 image tokens" in printed and "6 selected" in printed
    assert "problems: 1" in printed and "12/image.png of question '12' does not exist" in printed
    assert "FastV - avg_all_heads (R=16, K=2): from layer 2 keep 16 of 64" in printed
    assert "scienceqa_results_fastv_avg_all_heads_rank16_k2.json" in printed
    assert not out.exists()


def test_official_release_runs_with_its_default_image_folder(tiny_model_dir, tmp_path):
    release = tmp_path / "ScienceQA"
    shutil.copytree(Path(__file__).parent / "data" / "scienceqa_official", release)
    for pid in ("1", "2", "3"):
        draw_image(release / "images" / "test" / pid / "image.png", int(pid))
    out = tmp_path / "out"
    assert cli("--model-path", tiny_model_dir, "--question-file", release / "problems.json", "--split", "test",
               "--single-pred-prompt", "--max-new-tokens", "2", "--no-progress", "--output-dir", out) == 0
    result = json.loads((out / "scienceqa_results_baseline.json").read_text())
    assert result["total_samples"] == 4 and result["errors"] == 0
    assert result["question_file"]["format"] == "official" and result["question_file"]["split"] == "test"
    _, records = read_jsonl(out / "scienceqa_results_baseline.jsonl")
    assert "Context: Look at the picture.\nWhich shape is red?\nA. circle\nB. square\nAnswer with" in records[0][
        "prompt"]
    assert records[0]["label"] == "B"


def test_embedded_setting_replaces_the_guide_paths(tiny_model_dir, question_set, tmp_path, monkeypatch, capsys):
    from fastv_advanced import embedded

    question_file, images = question_set
    monkeypatch.setattr(embedded, "MODEL_PATH", tiny_model_dir)
    monkeypatch.setattr(embedded, "QUESTION_FILE", question_file)
    monkeypatch.setattr(embedded, "IMAGE_FOLDER", images)
    monkeypatch.setenv("FASTV_EMBEDDED", "1")
    out = tmp_path / "out"
    assert cli("--model-path", "liuhaotian/llava-v1.5-7b", "--question-file",
               "/root/nfs/code/HiMAP/data/scienceqa/himap-inference-MCQ.json", "--image-folder",
               "./data/scienceqa/images/test", "--single-pred-prompt", "--num-samples", "2", "--max-new-tokens", "2",
               "--no-progress", "--output-dir", out) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("FASTV_EMBEDDED=1: using the embedded tiny model")
    assert "instead of --model-path liuhaotian/llava-v1.5-7b" in printed
    result = json.loads((out / "scienceqa_results_baseline.json").read_text())
    assert result["model_config"]["model_path"] == str(tiny_model_dir.resolve())
    monkeypatch.setenv("FASTV_EMBEDDED", "0")
    assert embedded.resolve_embedded("a", "b", "c") == ("a", "b", "c", None)


# -- chunks and accelerate ------------------------------------------------------------------------------------------


@pytest.fixture()
def reference_run(tiny_model_dir, question_set, tmp_path) -> dict:
    """Per-sample outputs of one unchunked FastV run (the reference for chunked and parallel runs)."""
    out = tmp_path / "reference"
    assert cli(*base_args(tiny_model_dir, question_set, out, *FASTV_ARGS)) == 0
    _, records = read_jsonl(out / "scienceqa_results_fastv_avg_all_heads_rank16_k2.jsonl")
    return {r["id"]: (r["output"], r["num_kept_image_tokens"], r["prefill_flops"]) for r in records}


def test_chunks_merge_into_the_unchunked_result(tiny_model_dir, question_set, tmp_path, reference_run, capsys):
    out = tmp_path / "chunks"
    stem = "scienceqa_results_fastv_avg_all_heads_rank16_k2"
    assert cli(*base_args(tiny_model_dir, question_set, out, *FASTV_ARGS, "--num-chunks", "2", "--chunk-idx", "1")) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.chunk1of2.jsonl"]  # no half result file
    assert merge_chunks.main(["--output-dir", str(out)]) == 1
    assert "chunks [0] of 2 are missing" in capsys.readouterr().err
    assert cli(*base_args(tiny_model_dir, question_set, out, *FASTV_ARGS, "--num-chunks", "2", "--chunk-idx", "0")) == 0
    assert merge_chunks.main(["--output-dir", str(out)]) == 0
    result = json.loads((out / f"{stem}.json").read_text())
    assert result["total_samples"] == 6 and result["complete"] and result["merged_from_chunks"]["num_chunks"] == 2
    _, records = read_jsonl(out / f"{stem}.jsonl")
    assert {r["id"]: (r["output"], r["num_kept_image_tokens"], r["prefill_flops"]) for r in records} == reference_run
    assert [r["id"] for r in records] == list(reference_run)  # question order


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("batch_size", ["1", "2"])
def test_accelerate_launch_with_two_cpu_processes(tiny_model_dir, question_set, tmp_path, reference_run, batch_size):
    pytest.importorskip("accelerate")
    out = tmp_path / "parallel"
    # On a machine without GPUs, accelerate's --multi_gpu launcher (torchrun) starts CPU processes; the command
    # sees WORLD_SIZE=2 and shards the questions.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(WRAPPER),
               *base_args(tiny_model_dir, question_set, out, *FASTV_ARGS, "--device", "cpu", "--batch-size",
                          batch_size)]
    done = subprocess.run(command, cwd=tmp_path, env=subprocess_env(CUDA_VISIBLE_DEVICES=""), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stem = "scienceqa_results_fastv_avg_all_heads_rank16_k2"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{stem}.json", f"{stem}.jsonl", f"{stem}.chunk0of2.jsonl", f"{stem}.chunk1of2.jsonl"]
    )
    for rank in range(2):
        _, shard = read_jsonl(out / f"{stem}.chunk{rank}of2.jsonl")
        assert len(shard) == 3
    result = json.loads((out / f"{stem}.json").read_text())
    assert result["total_samples"] == 6 and result["complete"]
    _, records = read_jsonl(out / f"{stem}.jsonl")
    assert {r["id"]: (r["output"], r["num_kept_image_tokens"], r["prefill_flops"]) for r in records} == reference_run
    assert done.stdout.count("ScienceQA - ") == 1  # only the main process prints the summary
    assert result["batch_size"] == int(batch_size)


def test_original_format_checkpoints_are_loaded_by_the_converter_module(tiny_model_dir, question_set, tmp_path,
                                                                       monkeypatch, capsys):
    """An original-format folder (config.json with LlavaLlamaForCausalLM) goes to load_original_checkpoint, and its
    image_aspect_ratio sets the preprocessing unless --image-aspect-ratio is given."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    original = pytest.importorskip("fastv_advanced.original_checkpoint")
    folder = tmp_path / "llava-v1.5-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "num_hidden_layers": 4,
        "mm_vision_tower": "tiny/clip-vit-patch4-32", "image_aspect_ratio": "square",
    }))
    calls = []

    def fake_loader(path, model_base=None, vision_tower=None, dtype=None, device=None):
        calls.append((path, model_base, dtype))
        model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=dtype)
        model.config.image_aspect_ratio = "square"
        return model.to(device), AutoProcessor.from_pretrained(tiny_model_dir, backend="pil")

    monkeypatch.setattr(original, "load_original_checkpoint", fake_loader)
    out = tmp_path / "out"
    args = ["--model-path", folder, "--question-file", question_set[0], "--image-folder", question_set[1],
            "--num-samples", "2", "--max-new-tokens", "2", "--no-progress", "--output-dir", out]
    assert cli(*args, "--dry-run") == 0
    assert "original format, 4 decoder layers, 64 image tokens" in capsys.readouterr().out
    assert cli(*args) == 0
    assert calls == [(str(folder.resolve()), None, __import__("torch").float32)]
    config = json.loads((out / "scienceqa_results_baseline.json").read_text())["model_config"]
    assert config["model_format"] == "original" and config["image_aspect_ratio"] == "crop"
    # --model-base is for original-format checkpoints only.
    assert cli(*args, "--model-path", tiny_model_dir, "--model-base", folder) == 2
    assert "--model-base applies to original-format checkpoints" in capsys.readouterr().err
