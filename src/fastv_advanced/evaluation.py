"""ScienceQA evaluation of a LLaVA with or without FastV: the run loop, metrics, resumable outputs.

Reusable pieces (the single-run CLI and the sweep both use them):

- `load_model(...)` -> `LoadedModel(model, processor, info)`: a transformers-format LLaVA (local folder or hub id in
  the local cache) or an original-format checkpoint, on the chosen device and dtype, SDPA attention.
- `load_questions(...)` (from `scienceqa`): the question set and its identity.
- `evaluate(model, processor, questions, run_config, output_dir, ...)` -> summary dict: one sample at a time,
  greedy `generate`, the official answer parser, timing split into prefill (time to first token) and end-to-end
  generate, theoretical prefill FLOPs from the model's real shape, a per-sample JSONL flushed and fsync'd after
  every sample (resumed on re-run), and the result JSON written atomically.
- `result_file_name(run_config)`: the guide's file names.
- `merge_chunks(...)`: one result from the JSONLs of `--num-chunks` / `accelerate launch` shards.

Resume and safety: the JSONL's first line is a header with a fingerprint of everything that changes the results
(run configuration, model, dtype, device type, question-file hash). Re-running the same configuration continues
where the JSONL ends (samples that failed are retried); a JSONL or result file of a different configuration is
never mixed in or overwritten unless `overwrite=True`.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from .answers import FAILED, is_correct, parse_answer
from .config import FastVConfig
from .flops import DecoderShape, prefill_flops
from .model_loading import LoadedModel, ModelInfo, ModelSpec, inspect_model_path, load_model, model_info_from
from .model_loading import resolve_device, resolve_dtype
from .prompting import build_inputs, get_template
from .run_files import (
    FORMAT_VERSION as RESULT_FORMAT,
    ConfigurationMismatch,
    SampleJournal,
    check_result_file,
    differences,
    environment_info,
    fingerprint_of,
    write_json_atomic,
    write_lines_atomic,
)
from .scienceqa import Question, QuestionSet, SampleError, load_image, load_questions, split_chunks

__all__ = [
    "ConfigurationMismatch", "EvaluationError", "LoadedModel", "ModelInfo", "ModelSpec", "RunConfig", "SampleJournal",
    "evaluate", "format_summary", "inspect_model_path", "load_model", "load_questions", "merge_chunks",
    "resolve_device", "resolve_dtype", "result_file_name", "samples_file_name", "summarize",
]

RESULT_PREFIX = "scienceqa_results"
GUIDE_ATTENTION_RANK = 288
GUIDE_AGG_LAYER = 2
ON_ERROR_CHOICES = ("skip", "fail")
_CHUNK_SUFFIX = re.compile(r"^(?P<stem>.+)\.chunk(?P<idx>\d+)of(?P<num>\d+)\.jsonl$")


class EvaluationError(RuntimeError):
    """The run stopped on a bad sample (`on_error="fail"`) or cannot start."""


# -- run configuration and file names -------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """What one evaluation run does with a loaded model: FastV (None = baseline), prompt and generation settings.

    temperature 0 means greedy decoding. `seed` seeds the `random` strategy and sampling, per sample (mixed with the
    question id) so that a resumed or sharded run makes the same choices.
    """

    fastv: FastVConfig | None = None
    conv_mode: str = "vicuna_v1"
    single_pred_prompt: bool = False
    image_aspect_ratio: str = "pad"
    temperature: float = 0.0
    max_new_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        get_template(self.conv_mode)
        if self.image_aspect_ratio not in ("pad", "crop"):
            raise ValueError(f"image_aspect_ratio={self.image_aspect_ratio!r}: choose 'pad' or 'crop'")
        if not (self.temperature >= 0) or math.isinf(self.temperature):
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["fastv"] = self.fastv.to_dict() if self.fastv is not None else None
        return data

    @property
    def label(self) -> str:
        """A short human-readable name: `baseline` or `FastV max_head (R=288, K=2)`."""
        if self.fastv is None:
            return "baseline"
        fastv = self.fastv
        method = fastv.token_selection_method
        if method == "weighted_combination":
            method += f" alpha={fastv.weighted_alpha!r}"
        budget = f"R={fastv.attention_rank}" if fastv.attention_rank is not None else f"ratio={_keep_ratio(fastv)!r}"
        return f"FastV {method} ({budget}, K={fastv.agg_layer})"


def _keep_ratio(fastv: FastVConfig) -> float:
    return 0.5 if fastv.keep_ratio is None else float(fastv.keep_ratio)


def result_stem(run_config: RunConfig) -> str:
    """The guide's result name without `.json`.

    `scienceqa_results_baseline`, `scienceqa_results_fastv_{method}`, `..._weighted_combination_alpha0.7`;
    `_rank{R}_k{K}` is appended when R != 288 or K != 2 (`_ratio{r}_k{K}` for a keep ratio). A
    `package.module:function` method has its `:` replaced by `-`.
    """
    fastv = run_config.fastv
    if fastv is None:
        return f"{RESULT_PREFIX}_baseline"
    method = re.sub(r"[^A-Za-z0-9_.-]", "-", fastv.token_selection_method)
    stem = f"{RESULT_PREFIX}_fastv_{method}"
    if fastv.token_selection_method == "weighted_combination":
        stem += f"_alpha{float(fastv.weighted_alpha)!r}"
    if fastv.attention_rank is None:
        stem += f"_ratio{_keep_ratio(fastv)!r}_k{fastv.agg_layer}"
    elif fastv.attention_rank != GUIDE_ATTENTION_RANK or fastv.agg_layer != GUIDE_AGG_LAYER:
        stem += f"_rank{fastv.attention_rank}_k{fastv.agg_layer}"
    return stem


def result_file_name(run_config: RunConfig) -> str:
    """The guide's result file name, e.g. `scienceqa_results_fastv_max_head.json`."""
    return result_stem(run_config) + ".json"


def samples_file_name(run_config: RunConfig, num_chunks: int = 1, chunk_idx: int = 0) -> str:
    """The per-sample JSONL beside the result: `<stem>.jsonl`, or `<stem>.chunk{i}of{n}.jsonl` for a chunk."""
    stem = result_stem(run_config)
    return f"{stem}.jsonl" if num_chunks == 1 else f"{stem}.chunk{chunk_idx}of{num_chunks}.jsonl"


def fingerprint_config(run_config: RunConfig, model_info: ModelInfo, questions: QuestionSet) -> dict:
    """Everything that changes the per-sample results (not the sample count, chunking or output options)."""
    run = run_config.to_dict()
    if run["fastv"] is not None:
        # The guide's expected span only triggers a warning (the detected span is used), and the built-in
        # strategies other than weighted_combination ignore alpha: none of them changes a result.
        fastv = dict(run["fastv"])
        del fastv["sys_length"], fastv["image_token_length"]
        if fastv["token_selection_method"] in ("max_head", "avg_all_heads", "random"):
            del fastv["weighted_alpha"]
        run["fastv"] = fastv
    return {
        "protocol": RESULT_FORMAT,
        "run": run,
        "model": {
            "path": model_info.model_path,
            "base": model_info.model_base,
            "format": model_info.format,
            "dtype": model_info.dtype,
            "device_type": torch.device(model_info.device).type,
        },
        "questions": {"format": questions.format, "split": questions.split, "sha256": questions.sha256},
    }


# -- timing ---------------------------------------------------------------------------------------------------------


class FirstTokenTimer:
    """A `generate` streamer that notes when the first new token exists (time to first token = prefill).

    `generate` calls `put()` once with the prompt, then once per generated token; the second call marks the first
    token. On GPU the device is synchronised first, so the time covers the kernels of the prefill.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.calls = 0
        self.first_token_time: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            _synchronize(self.device)
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_seed(seed: int, question_id: str) -> int:
    """A per-sample seed that depends only on the run seed and the question id (stable across resume/shards)."""
    return zlib.crc32(f"{seed}:{question_id}".encode())


# -- one sample -----------------------------------------------------------------------------------------------------


@dataclass
class _RunContext:
    model: torch.nn.Module
    processor: object
    run_config: RunConfig
    image_folder: str | None
    shape: DecoderShape
    device: torch.device
    dtype: torch.dtype
    save_selection: bool
    pruner: object | None = None


def run_sample(ctx: _RunContext, question: Question, warmup: bool) -> dict:
    """Evaluate one question; raises `SampleError` for a malformed entry or an unreadable image."""
    if question.error is not None:
        raise SampleError(question.error)
    config = ctx.run_config
    image = load_image(ctx.image_folder, question)
    prompt, inputs = build_inputs(
        question.text, image, ctx.processor, ctx.model.config, config.single_pred_prompt, config.conv_mode,
        config.image_aspect_ratio,
    )
    inputs = {k: v.to(ctx.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(ctx.dtype)
    input_ids = inputs["input_ids"]  # [1, S]
    is_image = input_ids[0] == ctx.model.config.image_token_id
    num_tokens, num_image = int(input_ids.shape[1]), int(is_image.sum())

    seed = sample_seed(config.seed, question.id)
    if ctx.pruner is not None:
        ctx.pruner.reseed(seed)
        ctx.pruner.last_selection = None
    generation = {"max_new_tokens": config.max_new_tokens, "do_sample": config.temperature > 0}
    if config.temperature > 0:
        generation["temperature"] = config.temperature
        torch.manual_seed(seed)
    tokenizer = ctx.processor.tokenizer
    if tokenizer.pad_token_id is not None:
        generation["pad_token_id"] = tokenizer.pad_token_id
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)

    timer = FirstTokenTimer(ctx.device)
    _synchronize(ctx.device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = ctx.model.generate(**inputs, **generation, streamer=timer)
    _synchronize(ctx.device)
    end = time.perf_counter()

    generated = output[0, num_tokens:]
    text = tokenizer.decode(generated, skip_special_tokens=True).strip()
    prediction = parse_answer(text)
    selection = ctx.pruner.last_selection if ctx.pruner is not None else None
    pruned = selection is not None
    num_kept = selection.num_kept if pruned else num_image
    flops = prefill_flops(
        ctx.shape, num_tokens, num_image, num_kept if pruned else None,
        ctx.run_config.fastv.agg_layer if pruned else None,
    )
    record = {
        "type": "sample",
        "id": question.id,
        "index": question.index,
        "image": question.image,
        "prompt": prompt,
        "output": text,
        "prediction": prediction,
        "label": question.label,
        "correct": is_correct(prediction, question.label),
        "parse_failed": prediction == FAILED,
        "error": None,
        "num_tokens": num_tokens,
        "num_image_tokens": num_image,
        "num_kept_image_tokens": num_kept,
        "pruned": pruned,
        "image_start": int(is_image.nonzero()[0]) if num_image else None,
        "head_index": int(selection.head_index[0]) if pruned and selection.head_index is not None else None,
        "num_generated_tokens": int(generated.shape[0]),
        "prefill_s": (timer.first_token_time - start) if timer.first_token_time is not None else None,
        "generate_s": end - start,
        "warmup": warmup,
        "prefill_flops": flops["flops"],
        "baseline_prefill_flops": flops["baseline_flops"],
        "flops_ratio": flops["ratio"],
        "pruned_num_tokens": flops["pruned_num_tokens"],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None,
        "seed": seed,
    }
    if ctx.save_selection:
        record["kept_image_indices"] = selection.kept_image_indices[0].tolist() if pruned else None
    return record


def error_record(question: Question, message: str) -> dict:
    """The JSONL record of a sample that could not be evaluated (counted wrong, like LLaVA's missing answers)."""
    return {
        "type": "sample", "id": question.id, "index": question.index, "image": question.image,
        "label": question.label, "prediction": None, "correct": False, "parse_failed": False, "error": message,
    }


# -- summary --------------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(
    records: list[dict], run_config: RunConfig, shape: DecoderShape, *, num_selected: int | None = None
) -> dict:
    """Metrics over the records of one run (records with `error` count as wrong, as LLaVA counts missing answers).

    `accuracy` = correct / all samples; `avg_latency` = mean end-to-end `generate` seconds of the timed samples
    (warm-up samples left out unless nothing else was timed).
    """
    ok = [r for r in records if r.get("error") is None]
    errors = [r for r in records if r.get("error") is not None]
    correct = sum(1 for r in ok if r["correct"])
    total = len(records)
    timed = [r for r in ok if not r.get("warmup")]
    warmup_only = not timed and bool(ok)
    if warmup_only:
        timed = ok
    prefill = [r["prefill_s"] for r in timed if r.get("prefill_s") is not None]
    generate = [r["generate_s"] for r in timed]
    flops = [r["prefill_flops"] for r in ok]
    baseline = [r["baseline_prefill_flops"] for r in ok]
    memory = [r["peak_memory_bytes"] for r in ok if r.get("peak_memory_bytes") is not None]
    with_image = [r for r in ok if r["num_image_tokens"]]
    fastv = run_config.fastv
    summary = {
        "accuracy": correct / total if total else 0.0,
        "avg_latency": _mean(generate),
        "total_samples": total,
        "correct_samples": correct,
        "evaluated_samples": len(ok),
        "parse_failures": sum(1 for r in ok if r["parse_failed"]),
        "errors": len(errors),
        "accuracy_excluding_errors": correct / len(ok) if ok else None,
        "complete": num_selected is None or total == num_selected,
        "latency": {
            "unit": "seconds",
            "prefill_mean": _mean(prefill),
            "prefill_median": _median(prefill),
            "generate_mean": _mean(generate),
            "generate_median": _median(generate),
            "timed_samples": len(generate),
            "warmup_samples_excluded": 0 if warmup_only else sum(1 for r in ok if r.get("warmup")),
            "prefill_is": "time to first token of generate (vision tower + decoder prefill + first token)",
            "generate_is": "end-to-end generate (greedy, max_new_tokens=%d)" % run_config.max_new_tokens,
        },
        "tokens": {
            "avg_prompt_tokens": _mean([r["num_tokens"] for r in ok]),
            "avg_tokens_after_pruning": _mean([r["pruned_num_tokens"] for r in ok]),
            "avg_generated_tokens": _mean([r["num_generated_tokens"] for r in ok]),
            "samples_with_image": len(with_image),
            "avg_image_tokens": _mean([r["num_image_tokens"] for r in with_image]),  # over samples with an image
            "avg_kept_image_tokens": _mean([r["num_kept_image_tokens"] for r in with_image]),
        },
        "flops_info": {
            "flops_ratio": sum(flops) / sum(baseline) if sum(baseline) else 1.0,
            "mean_sample_flops_ratio": _mean([r["flops_ratio"] for r in ok]),
            "avg_prefill_flops": _mean(flops),
            "avg_baseline_prefill_flops": _mean(baseline),
            "total_prefill_flops": sum(flops),
            "total_baseline_prefill_flops": sum(baseline),
            "agg_layer": fastv.agg_layer if fastv else None,
            "attention_rank": fastv.attention_rank if fastv else None,
            "decoder_shape": asdict(shape),
            "method": "theoretical decoder prefill FLOPs per sample from the model's shape and the sample's real "
            "token counts: K*f(n) + (L-K)*f(n'), f(n) = 2*(n*d*(2*q+2*kv) + 2*n^2*q + 3*n*d*m) (SwiGLU, GQA); "
            "flops_ratio = sum over samples / unpruned sum (baseline = 1.0)",
        },
        "peak_gpu_memory_bytes": max(memory) if memory else None,
    }
    return summary


def model_config_section(run_config: RunConfig, model_info: ModelInfo) -> dict:
    """The guide's `model_config`: its flag names and values, plus the model and generation settings."""
    fastv = run_config.fastv
    return {
        "model_path": model_info.model_path,
        "model_base": model_info.model_base,
        "model_format": model_info.format,
        "conv_mode": run_config.conv_mode,
        "single_pred_prompt": run_config.single_pred_prompt,
        "use_fast_v": fastv is not None,
        "fast_v_sys_length": fastv.sys_length if fastv else None,
        "fast_v_image_token_length": fastv.image_token_length if fastv else None,
        "fast_v_attention_rank": fastv.attention_rank if fastv else None,
        "fast_v_keep_ratio": fastv.keep_ratio if fastv else None,
        "fast_v_agg_layer": fastv.agg_layer if fastv else None,
        "fast_v_token_selection_method": fastv.token_selection_method if fastv else None,
        "fast_v_weighted_alpha": fastv.weighted_alpha if fastv else None,
        "temperature": run_config.temperature,
        "max_new_tokens": run_config.max_new_tokens,
        "image_aspect_ratio": run_config.image_aspect_ratio,
        "seed": run_config.seed,
        "dtype": model_info.dtype,
        "device": model_info.device,
        "num_layers": model_info.num_layers,
        "num_image_tokens": model_info.num_image_tokens,
        "image_processor": model_info.image_processor,
    }


def build_result(summary: dict, header: dict, *, jsonl_name: str, started: float | None, extra: dict | None = None):
    """The result file's content: the summary, then what the run was (configuration, data, environment)."""
    result = dict(summary)
    result.update(
        {
            "result_format": RESULT_FORMAT,
            "label": header["label"],
            "model_config": header["model_config"],
            "question_file": header["questions"],
            "image_folder": header.get("image_folder"),
            "num_samples_requested": header["selection"].get("num_samples"),
            "seed": header["config"]["run"]["seed"],
            "environment": header["environment"],
            "command": header.get("command"),
            "samples_file": jsonl_name,
            "fingerprint": header["fingerprint"],
            "fingerprint_config": header["config"],
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    if started is not None:
        result["wall_time_s"] = time.time() - started
    if extra:
        result.update(extra)
    return result


def format_summary(result: dict, result_path: str | None = None) -> str:
    """A short printable summary of a result."""

    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    latency, tokens, flops = result["latency"], result["tokens"], result["flops_info"]
    lines = [
        f"ScienceQA - {result.get('label', '')}: {result['total_samples']} samples"
        + ("" if result.get("complete", True) else " (INCOMPLETE)"),
        f"  accuracy      {result['accuracy']:.4f}  ({result['correct_samples']}/{result['total_samples']} correct; "
        f"parse failures {result['parse_failures']}; errors {result['errors']})",
        f"  latency       prefill mean {fmt(latency['prefill_mean'])} s, median {fmt(latency['prefill_median'])} s; "
        f"generate mean {fmt(latency['generate_mean'])} s, median {fmt(latency['generate_median'])} s "
        f"({latency['timed_samples']} timed, {latency['warmup_samples_excluded']} warm-up excluded)",
        f"  image tokens  {fmt(tokens['avg_image_tokens'], '.1f')} seen, {fmt(tokens['avg_kept_image_tokens'], '.1f')} "
        f"kept (mean over the {tokens['samples_with_image']} samples with an image)",
        f"  prefill FLOPs ratio {flops['flops_ratio']:.4f} ({fmt(flops['avg_prefill_flops'], '.4g')} vs "
        f"{fmt(flops['avg_baseline_prefill_flops'], '.4g')} unpruned, mean per sample)",
    ]
    if result.get("peak_gpu_memory_bytes"):
        lines.append(f"  peak GPU memory {result['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")
    if result_path:
        lines.append(f"  results       {result_path} (per sample: {result.get('samples_file')})")
    return "\n".join(lines)


# -- the run loop ---------------------------------------------------------------------------------------------------


def check_run(
    model_spec_layers: int | None, model_spec_image_tokens: int | None, run_config: RunConfig
) -> list[str]:
    """Inconsistencies between a FastV configuration and a model's shape (empty when fine)."""
    problems = []
    fastv = run_config.fastv
    if fastv is None:
        return problems
    if model_spec_layers is not None and not 1 <= fastv.agg_layer < model_spec_layers:
        problems.append(
            f"--fast-v-agg-layer {fastv.agg_layer} is outside [1, {model_spec_layers - 1}]: the model has "
            f"{model_spec_layers} decoder layers"
        )
    if (
        model_spec_image_tokens is not None
        and fastv.attention_rank is not None
        and fastv.attention_rank > model_spec_image_tokens
    ):
        problems.append(
            f"--fast-v-attention-rank {fastv.attention_rank} is larger than the model's {model_spec_image_tokens} "
            f"image tokens (allowed: 0 to {model_spec_image_tokens})"
        )
    return problems


def evaluate(
    model: torch.nn.Module,
    processor,
    questions: QuestionSet,
    run_config: RunConfig,
    output_dir: str | os.PathLike = ".",
    *,
    image_folder: str | os.PathLike | None = None,
    model_info: ModelInfo | None = None,
    overwrite: bool = False,
    on_error: str = "skip",
    save_selection: bool = False,
    num_chunks: int = 1,
    chunk_idx: int = 0,
    num_samples: int | None = None,
    answers_file: str | os.PathLike | None = None,
    command: str | None = None,
    progress: bool = True,
    write_result: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluate `questions` (already cut to `--num-samples`; chunked here) and return the result dict.

    Writes `<output_dir>/<stem>.jsonl` (per sample, resumed) and, for an unchunked run, `<output_dir>/<stem>.json`
    atomically. With `num_chunks > 1` only the chunk's JSONL `<stem>.chunk{i}of{n}.jsonl` is written; merge them
    with `merge_chunks`. Raises `ConfigurationMismatch` before evaluating anything when existing files belong to
    another configuration, `EvaluationError` on a bad sample with `on_error="fail"`.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error={on_error!r}: choose one of {ON_ERROR_CHOICES}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx {chunk_idx} must be in [0, {num_chunks - 1}] for --num-chunks {num_chunks}")
    started = time.time()
    model_info = model_info or model_info_from(model, processor)
    problems = check_run(model_info.num_layers, model_info.num_image_tokens, run_config)
    if problems:
        raise ValueError("; ".join(problems))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    selected = split_chunks(questions.questions, num_chunks)[chunk_idx]
    if on_error == "fail":
        for question in selected:
            if question.error:
                raise EvaluationError(question.error)

    config = fingerprint_config(run_config, model_info, questions)
    fingerprint = fingerprint_of(config)
    result_path = output_dir / result_file_name(run_config)
    jsonl_path = output_dir / samples_file_name(run_config, num_chunks, chunk_idx)
    if write_result:  # a chunk's result file is written by the merge, under the same name: refuse early too
        check_result_file(result_path, config, overwrite)
    shape = DecoderShape.from_text_config(model.config.text_config)
    header = {
        "type": "header",
        "result_format": RESULT_FORMAT,
        "fingerprint": fingerprint,
        "config": config,
        "label": run_config.label,
        "result_name": result_file_name(run_config),
        "model_config": model_config_section(run_config, model_info),
        "questions": questions.identity(),
        "image_folder": str(Path(image_folder).resolve()) if image_folder is not None else None,
        "decoder_shape": asdict(shape),
        "selection": {
            "num_samples": num_samples,
            "num_chunks": num_chunks,
            "chunk_idx": chunk_idx,
            "ids": [q.id for q in selected],
        },
        "environment": environment_info(model_info.device, model_info.device_name),
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    journal = SampleJournal.open(jsonl_path, header, overwrite)
    done = {qid for qid, r in journal.records.items() if r.get("error") is None}
    todo = [q for q in selected if q.id not in done]
    if len(todo) < len(selected):
        log(f"resuming from {jsonl_path}: {len(selected) - len(todo)} of {len(selected)} samples already done")

    parameter = next(model.parameters())
    ctx = _RunContext(
        model, processor, run_config, None if image_folder is None else str(image_folder), shape,
        parameter.device, parameter.dtype, save_selection,
    )
    selected_ids = [q.id for q in selected]
    _run_loop(ctx, journal, selected, todo, on_error, progress, run_config)

    records = [journal.records[qid] for qid in selected_ids if qid in journal.records]
    summary = summarize(records, run_config, shape, num_selected=len(selected))
    journal.rewrite(order=selected_ids)
    result = build_result(
        summary, journal.header, jsonl_name=jsonl_path.name, started=started,
        extra={"chunk": {"num_chunks": num_chunks, "chunk_idx": chunk_idx}} if num_chunks > 1 else None,
    )
    if answers_file is not None:
        write_answers_file(answers_file, records, model_info.model_path)
    if write_result and num_chunks == 1:
        if not overwrite:  # another process may have written it meanwhile
            check_result_file(result_path, config, overwrite=False)
        write_json_atomic(result_path, result)
        result["result_file"] = str(result_path)
    result["samples_path"] = str(jsonl_path)
    return result


def _run_loop(ctx: _RunContext, journal: SampleJournal, selected, todo, on_error, progress, run_config) -> None:
    from tqdm.auto import tqdm

    todo_ids = {q.id for q in todo}
    done_records = [journal.records[q.id] for q in selected if q.id not in todo_ids]
    correct = sum(1 for r in done_records if r.get("correct"))
    finished = len(done_records)
    errors = 0
    bar = tqdm(total=len(selected), initial=finished, desc=run_config.label, disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    pruner_cm = None
    if run_config.fastv is not None:
        from .pruning import apply_fastv

        pruner_cm = apply_fastv(ctx.model, run_config.fastv)
        ctx.pruner = pruner_cm
    warmed_up = False  # the first sample this process times pays for lazy initialisation: left out of averages
    try:
        for question in todo:
            try:
                record = run_sample(ctx, question, warmup=not warmed_up)
                warmed_up = True
            except SampleError as exc:
                record = error_record(question, str(exc))
                journal.append(record)
                errors += 1
                if on_error == "fail":
                    raise EvaluationError(
                        f"{exc} (recorded in {journal.path}; --on-error skip records bad samples and goes on)"
                    ) from exc
            else:
                journal.append(record)
                correct += int(record["correct"])
            finished += 1
            bar.update(1)
            bar.set_postfix(acc=f"{correct / finished:.3f}", errors=errors, refresh=False)
    finally:
        bar.close()
        if pruner_cm is not None:
            pruner_cm.remove()
            ctx.pruner = None


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


# -- chunks ---------------------------------------------------------------------------------------------------------


def find_chunk_files(directory: str | os.PathLike, stem: str | None = None) -> dict[str, list[Path]]:
    """Chunk JSONLs in `directory`, grouped by result stem (`<stem>.chunk{i}of{n}.jsonl`)."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(Path(directory).glob("*.chunk*of*.jsonl")):
        match = _CHUNK_SUFFIX.match(path.name)
        if match and (stem is None or match["stem"] == stem):
            groups.setdefault(match["stem"], []).append(path)
    return groups


def merge_chunks(
    paths: list[str | os.PathLike],
    output_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    allow_partial: bool = False,
    command: str | None = None,
) -> dict:
    """Merge the per-chunk JSONLs of one configuration into `<stem>.jsonl` + the result `<stem>.json`.

    Every chunk of the run must be there, with the same fingerprint, and complete (each id of its selection has
    a record) unless `allow_partial`. Returns the result dict (with `result_file`).
    """
    if not paths:
        raise ValueError("no chunk files to merge")
    chunks = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"chunk file {path} does not exist")
        header, records = SampleJournal.read(path)
        chunks.append((path, header, records))
    first_path, first, _ = chunks[0]
    num_chunks = first["selection"]["num_chunks"]
    seen_idx: dict[int, Path] = {}
    for path, header, _ in chunks:
        if header["fingerprint"] != first["fingerprint"]:
            raise ConfigurationMismatch(
                f"{path} and {first_path} are chunks of different configurations: "
                + "; ".join(differences(header["config"], first["config"])[:6])
            )
        selection = header["selection"]
        if selection["num_chunks"] != num_chunks or selection.get("num_samples") != first["selection"].get(
            "num_samples"
        ):
            raise ValueError(
                f"{path} is chunk {selection['chunk_idx']} of {selection['num_chunks']} "
                f"(num_samples {selection.get('num_samples')}), {first_path} of {num_chunks} "
                f"(num_samples {first['selection'].get('num_samples')}): not the same split"
            )
        if selection["chunk_idx"] in seen_idx:
            raise ValueError(f"{path} and {seen_idx[selection['chunk_idx']]} are both chunk {selection['chunk_idx']}")
        seen_idx[selection["chunk_idx"]] = path
    missing_chunks = sorted(set(range(num_chunks)) - set(seen_idx))
    if missing_chunks and not allow_partial:
        raise ValueError(f"chunks {missing_chunks} of {num_chunks} are missing (have: {sorted(seen_idx)})")
    chunks.sort(key=lambda item: item[1]["selection"]["chunk_idx"])
    selected_ids: list[str] = []
    merged: dict[str, dict] = {}
    incomplete = []
    for path, header, records in chunks:
        ids = header["selection"]["ids"]
        selected_ids += ids
        lacking = [qid for qid in ids if qid not in records]
        if lacking:
            incomplete.append(f"{path.name}: {len(lacking)} of {len(ids)} samples missing")
        merged.update({qid: records[qid] for qid in ids if qid in records})
    if incomplete and not allow_partial:
        raise ValueError(
            "incomplete chunks (re-run them to resume, or pass --allow-partial): " + "; ".join(incomplete)
        )
    if len(set(selected_ids)) != len(selected_ids):
        raise ValueError("the chunks' selections overlap: a question id appears in two chunks")

    output_dir = Path(output_dir) if output_dir is not None else first_path.parent
    output_dir.mkdir(parents=True, exist_ok=True)
    result_path = output_dir / first["result_name"]
    jsonl_path = result_path.with_suffix(".jsonl")
    check_result_file(result_path, first["config"], overwrite)
    if jsonl_path.exists() and not overwrite:
        try:
            existing, _ = SampleJournal.read(jsonl_path)
        except ValueError:
            existing = {}
        if existing.get("fingerprint") != first["fingerprint"]:
            raise ConfigurationMismatch(
                f"{jsonl_path} holds per-sample results of a different configuration; pass --overwrite to replace "
                "it, or --output-dir to merge elsewhere"
            )
    run = first["config"]["run"]
    run_config = RunConfig(
        fastv=FastVConfig(**run["fastv"]) if run["fastv"] is not None else None,
        **{k: v for k, v in run.items() if k != "fastv"},
    )
    shape = DecoderShape(**first["decoder_shape"])
    records = [merged[qid] for qid in selected_ids if qid in merged]
    summary = summarize(records, run_config, shape, num_selected=len(selected_ids))
    header = dict(first)
    header["selection"] = {
        "num_samples": first["selection"].get("num_samples"), "num_chunks": 1, "chunk_idx": 0, "ids": selected_ids,
        "merged_from": [str(p) for p, _, _ in chunks],
    }
    if command is not None:
        header["command"] = command
    write_lines_atomic(jsonl_path, [header] + records)
    result = build_result(
        summary, header, jsonl_name=jsonl_path.name, started=None,
        extra={"merged_from_chunks": {"num_chunks": num_chunks, "files": [p.name for p, _, _ in chunks],
                                      "commands": [h.get("command") for _, h, _ in chunks]}},
    )
    write_json_atomic(result_path, result)
    result["result_file"] = str(result_path)
    return result

