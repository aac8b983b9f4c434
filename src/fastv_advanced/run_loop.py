"""The run loop: one question at a time through greedy `generate`, timed, parsed and recorded.

- `run_sample(ctx, question, warmup)` -> the JSONL record of one question (`SampleError` for a malformed entry or
  an unreadable image).
- `run_questions(ctx, journal, selected, todo, ...)`: the questions left to do, with the pruning hooks installed
  for the whole loop, each record appended to the per-sample journal as soon as it exists, and a progress bar.
  With `batch_size` > 1 the questions are grouped into left-padded batches (`plan_batches`: same kind, image or
  text-only, similar numbers of image tokens and prompt lengths) and each batch is one `generate`
  (`run_batch`); the records are the same as one question at a time, with the batch's timings.
- Prompts come from `ctx.prompts` (`prompting.prompts_for`): the guide's protocol for LLaVA-1.5, the processor's
  chat template for the other families.
- `FirstTokenTimer`: prefill time as the time to the first generated token.
"""

from __future__ import annotations

import sys
import time
import zlib
from dataclasses import dataclass

import torch

from .answers import FAILED, is_correct, parse_answer
from .flops import DecoderShape, schedule_flops, vision_flops_per_row
from .prompting import prompts_for
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
    prompts: object | None = None  # prompting.GuidePrompts or ChatPrompts; chosen for the model when not given

    def __post_init__(self) -> None:
        if self.prompts is None:
            self.prompts = prompts_for(self.model.config, self.processor, self.run_config)


@dataclass
class _Generation:
    """One `generate` call: `output` ids [batch, S + new tokens] and its seconds (prefill None when no token
    came)."""

    output: torch.Tensor
    prefill_s: float | None
    generate_s: float


def run_sample(ctx: SampleContext, question: Question, warmup: bool) -> dict:
    """Evaluate one question; raises `SampleError` for a malformed entry or an unreadable image."""
    if question.error is not None:
        raise SampleError(question.error)
    image = load_image(ctx.image_folder, question)
    prompt, ids, inputs = ctx.prompts.encode(question.text, image, question.image is not None)
    records, _ = _run_inputs(ctx, [_planned(ctx, question, prompt, ids)], inputs, [0], warmup)
    return records[0]


@dataclass
class PlannedQuestion:
    """A question of a batched run, tokenized before its image is read: `ids` is its prompt's token ids (image
    tokens expanded), which decide the batch it joins."""

    question: Question
    prompt: str
    ids: list[int]
    num_image_tokens: int

    @property
    def has_image(self) -> bool:
        return self.question.image is not None


def _planned(ctx: SampleContext, question: Question, prompt: str, ids: list[int]) -> PlannedQuestion:
    image_token_id = ctx.model.config.image_token_id
    return PlannedQuestion(question, prompt, ids, sum(1 for token in ids if token == image_token_id))


def plan_questions(ctx: SampleContext, questions: list[Question], on_error=None) -> list[PlannedQuestion]:
    """Prompts and token ids of `questions` (without a malformed entry's), in the given order. Where the token ids
    depend on the image (`ctx.prompts.needs_image`) the image is read here, and a question whose image cannot be
    read goes to `on_error(question, SampleError)` (or raises without it)."""
    planned = []
    for question in questions:
        if question.error is not None:
            continue
        image = None
        if ctx.prompts.needs_image:
            try:
                image = load_image(ctx.image_folder, question)
            except SampleError as exc:
                if on_error is None:
                    raise
                on_error(question, exc)
                continue
        prompt, ids = ctx.prompts.token_ids(question.text, image, question.image is not None)
        planned.append(_planned(ctx, question, prompt, ids))
    return planned


def plan_batches(planned: list[PlannedQuestion], batch_size: int) -> list[list[PlannedQuestion]]:
    """Batches of at most `batch_size` questions, each of one kind (all with an image or all text-only: text-only
    batches run unpruned, without pixel values). Rows may hold different numbers of image tokens (anyres and
    dynamic-resolution images: the pruner gives each row its own budget); sorting by that count, then by prompt
    length, keeps the padding small.

    The order is deterministic: questions with an image first, most image tokens first, longest prompt first (the
    most memory-hungry batch runs first, so a batch size that does not fit fails at once), ties in the given order.
    """
    order = sorted(range(len(planned)), key=lambda i: (not planned[i].has_image, -planned[i].num_image_tokens,
                                                       -len(planned[i].ids), i))
    batches: list[list[PlannedQuestion]] = []
    for index in order:
        item = planned[index]
        last = batches[-1][0] if batches else None
        if last is not None and len(batches[-1]) < batch_size and last.has_image == item.has_image:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def run_batch(ctx: SampleContext, batch: list[PlannedQuestion], images: list, warmup: bool) -> tuple[list[dict], bool]:
    """Evaluate `batch` (with its loaded `images`, None for text-only) as one left-padded greedy `generate`.

    Returns one record per question, in batch order, each as `run_sample` would write it, with the batch's
    `prefill_s` and `generate_s` and its `batch_size`, and whether the pruning method drew random numbers. The
    pruner chooses each row's tokens; the generator randomised methods use is seeded with the first row's seed
    only, so for such a method only a batch of one matches `run_sample` (`run_questions` then goes one at a time).
    """
    inputs, pads = ctx.prompts.batch([(item.prompt, item.ids) for item in batch], images)  # tokenized when planned
    return _run_inputs(ctx, batch, inputs, pads, warmup)


def device_inputs(inputs: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    """Model inputs on `device`, with `pixel_values` in the model's `dtype`."""
    moved = {key: value.to(device) for key, value in inputs.items()}
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


def _run_inputs(ctx: SampleContext, batch: list[PlannedQuestion], inputs: dict, pads: list[int],
                warmup: bool) -> tuple[list[dict], bool]:
    """`run_batch` on inputs already built (`input_ids` [B, S], ...; `pads` left padding per row)."""
    config = ctx.run_config
    vision_flops = vision_flops_per_row(ctx.model.config, inputs) or [None] * len(batch)
    inputs = device_inputs(inputs, ctx.device, ctx.dtype)
    seeds = [sample_seed(config.seed, item.question.id) for item in batch]
    state = None
    if ctx.pruner is not None:
        ctx.pruner.reseed(seeds[0])
        ctx.pruner.selections = []
        state = ctx.pruner.generator.get_state()
    generation = _generate(ctx, inputs, seeds[0])
    drew_random = state is not None and not torch.equal(state, ctx.pruner.generator.get_state())
    records = []
    for row, (item, pad, seed) in enumerate(zip(batch, pads, seeds)):
        is_image = torch.tensor(item.ids) == ctx.model.config.image_token_id  # [S] of the unpadded prompt
        records.append(_sample_record(ctx, item.question, item.prompt, is_image, generation, seed, warmup,
                                      row=row, pad=pad, batch_size=len(batch), vision_flops=vision_flops[row]))
    return records, drew_random


def _generate(ctx: SampleContext, inputs: dict, seed: int) -> _Generation:
    """Greedy (or seeded sampling) `generate` on `inputs` (`input_ids` [batch, S], ...), timed to the first token
    and to the end, with the device synchronised around it."""
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
    warmup: bool, *, row: int = 0, pad: int = 0, batch_size: int = 1, vision_flops: int | None = None,
) -> dict:
    """The JSONL record of an evaluated sample; `is_image` [S] marks the prompt's image tokens. In a batch the
    sample is row `row` of the output, after `pad` padding tokens; its answer ends at its first EOS (the rows
    that finished earlier are padded while the others go on)."""
    num_tokens, num_image = int(is_image.shape[0]), int(is_image.sum())
    generated = generation.output[row, pad + num_tokens:]
    if batch_size > 1:
        generated = _up_to_eos(generated, _eos_ids(ctx.model))
    text = ctx.processor.tokenizer.decode(generated, skip_special_tokens=True).strip()
    prediction = parse_answer(text)
    selections = ctx.pruner.selections if ctx.pruner is not None else []
    selection = selections[-1] if selections else None
    pruned = selection is not None
    num_kept = selection.num_kept_per_row[row] if pruned else num_image
    stages = [(s.layer, s.num_kept_per_row[row]) for s in selections]
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
        "head_index": int(selection.head_index[row]) if pruned and selection.head_index is not None else None,
        "num_generated_tokens": int(generated.shape[0]),
        "prefill_s": generation.prefill_s,
        "generate_s": generation.generate_s,
        "batch_size": batch_size,
        "warmup": warmup,
        "prefill_flops": flops["flops"],
        "baseline_prefill_flops": flops["baseline_flops"],
        "flops_ratio": flops["ratio"],
        "pruned_num_tokens": flops["pruned_num_tokens"],
        "vision_flops": vision_flops,
        "kept_per_stage": [list(stage) for stage in stages] if pruned else None,
        "avg_image_tokens_per_layer": sum(flops["image_tokens_per_layer"]) / max(ctx.shape.num_layers, 1),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None,
        "seed": seed,
    }
    if ctx.save_selection:
        record["kept_image_indices"] = selection.kept_in_row(row).tolist() if pruned else None
        record["image_scores"] = _first_stage_scores(selections[0], row) if pruned else None
    return record


def _eos_ids(model: torch.nn.Module) -> set[int]:
    """The token ids that end an answer (`generation_config.eos_token_id`, one or a list)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(token) for token in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _up_to_eos(generated: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """`generated` [T] up to and including its first EOS (what `generate` returns for the row alone)."""
    for index, token in enumerate(generated.tolist()):
        if token in eos_ids:
            return generated[: index + 1]
    return generated


def _first_stage_scores(selection, row: int = 0) -> list[float] | None:
    """The first stage's scores of the prompt's image tokens in batch row `row` (6 significant digits), None when
    it had none or did not score every image token."""
    row_scores = selection.scores_in_row(row)
    if row_scores is None:
        return None
    scores, candidates = row_scores
    return [float(f"{value:.6g}") for value in scores[candidates.argsort()].float().tolist()]


def error_record(question: Question, message: str) -> dict:
    """The JSONL record of a sample that could not be evaluated (counted wrong, like LLaVA's missing answers)."""
    return {
        "type": "sample", "id": question.id, "index": question.index, "image": question.image,
        "label": question.label, "prediction": None, "correct": False, "parse_failed": False, "error": message,
    }


def run_questions(
    ctx: SampleContext, journal: SampleJournal, selected: list[Question], todo: list[Question], *, on_error: str,
    progress: bool, batch_size: int = 1, log=print,
) -> None:
    """Evaluate `todo` (the questions of `selected` without a finished record), appending each record to `journal`
    as soon as it exists. The pruning hooks are installed for the loop and removed after it, also on an
    exception. A bad sample is recorded as an error; with `on_error="fail"` it then stops the run
    (`EvaluationError`). The first sample this process evaluates is marked `warmup` (it pays for lazy
    initialisation and is left out of the timing means).

    `batch_size` 1 evaluates `todo` in order, one question per `generate`. A larger one evaluates `plan_batches`
    batches (each question's record written when its batch ends; the first batch is the warm-up). Batching is
    left for one question at a time, with a note through `log`, where it would change results: sampling
    (temperature > 0, seeded per question) and a pruning method that draws random numbers (seeded per question;
    found when the first batch draws any, which is then evaluated again one question at a time).
    """
    from tqdm.auto import tqdm

    todo_ids = {q.id for q in todo}
    done_records = [journal.records[q.id] for q in selected if q.id not in todo_ids]
    counts = {"correct": sum(1 for r in done_records if r.get("correct")), "finished": len(done_records), "errors": 0}
    bar = tqdm(total=len(selected), initial=counts["finished"], desc=ctx.run_config.label, disable=not progress,
               dynamic_ncols=True, file=sys.stderr)

    def count(record: dict) -> None:
        counts["finished"] += 1
        counts["correct"] += int(record["correct"])
        counts["errors"] += int(record["error"] is not None)
        bar.update(1)
        bar.set_postfix(acc=f"{counts['correct'] / counts['finished']:.3f}", errors=counts["errors"], refresh=False)

    if batch_size > 1 and ctx.run_config.temperature > 0:
        log(f"note: --batch-size {batch_size} is not used with --temperature {ctx.run_config.temperature}: sampling "
            "is seeded per question, so questions are evaluated one at a time")
        batch_size = 1
    try:
        ctx.pruner = ctx.run_config.apply(ctx.model)
        warmed_up = False
        if batch_size > 1:
            todo, warmed_up = _run_batched(ctx, journal, todo, batch_size, on_error, count, log)
        for question in todo:
            record = _record_one(ctx, journal, question, not warmed_up, on_error)
            warmed_up = warmed_up or record["error"] is None
            count(record)
    finally:
        bar.close()
        if ctx.pruner is not None:
            ctx.pruner.remove()
            ctx.pruner = None


def _run_batched(ctx: SampleContext, journal: SampleJournal, todo: list[Question], batch_size: int, on_error: str,
                 count, log) -> tuple[list[Question], bool]:
    """Evaluate `todo` in batches. Returns the questions left for one-at-a-time evaluation (none, unless the
    method turned out to draw random numbers: then every question not recorded by this call, in order) and
    whether a batch already ran (the warm-up is done)."""
    recorded: set[str] = set()

    def record_error(question: Question, exc: SampleError) -> None:
        recorded.add(question.id)
        count(_record_error(journal, question, exc, on_error))

    for question in todo:
        if question.error is not None:
            record_error(question, SampleError(question.error))
    warmup = True
    for batch in plan_batches(plan_questions(ctx, todo, on_error=record_error), batch_size):
        ready, images = [], []
        for item in batch:
            try:
                images.append(load_image(ctx.image_folder, item.question))
                ready.append(item)
            except SampleError as exc:
                record_error(item.question, exc)
        if not ready:
            continue
        records, drew_random = run_batch(ctx, ready, images, warmup)
        if drew_random and len(ready) > 1:
            log(f"note: {ctx.run_config.label} draws random numbers, seeded per question: its questions are "
                "evaluated one at a time (--batch-size is not used for it)")
            return [q for q in todo if q.id not in recorded], True
        for record in records:
            journal.append(record)
            recorded.add(record["id"])
            count(record)
        warmup = False
    return [], not warmup


def _record_error(journal: SampleJournal, question: Question, exc: SampleError, on_error: str) -> dict:
    """Append the error record of a bad sample; `EvaluationError` after recording it when `on_error="fail"`."""
    record = error_record(question, str(exc))
    journal.append(record)
    if on_error == "fail":
        raise EvaluationError(
            f"{exc} (recorded in {journal.path}; --on-error skip records bad samples and goes on)"
        ) from exc
    return record


def _record_one(ctx: SampleContext, journal: SampleJournal, question: Question, warmup: bool, on_error: str) -> dict:
    """Evaluate `question` and append its record (or its error record) to `journal`; `EvaluationError` after
    recording a bad sample when `on_error="fail"`."""
    try:
        record = run_sample(ctx, question, warmup=warmup)
    except SampleError as exc:
        return _record_error(journal, question, exc, on_error)
    journal.append(record)
    return record
