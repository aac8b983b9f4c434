"""Metrics of a run and its result file: `summarize` (records -> accuracy, latency, tokens, FLOPs), `build_result`
(summary + what the run was) and `format_summary` (the printed lines).

A record is one line of the per-sample JSONL (`run_loop.run_sample` / `run_loop.error_record`); records with an
`error` could not be evaluated and count as wrong, as LLaVA counts missing answers.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from datetime import datetime, timezone

from .flops import DecoderShape
from .run_config import RESULT_FORMAT, RunConfig

FAILURES_SHOWN = 3  # failed samples named in the printed summary before "... and N more"

FLOPS_METHOD = (
    "theoretical decoder prefill FLOPs per sample from the model's shape and the sample's real "
    "token counts: K*f(n) + (L-K)*f(n'), f(n) = 2*(n*d*(2*q+2*kv) + 2*n^2*q + 3*n*d*m) (SwiGLU, GQA); "
    "flops_ratio = sum over samples / unpruned sum (baseline = 1.0)"
)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(
    records: list[dict], run_config: RunConfig, shape: DecoderShape, *, num_selected: int | None = None
) -> dict:
    """Metrics over the records of one run (records with `error` count as wrong, as LLaVA counts missing answers).

    `accuracy` = correct / all samples; `avg_latency` = mean end-to-end `generate` seconds of the timed samples
    (warm-up samples left out unless nothing else was timed). `num_selected` (the questions the run was to
    evaluate) decides `complete`.
    """
    ok = [r for r in records if r.get("error") is None]
    correct = sum(1 for r in ok if r["correct"])
    total = len(records)
    latency = _latency(ok, run_config.max_new_tokens)
    return {
        "accuracy": correct / total if total else 0.0,
        "avg_latency": latency["generate_mean"],
        "total_samples": total,
        "correct_samples": correct,
        "evaluated_samples": len(ok),
        "parse_failures": sum(1 for r in ok if r["parse_failed"]),
        "errors": total - len(ok),
        "accuracy_excluding_errors": correct / len(ok) if ok else None,
        "complete": num_selected is None or total == num_selected,
        "latency": latency,
        "throughput": _throughput(ok),
        "tokens": _tokens(ok),
        "flops_info": _flops(ok, run_config, shape),
        "peak_gpu_memory_bytes": _peak_memory(ok),
    }


def _peak_memory(ok: list[dict]) -> int | None:
    """The largest per-sample peak of GPU memory (None on CPU)."""
    memory = [r["peak_memory_bytes"] for r in ok if r.get("peak_memory_bytes") is not None]
    return max(memory) if memory else None


def _latency(ok: list[dict], max_new_tokens: int) -> dict:
    """Prefill (time to first token) and generate seconds of the timed samples: warm-up samples are left out
    unless nothing else was timed."""
    timed = [r for r in ok if not r.get("warmup")]
    warmup_only = not timed and bool(ok)
    if warmup_only:
        timed = ok
    prefill = [r["prefill_s"] for r in timed if r.get("prefill_s") is not None]
    generate = [r["generate_s"] for r in timed]
    batched = any(r.get("batch_size", 1) > 1 for r in timed)
    return {
        "unit": "seconds",
        "prefill_mean": _mean(prefill),
        "prefill_median": _median(prefill),
        "generate_mean": _mean(generate),
        "generate_median": _median(generate),
        "timed_samples": len(generate),
        "warmup_samples_excluded": 0 if warmup_only else sum(1 for r in ok if r.get("warmup")),
        "prefill_is": "time to first token of generate (vision tower + decoder prefill + first token)",
        "generate_is": "end-to-end generate (greedy, max_new_tokens=%d)" % max_new_tokens,
        **({"batched_is": BATCHED_LATENCY} if batched else {}),
    }


BATCHED_LATENCY = (
    "questions were evaluated in batches (each record's batch_size): a question's prefill_s and generate_s are its "
    "batch's (every row of a batch shares them), so these means are the latency a question saw in its batch, not "
    "its share of the compute; `throughput` divides each batch's time among its rows"
)


def _throughput(ok: list[dict]) -> dict:
    """Questions and prompt tokens per second of the timed samples (warm-up left out as for the latency): each
    record's `prefill_s` / `generate_s` is its batch's, so a record contributes that time / its `batch_size` (at
    batch 1, questions_per_s = 1 / generate_mean)."""
    timed = [r for r in ok if not r.get("warmup")] or ok
    generate_s = sum(r["generate_s"] / r.get("batch_size", 1) for r in timed)
    with_prefill = [r for r in timed if r.get("prefill_s") is not None]
    prefill_s = sum(r["prefill_s"] / r.get("batch_size", 1) for r in with_prefill)
    return {
        "questions_per_s": len(timed) / generate_s if generate_s else None,
        "prefill_tokens_per_s": sum(r["num_tokens"] for r in with_prefill) / prefill_s if prefill_s else None,
        "timed_samples": len(timed),
        "mean_batch_size": _mean([r.get("batch_size", 1) for r in timed]),
        "questions_per_s_is": "timed questions / the summed generate seconds of their batches",
        "prefill_tokens_per_s_is": "prompt tokens (image tokens included, before pruning, padding excluded) / the "
                                   "summed prefill seconds (time to first token) of their batches",
    }


def _tokens(ok: list[dict]) -> dict:
    """Mean token counts; the image-token means are over the samples with an image."""
    with_image = [r for r in ok if r["num_image_tokens"]]
    return {
        "avg_prompt_tokens": _mean([r["num_tokens"] for r in ok]),
        "avg_tokens_after_pruning": _mean([r["pruned_num_tokens"] for r in ok]),
        "avg_generated_tokens": _mean([r["num_generated_tokens"] for r in ok]),
        "samples_with_image": len(with_image),
        "avg_image_tokens": _mean([r["num_image_tokens"] for r in with_image]),
        "avg_kept_image_tokens": _mean([r["num_kept_image_tokens"] for r in with_image]),
        "avg_image_tokens_per_layer": _mean([r["avg_image_tokens_per_layer"] for r in with_image
                                             if r.get("avg_image_tokens_per_layer") is not None]),
    }


def _flops(ok: list[dict], run_config: RunConfig, shape: DecoderShape) -> dict:
    """Theoretical prefill FLOPs: the ratio of the sums, per-sample means and totals of the decoder's; the vision
    tower's and projector's (the same with and without pruning) and the ratio with them added."""
    flops = [r["prefill_flops"] for r in ok]
    baseline = [r["baseline_prefill_flops"] for r in ok]
    vision = [r.get("vision_flops") or 0 for r in ok]
    with_vision = sum(baseline) + sum(vision)
    return {
        "flops_ratio": sum(flops) / sum(baseline) if sum(baseline) else 1.0,
        "flops_ratio_with_vision": (sum(flops) + sum(vision)) / with_vision if with_vision else 1.0,
        "avg_vision_flops": _mean(vision),
        "mean_sample_flops_ratio": _mean([r["flops_ratio"] for r in ok]),
        "avg_prefill_flops": _mean(flops),
        "avg_baseline_prefill_flops": _mean(baseline),
        "total_prefill_flops": sum(flops),
        "total_baseline_prefill_flops": sum(baseline),
        "pruning_method": run_config.label,
        "decoder_shape": asdict(shape),
        "method": FLOPS_METHOD,
    }


def failures(records: list[dict]) -> list[str]:
    """The error messages of the records that could not be evaluated, in record order (each names the question
    and, for an image, its file)."""
    return [r["error"] for r in records if r.get("error") is not None]


def build_result(summary: dict, header: dict, *, jsonl_name: str, started: float | None, extra: dict | None = None):
    """The result file's content: the summary, then what the run was (configuration, data, environment).

    `header` is the per-sample JSONL's header; `started` (a `time.time()`) adds `wall_time_s`; `extra` is merged
    in last (e.g. the chunk or merge details).
    """
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
            "batch_size": header.get("batch_size", 1),
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


def format_summary(result: dict, result_path: str | None = None, failed: list[str] = ()) -> str:
    """A short printable summary of a result; `failed` (the messages of `failures`) names the samples that could
    not be evaluated: the first few, then how many more."""

    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    latency, tokens, flops = result["latency"], result["tokens"], result["flops_info"]
    lines = [
        f"ScienceQA - {result.get('label', '')}: {result['total_samples']} samples"
        + ("" if result.get("complete", True) else " (INCOMPLETE)"),
        f"  accuracy      {result['accuracy']:.4f}  ({result['correct_samples']}/{result['total_samples']} correct; "
        f"parse failures {result['parse_failures']}; errors {result['errors']})",
        *format_failures(failed),
        f"  latency       prefill mean {fmt(latency['prefill_mean'])} s, median {fmt(latency['prefill_median'])} s; "
        f"generate mean {fmt(latency['generate_mean'])} s, median {fmt(latency['generate_median'])} s "
        f"({latency['timed_samples']} timed, {latency['warmup_samples_excluded']} warm-up excluded)",
        *_throughput_line(result),
        f"  image tokens  {fmt(tokens['avg_image_tokens'], '.1f')} seen, {fmt(tokens['avg_kept_image_tokens'], '.1f')} "
        f"kept (mean over the {tokens['samples_with_image']} samples with an image)",
        f"  prefill FLOPs ratio {flops['flops_ratio']:.4f} ({fmt(flops['avg_prefill_flops'], '.4g')} vs "
        f"{fmt(flops['avg_baseline_prefill_flops'], '.4g')} unpruned, mean per sample)",
    ]
    if flops.get("avg_vision_flops"):
        lines.append(f"  with the vision tower {flops['flops_ratio_with_vision']:.4f} "
                     f"({fmt(flops['avg_vision_flops'], '.4g')} vision FLOPs per sample)")
    if result.get("peak_gpu_memory_bytes"):
        lines.append(f"  peak GPU memory {result['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")
    if result_path:
        lines.append(f"  results       {result_path} (per sample: {result.get('samples_file')})")
    return "\n".join(lines)


def _throughput_line(result: dict) -> list[str]:
    """The summary's throughput line (none for a result written before throughput was recorded)."""
    throughput = result.get("throughput")
    if not throughput or throughput.get("questions_per_s") is None:
        return []
    tokens = throughput.get("prefill_tokens_per_s")
    batch = throughput.get("mean_batch_size") or 1
    return [f"  throughput    {throughput['questions_per_s']:.2f} questions/s, "
            + ("n/a" if tokens is None else f"{tokens:.0f}") + " prefill tokens/s"
            + (f" (batches of {batch:.3g} questions on average: the latencies above are per batch)"
               if batch > 1 else "")]


def format_failures(failed: list[str], shown: int = FAILURES_SHOWN) -> list[str]:
    """Summary lines naming the first `shown` failed samples and counting the rest (none when nothing failed)."""
    if not failed:
        return []
    lines = [f"  failed        {len(failed)} samples could not be evaluated (counted wrong):"]
    lines += [f"    - {message}" for message in failed[:shown]]
    if len(failed) > shown:
        lines.append(f"    ... and {len(failed) - shown} more (the per-sample JSONL has every error)")
    return lines
