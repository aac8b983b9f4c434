"""The run loop: one question at a time through greedy `generate`, timed, parsed and recorded.

- `run_sample(ctx, question, warmup)` -> the JSONL record of one question (`SampleError` for a malformed entry or
  an unreadable image).
- `run_questions(ctx, journal, selected, todo, ...)`: the questions left to do, with the pruning hooks installed
  for the whole loop, each record appended to the per-sample journal as soon as it exists, and a progress bar.
- `FirstTokenTimer`: prefill time as the time to the first generated token.
"""

from __future__ import annotations

import sys
import time
import zlib
from dataclasses import dataclass

import torch

from .answers import FAILED, is_correct, parse_answer
from .flops import DecoderShape, schedule_flops
from .prompting import build_inputs
from .run_config import RunConfig
from .run_files import SampleJournal
from .scienceqa import Question, SampleError, load_image

ON_ERROR_CHOICES = ("skip", "fail")


class EvaluationError(RuntimeError):
    """The run stopped on a bad sample (`on_error="fail"`) or cannot start."""


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


@dataclass
class SampleContext:
    """What every sample of a run shares: the model, how to prompt it, and the pruner while the loop runs."""

    model: torch.nn.Module
    processor: object
    run_config: RunConfig
    image_folder: str | None
    shape: DecoderShape
    device: torch.device
    dtype: torch.dtype
    save_selection: bool
    pruner: object | None = None


@dataclass
class _Generation:
    """One `generate` call: `output` ids [1, S + new tokens] and its seconds (prefill None when no token came)."""

    output: torch.Tensor
    prefill_s: float | None
    generate_s: float


def run_sample(ctx: SampleContext, question: Question, warmup: bool) -> dict:
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
    is_image = inputs["input_ids"][0] == ctx.model.config.image_token_id  # [S]
    seed = sample_seed(config.seed, question.id)
    if ctx.pruner is not None:
        ctx.pruner.reseed(seed)
        ctx.pruner.selections = []
    generation = _generate(ctx, inputs, seed)
    return _sample_record(ctx, question, prompt, is_image, generation, seed, warmup)


def _generate(ctx: SampleContext, inputs: dict, seed: int) -> _Generation:
    """Greedy (or seeded sampling) `generate` on `inputs` (`input_ids` [1, S], ...), timed to the first token and
    to the end, with the device synchronised around it."""
    config = ctx.run_config
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
    prefill = (timer.first_token_time - start) if timer.first_token_time is not None else None
    return _Generation(output, prefill, end - start)


def _sample_record(
    ctx: SampleContext, question: Question, prompt: str, is_image: torch.Tensor, generation: _Generation, seed: int,
    warmup: bool,
) -> dict:
    """The JSONL record of an evaluated sample; `is_image` [S] marks the prompt's image tokens."""
    num_tokens, num_image = int(is_image.shape[0]), int(is_image.sum())
    generated = generation.output[0, num_tokens:]
    text = ctx.processor.tokenizer.decode(generated, skip_special_tokens=True).strip()
    prediction = parse_answer(text)
    selections = ctx.pruner.selections if ctx.pruner is not None else []
    selection = selections[-1] if selections else None
    pruned = selection is not None
    num_kept = selection.num_kept if pruned else num_image
    stages = [(s.layer, s.num_kept) for s in selections]
    flops = schedule_flops(ctx.shape, num_tokens, num_image, stages)
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
        "prefill_s": generation.prefill_s,
        "generate_s": generation.generate_s,
        "warmup": warmup,
        "prefill_flops": flops["flops"],
        "baseline_prefill_flops": flops["baseline_flops"],
        "flops_ratio": flops["ratio"],
        "pruned_num_tokens": flops["pruned_num_tokens"],
        "kept_per_stage": [list(stage) for stage in stages] if pruned else None,
        "avg_image_tokens_per_layer": sum(flops["image_tokens_per_layer"]) / max(ctx.shape.num_layers, 1),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None,
        "seed": seed,
    }
    if ctx.save_selection:
        record["kept_image_indices"] = selection.kept_image_indices[0].tolist() if pruned else None
        record["image_scores"] = _first_stage_scores(selections[0]) if pruned else None
    return record


def _first_stage_scores(selection) -> list[float] | None:
    """The first stage's scores of the prompt's image tokens (6 significant digits), None when it had none or did
    not score every image token."""
    if selection.scores is None or selection.scores.shape[-1] != selection.candidate_image_indices.shape[-1]:
        return None
    order = selection.candidate_image_indices[0].argsort()
    return [float(f"{value:.6g}") for value in selection.scores[0, order].float().tolist()]


def error_record(question: Question, message: str) -> dict:
    """The JSONL record of a sample that could not be evaluated (counted wrong, like LLaVA's missing answers)."""
    return {
        "type": "sample", "id": question.id, "index": question.index, "image": question.image,
        "label": question.label, "prediction": None, "correct": False, "parse_failed": False, "error": message,
    }


def run_questions(
    ctx: SampleContext, journal: SampleJournal, selected: list[Question], todo: list[Question], *, on_error: str,
    progress: bool,
) -> None:
    """Evaluate `todo` (the questions of `selected` without a finished record) in order, appending each record to
    `journal` as soon as it exists. The pruning hooks are installed for the loop and removed after it, also on an
    exception. A bad sample is recorded as an error; with `on_error="fail"` it then stops the run
    (`EvaluationError`). The first sample this process evaluates is marked `warmup` (it pays for lazy
    initialisation and is left out of the timing means)."""
    from tqdm.auto import tqdm

    todo_ids = {q.id for q in todo}
    done_records = [journal.records[q.id] for q in selected if q.id not in todo_ids]
    counts = {"correct": sum(1 for r in done_records if r.get("correct")), "finished": len(done_records), "errors": 0}
    bar = tqdm(total=len(selected), initial=counts["finished"], desc=ctx.run_config.label, disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    warmed_up = False
    try:
        ctx.pruner = ctx.run_config.apply(ctx.model)
        for question in todo:
            record = _record_one(ctx, journal, question, not warmed_up, on_error)
            warmed_up = warmed_up or record["error"] is None
            counts["finished"] += 1
            counts["correct"] += int(record["correct"])
            counts["errors"] += int(record["error"] is not None)
            bar.update(1)
            bar.set_postfix(acc=f"{counts['correct'] / counts['finished']:.3f}", errors=counts["errors"],
                            refresh=False)
    finally:
        bar.close()
        if ctx.pruner is not None:
            ctx.pruner.remove()
            ctx.pruner = None


def _record_one(ctx: SampleContext, journal: SampleJournal, question: Question, warmup: bool, on_error: str) -> dict:
    """Evaluate `question` and append its record (or its error record) to `journal`; `EvaluationError` after
    recording a bad sample when `on_error="fail"`."""
    try:
        record = run_sample(ctx, question, warmup=warmup)
    except SampleError as exc:
        record = error_record(question, str(exc))
        journal.append(record)
        if on_error == "fail":
            raise EvaluationError(
                f"{exc} (recorded in {journal.path}; --on-error skip records bad samples and goes on)"
            ) from exc
        return record
    journal.append(record)
    return record
