"""Batched evaluation (`--batch-size N`): the same records as one question at a time, except the timings.

On the tiny offline LLaVA of conftest.py (64 image tokens, 4 layers); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_question_set
from fastv_advanced import FastVConfig, build_method
from fastv_advanced.cli import eval_scivqa, merge_chunks, sweep
from fastv_advanced.evaluation import RunOptions, evaluate
from fastv_advanced.model_loading import load_model
from fastv_advanced.prompting import batch_inputs, build_inputs
from fastv_advanced.run_config import RunConfig, result_file_name, samples_file_name
from fastv_advanced.run_loop import PlannedQuestion, _up_to_eos, plan_batches
from fastv_advanced.scienceqa import Question, load_image, load_questions

# Fields that describe how a sample was run rather than what it gave.
TIMING = {"prefill_s", "generate_s", "warmup", "batch_size", "peak_memory_bytes", "image_scores"}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", dtype="float32", progress=False)


@pytest.fixture()
def questions(tmp_path):
    """8 image questions (two prompt lengths: with and without a hint, so batches are padded) + 1 text-only."""
    question_file, images = write_question_set(tmp_path / "data", num_image_questions=8)
    return load_questions(str(question_file)), images


def run(loaded, questions, run_config, out, batch_size, **options):
    question_set, images = questions
    return evaluate(loaded.model, loaded.processor, question_set, run_config,
                    RunOptions(output_dir=out, image_folder=images, save_selection=True, progress=False,
                               batch_size=batch_size, log=lambda line: None, **options),
                    model_info=loaded.info)


def records_of(result) -> list[dict]:
    lines = [json.loads(line) for line in Path(result["samples_path"]).read_text().splitlines()]
    return lines[1:]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


METHODS = {
    "baseline": lambda: None,
    "fastv": lambda: FastVConfig(agg_layer=2, attention_rank=16, token_selection_method="avg_all_heads"),
    "fastv_max_head": lambda: FastVConfig(agg_layer=1, attention_rank=40, token_selection_method="max_head"),
    "pdrop": lambda: build_method("pdrop", {"layers": "1,3"}),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batches_give_the_records_of_one_question_at_a_time(loaded, questions, tmp_path, name):
    run_config = RunConfig(method=METHODS[name](), single_pred_prompt=True, max_new_tokens=4)
    single = records_of(run(loaded, questions, run_config, tmp_path / "b1", 1))
    result = run(loaded, questions, run_config, tmp_path / "b3", 3)
    batched = records_of(result)
    assert [r["id"] for r in batched] == [r["id"] for r in single]  # rewritten in question order
    assert without_timing(batched) == without_timing(single)
    assert {r["batch_size"] for r in single} == {1}
    # 8 image questions in batches of 3 (3, 3, 2), the text-only question alone
    assert sorted(r["batch_size"] for r in batched) == [1, 2, 2, 3, 3, 3, 3, 3, 3]
    assert result["batch_size"] == 3
    if name != "baseline":
        assert all(r["kept_image_indices"] for r in batched if r["num_image_tokens"])
        for a, b in zip(single, batched):
            if a["image_scores"] is not None:
                assert b["image_scores"] == pytest.approx(a["image_scores"], rel=1e-4, abs=1e-6)


def test_rows_stop_at_their_own_eos(loaded, questions, tmp_path):
    """A row that ends earlier than the others keeps only its tokens up to its EOS, as alone."""
    model = loaded.model
    question_set, images = questions
    answers = []
    for question in question_set.questions:
        _, inputs = build_inputs(question.text, load_image(images, question), loaded.processor, model.config)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answers.append(output[0, inputs["input_ids"].shape[1]:].tolist())
    # an EOS that some answers reach before their end and others never
    probe = next(t for t in sorted({t for a in answers for t in a[:-1]}) if not all(t in a for a in answers))
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [saved, probe] if saved is not None else [probe]
    try:
        run_config = RunConfig(max_new_tokens=4, single_pred_prompt=False)
        single = records_of(run(loaded, questions, run_config, tmp_path / "b1", 1))
        batched = records_of(run(loaded, questions, run_config, tmp_path / "b4", 4))
    finally:
        model.generation_config.eos_token_id = saved
    lengths = {r["num_generated_tokens"] for r in single}
    assert len(lengths) > 1, "the probe EOS should end some answers early and not others"
    assert without_timing(batched) == without_timing(single)


def test_up_to_eos_cuts_after_the_first_eos():
    assert _up_to_eos(torch.tensor([5, 2, 2, 2]), {2}).tolist() == [5, 2]
    assert _up_to_eos(torch.tensor([5, 6, 7]), {2}).tolist() == [5, 6, 7]
    assert _up_to_eos(torch.tensor([9, 5, 3]), {3, 9}).tolist() == [9]


def test_batches_group_by_kind_and_length_deterministically():
    def planned(qid, image, length, num_image=576):
        return PlannedQuestion(Question(id=qid, index=0, text="", label="A", image=image), "", [0] * length,
                               num_image if image else 0)

    items = [planned("a", "a.png", 10), planned("t1", None, 12), planned("b", "b.png", 14), planned("c", "c.png", 10),
             planned("t2", None, 5), planned("d", "d.png", 14), planned("e", "e.png", 11)]
    batches = plan_batches(items, 2)
    ids = [[item.question.id for item in batch] for batch in batches]
    assert ids == [["b", "d"], ["e", "a"], ["c"], ["t1", "t2"]]  # image rows first, longest first, kinds apart
    assert plan_batches(items, 2) == batches
    assert [[i.question.id for i in b] for b in plan_batches(items, 1)] == [[i] for i in "bdeac"] + [["t1"], ["t2"]]


def test_batches_sort_by_image_token_count():
    """Anyres / dynamic-resolution families: rows of one batch may differ in image tokens; similar counts go
    together, most first."""
    def planned(qid, length, num_image):
        return PlannedQuestion(Question(id=qid, index=0, text="", label="A", image=f"{qid}.png"), "",
                               [0] * length, num_image)

    items = [planned("a", 700, 600), planned("b", 690, 576), planned("c", 650, 600), planned("d", 640, 576),
             planned("e", 800, 729)]
    ids = [[item.question.id for item in batch] for batch in plan_batches(items, 4)]
    assert ids == [["e", "a", "c", "b"], ["d"]]
    assert [[item.question.id for item in batch] for batch in plan_batches(items, 2)] == [["e", "a"], ["c", "b"],
                                                                                         ["d"]]


def test_batch_inputs_pad_on_the_left_and_stack_images():
    rows = [{"input_ids": torch.tensor([[1, 7, 8]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "pixel_values": torch.zeros(1, 3, 4, 4)},
            {"input_ids": torch.tensor([[1, 9]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "pixel_values": torch.ones(1, 3, 4, 4)}]
    inputs, pads = batch_inputs(rows, pad_token_id=0)
    assert inputs["input_ids"].tolist() == [[1, 7, 8], [0, 1, 9]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert inputs["pixel_values"].shape == (2, 3, 4, 4) and inputs["pixel_values"][1].eq(1).all()
    assert pads == [0, 1]
    with pytest.raises(ValueError, match="only questions with an image or only text-only"):
        batch_inputs([rows[0], {k: v for k, v in rows[1].items() if k != "pixel_values"}], pad_token_id=0)


def test_a_partly_done_batch_resumes_question_by_question(loaded, questions, tmp_path):
    run_config = RunConfig(method=METHODS["fastv"](), single_pred_prompt=True, max_new_tokens=4)
    reference = records_of(run(loaded, questions, run_config, tmp_path / "reference", 1))
    out = tmp_path / "out"
    full = records_of(run(loaded, questions, run_config, out, 3))
    # as if killed in the middle of writing a batch: the header and the first 4 records of the batched order survive
    jsonl = out / samples_file_name(run_config)
    (out / result_file_name(run_config)).unlink()
    batched_order = sorted(full, key=lambda r: (r["num_image_tokens"] == 0, -r["num_tokens"]))
    kept = {r["id"] for r in batched_order[:4]}
    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join([lines[0]] + [line for line in lines[1:] if json.loads(line)["id"] in kept]) + "\n")
    result = run(loaded, questions, run_config, out, 3)
    resumed = records_of(result)
    assert result["complete"] and result["total_samples"] == 9
    assert without_timing(resumed) == without_timing(reference)
    assert sum(1 for r in resumed if r["id"] in kept and r in full) == 4  # kept, not recomputed


def test_random_methods_and_sampling_run_one_question_at_a_time(loaded, questions, tmp_path):
    notes = []
    question_set, images = questions
    for name, run_config in {
        "random": RunConfig(method=FastVConfig(agg_layer=2, attention_rank=16, token_selection_method="random"),
                            max_new_tokens=3),
        "sampling": RunConfig(temperature=0.7, max_new_tokens=3),
    }.items():
        single = records_of(run(loaded, questions, run_config, tmp_path / f"{name}1", 1))
        result = evaluate(loaded.model, loaded.processor, question_set, run_config,
                          RunOptions(output_dir=tmp_path / f"{name}4", image_folder=images, save_selection=True,
                                     progress=False, batch_size=4, log=notes.append), model_info=loaded.info)
        batched = records_of(result)
        assert without_timing(batched) == without_timing(single), name
        assert {r["batch_size"] for r in batched} == {1}
    assert "draws random numbers" in notes[0] and "temperature" in notes[1]


def test_results_record_throughput_and_what_latency_means(loaded, questions, tmp_path):
    run_config = RunConfig(max_new_tokens=3)
    single = run(loaded, questions, run_config, tmp_path / "b1", 1)
    batched = run(loaded, questions, run_config, tmp_path / "b4", 4)
    for result in (single, batched):
        throughput = result["throughput"]
        assert throughput["questions_per_s"] > 0 and throughput["prefill_tokens_per_s"] > 0
    assert single["throughput"]["questions_per_s"] == pytest.approx(1 / single["latency"]["generate_mean"])
    assert "batched_is" not in single["latency"] and "batch" in batched["latency"]["batched_is"]
    assert single["batch_size"] == 1 and batched["batch_size"] == 4
    records = records_of(batched)
    timed = [r for r in records if not r["warmup"]]
    assert batched["throughput"]["questions_per_s"] == pytest.approx(
        len(timed) / sum(r["generate_s"] / r["batch_size"] for r in timed))
    header = json.loads(Path(batched["samples_path"]).read_text().splitlines()[0])
    assert header["batch_size"] == 4


def cli_args(tiny_model_dir, question_file, images, out, *extra):
    return [str(a) for a in ("--model-path", tiny_model_dir, "--question-file", question_file, "--image-folder",
                             images, "--single-pred-prompt", "--output-dir", out, "--max-new-tokens", "3",
                             "--no-progress", "--save-selection", *extra)]


FASTV_ARGS = ["--use-fast-v", "--fast-v-attention-rank", "16", "--fast-v-agg-layer", "2"]


def test_command_line_batches_chunks_and_sweep(tiny_model_dir, question_set, tmp_path, capsys):
    question_file, images = question_set
    stem = "scienceqa_results_fastv_avg_all_heads_rank16_k2"

    def outputs(path):
        lines = [json.loads(line) for line in path.read_text().splitlines()][1:]
        return [(r["id"], r["output"], r["kept_image_indices"]) for r in lines]

    assert eval_scivqa.main(cli_args(tiny_model_dir, question_file, images, tmp_path / "b1", *FASTV_ARGS)) == 0
    reference = outputs(tmp_path / "b1" / f"{stem}.jsonl")
    for index in range(2):
        assert eval_scivqa.main(cli_args(tiny_model_dir, question_file, images, tmp_path / "chunks", *FASTV_ARGS,
                                         "--batch-size", "2", "--num-chunks", "2", "--chunk-idx", index)) == 0
    assert merge_chunks.main(["--output-dir", str(tmp_path / "chunks")]) == 0
    assert outputs(tmp_path / "chunks" / f"{stem}.jsonl") == reference
    assert json.loads((tmp_path / "chunks" / f"{stem}.json").read_text())["batch_size"] == 2

    assert sweep.main(cli_args(tiny_model_dir, question_file, images, tmp_path / "sweep", "--methods",
                               "avg_all_heads", "--ranks", "16", "--batch-size", "4")) == 0
    assert outputs(tmp_path / "sweep" / f"{stem}.jsonl") == reference
    assert json.loads((tmp_path / "sweep" / f"{stem}.json").read_text())["batch_size"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        eval_scivqa.main(cli_args(tiny_model_dir, question_file, images, tmp_path / "bad", "--batch-size", "0"))
    assert exit_info.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_embedded_model_batches_give_the_same_predictions_and_kept_tokens(tmp_path):
    """The embedded trained model and sample (576 image tokens, prompts of different lengths): batch 8 vs 1 with
    FastV max_head K=2 R=288 and PDrop, 24 questions. (The full check, 100 questions and every method, gave no
    difference either: docs/evaluation.md.)"""
    from fastv_advanced.embedded import IMAGE_FOLDER, MODEL_PATH, QUESTION_FILE

    embedded = load_model(str(MODEL_PATH), device="cpu", dtype="float32", progress=False)
    questions = (load_questions(str(QUESTION_FILE)).head(24), IMAGE_FOLDER)
    for method in (FastVConfig(agg_layer=2, attention_rank=288, token_selection_method="max_head"),
                   build_method("pdrop", {"layers": "1,3"})):
        run_config = RunConfig(method=method, single_pred_prompt=True)
        single = records_of(run(embedded, questions, run_config, tmp_path / f"{method.name}1", 1))
        batched = records_of(run(embedded, questions, run_config, tmp_path / f"{method.name}8", 8))
        assert len({r["num_tokens"] for r in batched}) > 1  # rows of one batch were padded
        assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]
        assert [r["kept_image_indices"] for r in batched] == [r["kept_image_indices"] for r in single]
        assert without_timing(batched) == without_timing(single)


def test_throughput_benchmark_runs_and_reports_ratios(tmp_path, capsys):
    """`benchmarks/bench_throughput.py` end to end on the scaled CPU shape, smallest setting."""
    import importlib
    import sys

    from conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    bench = importlib.import_module("bench_throughput")
    assert bench.main(["--num-questions", "2", "--batch-sizes", "1", "2", "--ranks", "288", "--no-baseline",
                       "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| FastV K=2 R=288 | 2 |" in out and "Same predictions at every batch size: FastV K=2 R=288 yes" in out
    assert "fastv-sweep --model-path ./models/llava-1.5-7b-hf" in out and "--batch-size $BS" in out
    (written,) = tmp_path.glob("bench_throughput_scaled_cpu_*.json")
    rows = json.loads(written.read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2] and rows[0]["vs_batch1"] == 1.0
