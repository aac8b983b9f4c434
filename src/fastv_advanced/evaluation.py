"""One ScienceQA evaluation run of a loaded LLaVA, with or without FastV: `evaluate(...)` -> the result dict.

`evaluate` evaluates one configuration (`run_config.RunConfig`) over a question set with `RunOptions` saying where
the images are and how to read and write files: one sample at a time (or `batch_size` at a time, left-padded)
through `run_loop` (greedy `generate`, the
official answer parser, prefill and end-to-end timing, theoretical prefill FLOPs from the model's real shape), a
per-sample JSONL flushed and fsync'd after every sample, and the result JSON (`metrics`) written atomically.

Resume and safety: the JSONL's first line is a header with a fingerprint of everything that changes the results
(`run_config.fingerprint_config`: run configuration, model, dtype, device type, question-file hash). Re-running the
same configuration continues where the JSONL ends (samples that failed are retried); a JSONL or result file of a
different configuration is never mixed in or overwritten unless `overwrite=True`.

Where the other pieces live: naming and identity in `run_config`, the loop in `run_loop`, metrics and the printed
summary in `metrics`, chunk merging in `chunks`, model loading in `model_loading`, questions in `scienceqa`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from .flops import DecoderShape
from .metrics import build_result, failures, summarize
from .model_loading import ModelInfo, model_info_from
from .run_config import (
    RESULT_FORMAT,
    RunConfig,
    check_run,
    fingerprint_config,
    model_config_section,
    result_file_name,
    samples_file_name,
)
from .run_files import SampleJournal, check_result_file, environment_info, fingerprint_of
from .run_files import write_json_atomic, write_lines_atomic
from .run_loop import ON_ERROR_CHOICES, EvaluationError, SampleContext, run_questions
from .scienceqa import Question, QuestionSet, split_chunks


@dataclass
class RunOptions:
    """How a run reads its images and writes its files; nothing here changes a sample's result.

    output_dir: where `<stem>.jsonl` and `<stem>.json` go. image_folder: what the entries' `image` paths are
    relative to. overwrite: start over, replacing this configuration's files (and a result file of another
    configuration with the same name). on_error: `skip` records a bad sample as an error and goes on, `fail` stops.
    save_selection: store each sample's kept image-token indices. num_chunks, chunk_idx: evaluate contiguous chunk
    i of n (written as `<stem>.chunk{i}of{n}.jsonl`, no result file). num_samples: the `--num-samples` the
    questions were cut to (recorded). answers_file: also write LLaVA's answers JSONL. command: the command line
    (recorded). progress: show a progress bar. log: where progress lines go. batch_size: questions per `generate`
    (1: one at a time, the per-question latency; more: left-padded batches of similar prompt length, the same
    predictions, more throughput on a GPU; recorded in the header, the result and each record).
    """

    output_dir: str | os.PathLike = "."
    image_folder: str | os.PathLike | None = None
    overwrite: bool = False
    on_error: str = "skip"
    save_selection: bool = False
    num_chunks: int = 1
    chunk_idx: int = 0
    num_samples: int | None = None
    answers_file: str | os.PathLike | None = None
    command: str | None = None
    progress: bool = True
    log: Callable[[str], None] = print
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} must be an integer >= 1")
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error={self.on_error!r}: choose one of {ON_ERROR_CHOICES}")
        if not 0 <= self.chunk_idx < self.num_chunks:
            raise ValueError(
                f"--chunk-idx {self.chunk_idx} must be in [0, {self.num_chunks - 1}] for --num-chunks "
                f"{self.num_chunks}"
            )


@dataclass
class _Run:
    """One evaluation in progress: what it runs, over which questions, into which files."""

    run_config: RunConfig
    model_info: ModelInfo
    selected: list[Question]  # this chunk's questions, in question order
    shape: DecoderShape
    config: dict  # fingerprint_config(...): the identity the files carry
    result_path: Path
    jsonl_path: Path


def evaluate(
    model: torch.nn.Module,
    processor,
    questions: QuestionSet,
    run_config: RunConfig,
    options: RunOptions | None = None,
    *,
    model_info: ModelInfo | None = None,
) -> dict:
    """Evaluate `questions` (already cut to `--num-samples`; chunked here) and return the result dict.

    Writes `<output_dir>/<stem>.jsonl` (per sample, resumed) and, for an unchunked run, `<output_dir>/<stem>.json`
    atomically. With `num_chunks > 1` only the chunk's JSONL `<stem>.chunk{i}of{n}.jsonl` is written; merge them
    with `chunks.merge_chunks`. Raises `ConfigurationMismatch` before evaluating anything when existing files belong
    to another configuration, `EvaluationError` on a bad sample with `on_error="fail"`, `ValueError` when the
    configuration does not fit the model. The returned dict is the result file's content plus `samples_path`,
    `failures` (the messages of the samples that could not be evaluated) and, when written, `result_file`.
    """
    options = options or RunOptions()
    started = time.time()
    model_info = model_info or model_info_from(model, processor)
    problems = check_run(model_info.num_layers, model_info.num_image_tokens, run_config)
    if problems:
        raise ValueError("; ".join(map(str, problems)))
    run = _plan(model, run_config, model_info, questions, options)
    journal = SampleJournal.open(run.jsonl_path, _header(run, questions, options), options.overwrite)
    todo = [q for q in run.selected if q.id not in _finished_ids(journal)]
    if len(todo) < len(run.selected):
        options.log(f"resuming from {run.jsonl_path}: {len(run.selected) - len(todo)} of {len(run.selected)} "
                    "samples already done")
    parameter = next(model.parameters())
    ctx = SampleContext(
        model, processor, run_config, None if options.image_folder is None else str(options.image_folder),
        run.shape, parameter.device, parameter.dtype, options.save_selection,
    )
    run_questions(ctx, journal, run.selected, todo, on_error=options.on_error, progress=options.progress,
                  batch_size=options.batch_size, log=options.log)
    return _finish(run, journal, options, started)


def _plan(model: torch.nn.Module, run_config: RunConfig, model_info: ModelInfo, questions: QuestionSet,
          options: RunOptions) -> _Run:
    """Create the output folder, select this chunk's questions and name the files. Refuses a malformed entry
    with `on_error="fail"`, and a result file of another configuration now (a chunk's result is written later by
    the merge, under the same name)."""
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    selected = split_chunks(questions.questions, options.num_chunks)[options.chunk_idx]
    if options.on_error == "fail":
        for question in selected:
            if question.error:
                raise EvaluationError(question.error)
    run = _Run(
        run_config, model_info, selected, DecoderShape.from_text_config(model.config.text_config),
        config=fingerprint_config(run_config, model_info, questions),
        result_path=output_dir / result_file_name(run_config),
        jsonl_path=output_dir / samples_file_name(run_config, options.num_chunks, options.chunk_idx),
    )
    check_result_file(run.result_path, run.config, options.overwrite)
    return run


def _header(run: _Run, questions: QuestionSet, options: RunOptions) -> dict:
    """The JSONL's header line: the fingerprint and configuration, what was selected, the environment."""
    image_folder = options.image_folder
    return {
        "type": "header",
        "result_format": RESULT_FORMAT,
        "fingerprint": fingerprint_of(run.config),
        "config": run.config,
        "label": run.run_config.label,
        "result_name": result_file_name(run.run_config),
        "model_config": model_config_section(run.run_config, run.model_info),
        "questions": questions.identity(),
        "image_folder": str(Path(image_folder).resolve()) if image_folder is not None else None,
        "decoder_shape": asdict(run.shape),
        "selection": {
            "num_samples": options.num_samples,
            "num_chunks": options.num_chunks,
            "chunk_idx": options.chunk_idx,
            "ids": [q.id for q in run.selected],
        },
        "environment": environment_info(run.model_info.device, run.model_info.device_name),
        "command": options.command,
        "batch_size": options.batch_size,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _finished_ids(journal: SampleJournal) -> set[str]:
    return {qid for qid, record in journal.records.items() if record.get("error") is None}


def _finish(run: _Run, journal: SampleJournal, options: RunOptions, started: float) -> dict:
    """Rewrite the JSONL in question order, build the result and write it (unchunked runs) and the answers file."""
    selected_ids = [q.id for q in run.selected]
    records = [journal.records[qid] for qid in selected_ids if qid in journal.records]
    summary = summarize(records, run.run_config, run.shape, num_selected=len(selected_ids))
    journal.rewrite(order=selected_ids)
    chunked = options.num_chunks > 1
    result = build_result(
        summary, journal.header, jsonl_name=run.jsonl_path.name, started=started,
        extra={"chunk": {"num_chunks": options.num_chunks, "chunk_idx": options.chunk_idx}} if chunked else None,
    )
    if options.answers_file is not None:
        write_answers_file(options.answers_file, records, run.model_info.model_path)
    if not chunked:
        if not options.overwrite:  # another process may have written it meanwhile
            check_result_file(run.result_path, run.config, overwrite=False)
        write_json_atomic(run.result_path, result)
        result["result_file"] = str(run.result_path)
    result["samples_path"] = str(run.jsonl_path)
    result["failures"] = failures(records)
    return result


def write_answers_file(path: str | os.PathLike, records: list[dict], model_id: str) -> None:
    """LLaVA's answers JSONL (`question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`), for its own
    `eval_science_qa.py`; samples that failed are left out (LLaVA then counts them FAILED)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        {"question_id": r["id"], "prompt": r.get("prompt"), "text": r["output"], "answer_id": f"{r['id']}",
         "model_id": Path(model_id).name, "metadata": {}}
        for r in records if r.get("error") is None
    ]
    write_lines_atomic(path, lines)
