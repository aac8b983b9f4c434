"""Comparing ScienceQA result files: the guide's table, speed-ups and paired significance.

Reporting only (no model code). It reads every `scienceqa_results_*.json` in a folder plus, for significance, the
per-sample JSONL each one names (`samples_file`).

- `load_results(folder)` -> `(runs, warnings)`: readable, complete results; unreadable, foreign or partial files are
  left out with a warning that names them.
- `build_comparison(runs, allow_mixed=False)` -> `Comparison`: one `Row` per run, the baseline first, then by
  method (each method's `table_order`, then name; FastV first, in the guide's order of rules: max_head,
  avg_all_heads, weighted_combination, random, others by name, then alpha, rank, K) and each method's own order. Against the baseline: Δ accuracy, prefill speed-up (baseline median prefill / the run's), and the paired
  significance of Δ on the questions both answered (exact McNemar test, bootstrap 95% interval), and why the
  timings are not trustworthy when they are not (`timing_problems`). `MixedRuns` when
  the runs used different question files (sha256) or models, unless `allow_mixed`.
- `format_table` (the guide's layout), `format_markdown`, `format_csv`, `format_json`.

`Row`, `Comparison` and the Pareto front live in `comparison_rows` (shared with `plotting`, which draws the plot).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .comparison_rows import SIGNIFICANCE_LEVEL, Comparison, Row
from .embedded import MODEL_PATH as EMBEDDED_MODEL_PATH
from .methods import PruningMethod, jsonable, method_from_result, method_reference
from .statistics import bootstrap_delta_interval, mcnemar_exact

RESULT_GLOB = "scienceqa_results_*.json"
BOOTSTRAP_RESAMPLES = 10000
TITLE = "FastV Advanced 结果比较"
SAMPLE_FIELDS = ("correct", "prefill_s", "warmup")  # what the comparison reads of each per-sample record
REQUIRED_KEYS = ("accuracy", "total_samples", "correct_samples", "model_config", "question_file", "latency",
                 "flops_info", "tokens")


# When prefill times are not trustworthy (see `timing_problems`):
TINY_PREFILL_S = 0.050  # a median below: fixed per-call overheads weigh as much as the work pruning removes
MEAN_MEDIAN_LIMIT = 1.25  # mean / median prefill above this (or below its inverse): a few samples far off; also
# the largest ratio of median prefills between configurations of the same FLOPs
SPREAD_LIMIT = 0.25  # interquartile range / median of the per-sample prefill times above this
BUSY_CORES_LIMIT = 0.5  # cores kept busy by other processes (the result's `environment.busy_cores`)
MIN_SPREAD_SAMPLES = 5


EMBEDDED_NOTE = (
    "Embedded toy model (models/tiny-llava-scienceqa): a 4-layer decoder that reads the picture only in layers 2-3, "
    "with layer 1's attention trained towards the shape; these numbers check the tools, not LLaVA "
    "(docs/embedded_demo.md)."
)


class MixedRuns(ValueError):
    """The results come from different question sets or models (refused unless `allow_mixed`)."""


# -- reading --------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One result file, and the per-question records of its JSONL that the comparison reads (None when they cannot
    be read): question id -> the `SAMPLE_FIELDS` of its record."""

    path: Path
    data: dict
    samples: dict[str, dict] | None = None

    @cached_property
    def correct(self) -> dict[str, bool] | None:
        """Question id -> answered correctly."""
        return None if self.samples is None else {qid: bool(r.get("correct")) for qid, r in self.samples.items()}

    @cached_property
    def prefill_times(self) -> list[float] | None:
        """Per-sample prefill seconds of the timed samples (the warm-up sample excluded)."""
        if self.samples is None:
            return None
        return [r["prefill_s"] for r in self.samples.values() if not r.get("warmup") and _is_number(r.get("prefill_s"))]

    @property
    def config(self) -> dict:
        return self.data["model_config"]

    @cached_property
    def pruning(self) -> PruningMethod | None:
        """The pruning method the file records (None for the baseline, or when its class cannot be found: then the
        recorded name and label are shown)."""
        try:
            return method_from_result(self.config)
        except ValueError:
            return None

    @property
    def is_baseline(self) -> bool:
        return self.pruning is None and not self.config.get("pruning_method") and not self.config.get("use_fast_v")

    @property
    def method(self) -> str | None:
        if self.is_baseline:
            return None
        recorded = self.config.get("pruning_method") or {}
        return method_reference(self.pruning) if self.pruning is not None else recorded.get("name", "?")

    @property
    def parameters(self) -> dict | None:
        if self.is_baseline:
            return None
        if self.pruning is None:
            return (self.config.get("pruning_method") or {}).get("parameters")
        return jsonable(self.pruning.result_parameters())

    @property
    def group(self) -> str | None:
        if self.is_baseline:
            return None
        return self.pruning.group() if self.pruning is not None else self.method

    @property
    def is_embedded_model(self) -> bool:
        """Run on the embedded toy model, from this checkout or any other (the path ends in models/<its name>)."""
        return Path(self.config.get("model_path") or "").parts[-2:] == EMBEDDED_MODEL_PATH.parts[-2:]

    @property
    def question_sha(self) -> str | None:
        return (self.data.get("question_file") or {}).get("sha256")

    @property
    def model(self) -> tuple:
        return (self.config.get("model_path"), self.config.get("model_base"))

    @property
    def label(self) -> str:
        """`Baseline`, or the method's label (FastV: the guide's `FastV - max_head`, `FastV - weighted α=0.3`, plus
        `(R=144, K=2)` off the guide's R=288, K=2)."""
        if self.is_baseline:
            return "Baseline"
        if self.pruning is None:
            return self.config.get("pruning_label") or self.method
        return self.pruning.label()

    @property
    def short_label(self) -> str:
        """A compact label for plots (`max_head`, `weighted α=0.3`, `avg_all_heads R=144 K=1`)."""
        if self.is_baseline or self.pruning is None:
            return self.label
        return self.pruning.short_label()

    def sort_key(self) -> tuple:
        """Baseline first, then by the methods' table order and name, then each method's own order."""
        if self.is_baseline:
            return (0, 0, "", (), self.path.name)
        if self.pruning is None:
            return (1, math.inf, self.method, (), self.path.name)
        return (1, type(self.pruning).table_order, self.method, self.pruning.sort_key(), self.path.name)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_result(path: Path) -> tuple[Run | None, str | None]:
    """(run, None) for a complete result file; (None, reason) when it is unreadable, foreign or partial."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot be read ({exc})"
    except json.JSONDecodeError as exc:
        return None, f"is not valid JSON ({exc.msg} at line {exc.lineno}; a partial write?)"
    if not isinstance(data, dict):
        return None, "is not a result file (not a JSON object)"
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        return None, f"is not a fastv_advanced result file (missing {', '.join(missing)})"
    if not _is_number(data["accuracy"]) or not isinstance(data["model_config"], dict):
        return None, "is not a fastv_advanced result file (accuracy/model_config have the wrong type)"
    if data.get("complete") is False:
        return None, (f"is partial ({data['total_samples']} samples, complete: false); finish the run (re-run its "
                      "command) to include it")
    return Run(path, data), None


def read_samples(run: Run, fields: tuple[str, ...] | None = SAMPLE_FIELDS) -> tuple[dict[str, dict] | None, str | None]:
    """The run's per-sample JSONL records by question id, limited to the run's selection and to `fields` (None =
    every field); (None, reason) when the file cannot be read or belongs to another run."""
    name = run.data.get("samples_file") or run.path.with_suffix(".jsonl").name
    path = run.path.parent / name
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, f"per-sample file {path} cannot be read ({exc.strerror or exc})"
    lines = raw.split(b"\n")[:-1]  # a torn last line is the sample in flight of a killed run
    header, records = None, {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            return None, f"per-sample file {path}:{number} is not valid JSON"
        if header is None:
            if not isinstance(item, dict) or item.get("type") != "header":
                return None, f"per-sample file {path} has no header line"
            header = item
        elif isinstance(item, dict) and "id" in item:
            records[str(item["id"])] = item if fields is None else {k: item[k] for k in fields if k in item}
    if header is None:
        return None, f"per-sample file {path} is empty"
    if run.data.get("fingerprint") and header.get("fingerprint") != run.data.get("fingerprint"):
        return None, f"per-sample file {path} belongs to another configuration than {run.path.name}"
    ids = (header.get("selection") or {}).get("ids")
    if ids is not None:
        records = {qid: records[qid] for qid in map(str, ids) if qid in records}
    if len(records) != run.data["total_samples"]:
        return None, (f"per-sample file {path} has {len(records)} samples, {run.path.name} counts "
                      f"{run.data['total_samples']}")
    return records, None


def results_dir_problem(results_dir: str | os.PathLike) -> str | None:
    """Why `--results-dir` cannot be searched for result files (None when it can)."""
    path = Path(results_dir)
    if not path.exists():
        return f"--results-dir {results_dir}: the folder does not exist"
    if not path.is_dir():
        return f"--results-dir {results_dir} is a file, not a folder"
    return None


def load_results(results_dir: str | os.PathLike = ".") -> tuple[list[Run], list[str]]:
    """Every readable, complete `scienceqa_results_*.json` in `results_dir` with its per-sample correctness, and
    warnings naming what was skipped."""
    runs, warnings = [], []
    for path in sorted(Path(results_dir).glob(RESULT_GLOB)):
        if not path.is_file():
            continue
        run, problem = read_result(path)
        if run is None:
            warnings.append(f"skipping {path}: it {problem}")
            continue
        run.samples, problem = read_samples(run)
        if problem:
            warnings.append(f"{problem}: significance of {path.name} is n/a")
        runs.append(run)
    return runs, warnings


# -- the comparison -------------------------------------------------------------------------------------------------


def _ratio(numerator, denominator) -> float | None:
    if not _is_number(numerator) or not _is_number(denominator) or denominator <= 0 or numerator <= 0:
        return None
    return numerator / denominator


def _groups(runs: list[Run], key) -> dict:
    groups: dict = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run.path.name)
    return groups


def _describe_groups(groups: dict, show) -> str:
    return "; ".join(f"{show(key)}: {', '.join(names[:4])}" + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                     for key, names in groups.items())


SETTING_KEYS = ("conv_mode", "single_pred_prompt", "max_new_tokens", "temperature", "image_aspect_ratio", "dtype",
                "device")


def build_comparison(runs: list[Run], *, allow_mixed: bool = False, results_dir: str = ".",
                     warnings: list[str] | None = None) -> Comparison:
    """Rows against the baseline; `MixedRuns` for different question sets or models unless `allow_mixed`."""
    warnings = list(warnings or [])
    notes: list[str] = []
    runs = sorted(runs, key=Run.sort_key)
    question_groups = _groups(runs, lambda r: r.question_sha)
    model_groups = _groups(runs, lambda r: r.model)
    mixed = []
    if len(question_groups) > 1:
        mixed.append("different question sets (question file sha256 " + _describe_groups(
            question_groups, lambda sha: (sha or "unknown")[:12]) + ")")
    if len(model_groups) > 1:
        mixed.append("different models (" + _describe_groups(
            model_groups, lambda m: m[0] + (f" + base {m[1]}" if m[1] else "")) + ")")
    if mixed and not allow_mixed:
        raise MixedRuns(
            f"refusing to compare runs on {' and '.join(mixed)}. Compare each group in its own folder, or pass "
            "--allow-mixed to show them together anyway."
        )
    if mixed:
        warnings.append("comparing runs on " + " and ".join(mixed) + " (--allow-mixed)")
    for key in SETTING_KEYS:
        values = _groups(runs, lambda r: json.dumps(r.config.get(key)))
        if len(values) > 1:
            warnings.append(f"the runs differ in {key}: " + _describe_groups(values, lambda v: v))

    baselines = [r for r in runs if r.is_baseline]
    baseline = None
    if baselines:
        named = [r for r in baselines if r.path.name == "scienceqa_results_baseline.json"]
        baseline = named[0] if named else baselines[0]
        if len(baselines) > 1:
            warnings.append(f"{len(baselines)} baseline results; comparing against {baseline.path.name}")
        runs = [baseline] + [r for r in runs if r is not baseline]
    else:
        notes.append(f"no baseline result (scienceqa_results_baseline.json) in {results_dir}: Δ, speed-up and "
                     "significance need one (fastv-sweep evaluates it unless --no-baseline)")

    rows = [_row(run, baseline, notes) for run in runs]
    _against_reference(runs, rows)
    sample_counts = sorted({r.samples for r in rows})
    if len(sample_counts) > 1:
        warnings.append(f"the runs have different sample counts ({', '.join(map(str, sample_counts))}): accuracies "
                        "are over different questions; significance uses the questions both runs answered")
    comparison = Comparison(
        rows, str(results_dir), baseline.path.name if baseline else None, notes, warnings,
        question_files=[{"sha256": sha, "path": next(r.data["question_file"].get("path") for r in runs
                                                     if r.question_sha == sha), "results": names}
                        for sha, names in question_groups.items()],
        models=[m[0] for m in model_groups],
    )
    if baseline is not None and baseline.data["total_samples"]:
        p, n = baseline.data["accuracy"], baseline.data["total_samples"]
        comparison.standard_error = math.sqrt(p * (1 - p) / n)
    comparison.timing_problems = timing_problems(rows)
    comparison.embedded_model = any(run.is_embedded_model for run in runs)
    return comparison


def prefill_spread(times: list[float] | None) -> float | None:
    """Interquartile range / median of per-sample prefill times (None for fewer than `MIN_SPREAD_SAMPLES`)."""
    if not times or len(times) < MIN_SPREAD_SAMPLES:
        return None
    q1, median, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / median if median > 0 else None


def _some(items: list[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def timing_problems(rows: list[Row]) -> list[str]:
    """Why the prefill times cannot be taken at face value, one phrase per reason (empty when none): a tiny model,
    mean far from median, a wide spread, configurations of the same FLOPs far apart, a busy CPU recorded."""
    timed = [r for r in rows if r.prefill_median_s is not None and r.prefill_median_s > 0]
    checks = (_tiny_model, _mean_far_from_median, _wide_spread, _same_cost_apart, _busy_cpu)
    return [problem for check in checks if timed and (problem := check(timed))]


def _tiny_model(timed: list[Row]) -> str | None:
    reference = next((r for r in timed if r.baseline), None) or max(timed, key=lambda r: r.prefill_median_s)
    if reference.prefill_median_s >= TINY_PREFILL_S:
        return None
    return (f"{reference.strategy}'s median prefill is {1000 * reference.prefill_median_s:.0f} ms, below "
            f"{1000 * TINY_PREFILL_S:.0f} ms: on so small a model fixed per-call overheads weigh as much as the work "
            "pruning removes, so its speed-ups say nothing about a full-size model")


def _mean_far_from_median(timed: list[Row]) -> str | None:
    gaps = [f"{r.strategy} ({r.prefill_mean_s / r.prefill_median_s:.2f}×)" for r in timed
            if _is_number(r.prefill_mean_s)
            and not 1 / MEAN_MEDIAN_LIMIT <= r.prefill_mean_s / r.prefill_median_s <= MEAN_MEDIAN_LIMIT]
    return "mean prefill far from the median in " + _some(gaps) if gaps else None


def _wide_spread(timed: list[Row]) -> str | None:
    spreads = [f"{r.strategy} ({100 * r.prefill_spread:.0f}%)" for r in timed
               if r.prefill_spread is not None and r.prefill_spread > SPREAD_LIMIT]
    return ("per-sample prefill times spread widely (interquartile range / median) in " + _some(spreads)
            if spreads else None)


def _same_cost_apart(timed: list[Row]) -> str | None:
    """Configurations with the same FLOPs ratio should take about the same time; far apart, the machine's speed
    changed between them."""
    groups: dict[float, list[Row]] = {}
    for row in timed:
        if _is_number(row.flops_ratio):
            groups.setdefault(round(row.flops_ratio, 3), []).append(row)
    pairs = []
    for group in groups.values():
        fast = min(group, key=lambda r: r.prefill_median_s)
        slow = max(group, key=lambda r: r.prefill_median_s)
        if slow.prefill_median_s / fast.prefill_median_s > MEAN_MEDIAN_LIMIT:
            pairs.append(f"{slow.strategy} vs {fast.strategy} ({slow.prefill_median_s / fast.prefill_median_s:.2f}×)")
    return ("configurations of the same FLOPs far apart in median prefill, so the machine's speed changed between "
            "them: " + _some(pairs) if pairs else None)


def _busy_cpu(timed: list[Row]) -> str | None:
    busy = [f"{r.strategy} ({r.busy_cores:.1f})" for r in timed
            if _is_number(r.busy_cores) and r.busy_cores >= BUSY_CORES_LIMIT]
    return "other processes kept cores busy (cores) during " + _some(busy) if busy else None


def _row(run: Run, baseline: Run | None, notes: list[str]) -> Row:
    data, latency, tokens = run.data, run.data.get("latency") or {}, run.data.get("tokens") or {}
    row = Row(
        file=run.path.name, strategy=run.label, baseline=run is baseline, method=run.method, group=run.group,
        parameters=run.parameters, accuracy=float(data["accuracy"]),
        correct=int(data["correct_samples"]), samples=int(data["total_samples"]), errors=int(data.get("errors") or 0),
        delta=None, avg_latency_s=data.get("avg_latency"), prefill_mean_s=latency.get("prefill_mean"),
        prefill_median_s=latency.get("prefill_median"), prefill_spread=prefill_spread(run.prefill_times),
        prefill_speedup=None, prefill_speedup_mean=None, generate_speedup=None,
        flops_ratio=(data.get("flops_info") or {}).get("flops_ratio"), image_tokens=tokens.get("avg_image_tokens"),
        kept_image_tokens=tokens.get("avg_kept_image_tokens"),
        image_tokens_per_layer=tokens.get("avg_image_tokens_per_layer"),
        busy_cores=(data.get("environment") or {}).get("busy_cores"), short_label=run.short_label,
    )
    if baseline is None:
        return row
    base_latency = baseline.data.get("latency") or {}
    row.prefill_speedup_mean = _ratio(base_latency.get("prefill_mean"), row.prefill_mean_s)
    row.prefill_speedup = _ratio(base_latency.get("prefill_median"), row.prefill_median_s) or row.prefill_speedup_mean
    row.generate_speedup = _ratio(base_latency.get("generate_mean"), latency.get("generate_mean"))
    if run.question_sha != baseline.question_sha:
        notes.append(f"{row.strategy}: another question set than the baseline, Δ and significance are n/a")
        return row
    row.delta = row.accuracy - float(baseline.data["accuracy"])
    if run is baseline or run.correct is None or baseline.correct is None:
        return row
    common = [qid for qid in baseline.correct if qid in run.correct]
    if not common:
        notes.append(f"{row.strategy}: no question in common with the baseline, significance is n/a")
        return row
    base = [baseline.correct[qid] for qid in common]
    variant = [run.correct[qid] for qid in common]
    test = mcnemar_exact(base, variant)
    row.paired_samples, row.mcnemar_b, row.mcnemar_c, row.p_value = len(common), test["b"], test["c"], test["p_value"]
    row.ci_low, row.ci_high = bootstrap_delta_interval(base, variant, resamples=BOOTSTRAP_RESAMPLES, seed=0)
    if len(common) != row.samples or len(common) != baseline.data["total_samples"]:
        notes.append(f"{row.strategy}: significance over the {len(common)} questions both it and the baseline "
                     "answered")
    return row


def _is_reference(run: Run) -> bool:
    return run.pruning is not None and type(run.pruning).comparison_reference


def _against_reference(runs: list[Run], rows: list[Row]) -> None:
    """Test every pruned row of a method that is not a reference (FastV) against the reference row nearest to it in
    FLOPs ratio on the same questions: Δ accuracy and the exact McNemar p on the questions both answered."""
    references = [(run, row) for run, row in zip(runs, rows) if _is_reference(run) and row.flops_ratio is not None]
    for run, row in zip(runs, rows):
        if row.baseline or _is_reference(run) or row.flops_ratio is None or run.correct is None:
            continue
        candidates = [(abs(ref_row.flops_ratio - row.flops_ratio), i) for i, (ref, ref_row) in enumerate(references)
                      if ref.question_sha == run.question_sha and ref.correct is not None]
        if not candidates:
            continue
        reference, reference_row = references[min(candidates)[1]]
        common = [qid for qid in reference.correct if qid in run.correct]
        if not common:
            continue
        test = mcnemar_exact([reference.correct[q] for q in common], [run.correct[q] for q in common])
        row.reference, row.reference_p_value = reference_row.strategy, test["p_value"]
        row.reference_delta = (sum(run.correct[q] for q in common) - sum(reference.correct[q] for q in common)) / len(common)


# -- formatting -----------------------------------------------------------------------------------------------------

NA = "n/a"


def _fmt(value, spec: str) -> str:
    return NA if value is None else format(value, spec)


def _fmt_p(p: float | None) -> str:
    if p is None:
        return NA
    text = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
    return text + (" *" if p < SIGNIFICANCE_LEVEL else "")


def _fmt_tokens(row: Row) -> str:
    if row.image_tokens is None:
        return NA

    def number(x: float) -> str:
        return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.1f}"

    kept = row.kept_image_tokens if row.kept_image_tokens is not None else row.image_tokens
    return f"{number(kept)}/{number(row.image_tokens)}"


def _cells(row: Row, has_baseline: bool) -> dict[str, str]:
    """The displayed values of a row, by column key."""
    if row.baseline:
        accuracy = f"{row.accuracy:.4f}"
    else:
        accuracy = f"{row.accuracy:.4f} ({_fmt(row.delta, '+.4f')})" if has_baseline or row.delta is not None else \
            f"{row.accuracy:.4f} ({NA})"
    dash = "-"
    return {
        "strategy": row.strategy,
        "accuracy": accuracy,
        "delta": dash if row.baseline else _fmt(row.delta, "+.4f"),
        "latency": _fmt(row.avg_latency_s, ".6f"),
        "prefill": _fmt(row.prefill_median_s, ".6f"),
        "speedup": NA if row.prefill_speedup is None else f"{row.prefill_speedup:.2f}x",
        "flops": NA if row.flops_ratio is None else f"{100 * row.flops_ratio:.2f}%",
        "tokens": _fmt_tokens(row),
        "samples": str(row.samples),
        "p": dash if row.baseline else _fmt_p(row.p_value),
        "ci": dash if row.baseline else (NA if row.ci_low is None else f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}]"),
        "reference": dash if row.reference is None else
        f"{_fmt(row.reference_delta, '+.4f')} p={_fmt_p(row.reference_p_value)} ({row.reference})",
    }


# (key, guide-style header, English header)
COLUMNS = (
    ("strategy", "策略", "Strategy"),
    ("accuracy", "准确率 (Δ)", "Accuracy (Δ)"),
    ("latency", "平均延迟(s)", "Avg latency (s)"),
    ("prefill", "预填充(s)", "Prefill median (s)"),
    ("speedup", "预填充加速", "Prefill speed-up"),
    ("flops", "FLOPs比例", "FLOPs ratio"),
    ("tokens", "图像token", "Image tokens kept"),
    ("samples", "样本数", "Samples"),
    ("p", "McNemar p", "McNemar p"),
    ("ci", "Δ 95% CI", "Δ 95% CI"),
)
REFERENCE_COLUMN = ("reference", "对FastV (Δ, p)", "vs FastV (Δ, p)")


def columns(comparison: Comparison) -> tuple:
    """The table's columns: the guide's, plus the comparison with FastV when some row has one."""
    if any(row.reference is not None for row in comparison.rows):
        return COLUMNS + (REFERENCE_COLUMN,)
    return COLUMNS


def display_width(text: str) -> int:
    """Terminal columns of `text` (CJK wide/full-width characters take two)."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - display_width(text))


def column_names(english: bool) -> dict[str, str]:
    """Column key -> the name the notes use for it: the header of the chosen format (English for markdown; the
    guide's Chinese header with its English name in brackets for the table)."""
    return {key: english_name if english or chinese == english_name else f"{chinese} ({english_name})"
            for key, chinese, english_name in COLUMNS + (REFERENCE_COLUMN,)}


def explanation(comparison: Comparison, names: dict[str, str]) -> list[str]:
    """What the columns mean and how to read the significance (printed under the table), naming the columns as
    `names` (from `column_names`) does."""
    if comparison.baseline is None:
        return []
    n = next(r.samples for r in comparison.rows if r.baseline)
    se = comparison.standard_error
    if se is not None and se > 0:
        noise = f"With {n} questions one run's accuracy has a standard error of about ±{100 * se:.1f} points"
    else:
        bound = 50 / math.sqrt(max(n, 1))  # sqrt(p(1-p)/n) at p = 1/2
        noise = f"With {n} questions one run's accuracy has a standard error of up to ±{bound:.1f} points"
    return [
        f"Δ: accuracy minus the Baseline's. {names['prefill']}: median prefill time per sample (time to first token; "
        f"the warm-up sample excluded). {names['speedup']}: the Baseline's median prefill time / this run's. "
        f"{names['flops']}: theoretical decoder prefill FLOPs relative to the unpruned model. "
        f"{names['tokens']}: image tokens kept / seen per image.",
        "McNemar p: exact two-sided McNemar test on per-question correctness, paired with the Baseline by question "
        f"id; Δ 95% CI: paired bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples). * = p < {SIGNIFICANCE_LEVEL}."
        + (f" {names['reference']}: accuracy minus, and the same test against, the FastV row nearest in FLOPs ratio "
           "(named in brackets)." if any(r.reference is not None for r in comparison.rows) else ""),
        f"{noise} (about ±1 point on all 2017 ScienceQA-IMG test questions): a difference with p >= "
        f"{SIGNIFICANCE_LEVEL} cannot be told apart from noise (with few questions the bootstrap CI is too narrow: "
        "go by p).",
    ]


def timing_note(comparison: Comparison, names: dict[str, str]) -> list[str]:
    """One line saying why the timings are not trustworthy, or nothing when no reason was found."""
    if not comparison.timing_problems:
        return []
    return [f"Timings not trustworthy: {'; '.join(comparison.timing_problems)}. {names['speedup']} compares median "
            "prefill times, which a few slow samples do not move; measure speed on a quiet machine (one torch thread "
            "on a shared CPU) and a full-size model."]


def notes(comparison: Comparison, english: bool) -> list[str]:
    """The lines under the table: what the embedded model's numbers mean and the timing warning first (next to the
    numbers), then the explanation, then the comparison's own notes."""
    names = column_names(english)
    return model_notes(comparison) + timing_note(comparison, names) + explanation(comparison, names) + comparison.notes


def model_notes(comparison: Comparison) -> list[str]:
    """What the numbers of the model at hand mean (the embedded toy's), printed first under the table."""
    return [EMBEDDED_NOTE] if comparison.embedded_model else []


def _wrap(text: str, width: int) -> list[str]:
    """Wrap at spaces so that no line is wider than `width` terminal columns."""
    lines, current = [], ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and display_width(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + [current] if current else lines


def _column_widths(cells: list[dict[str, str]], shown: tuple) -> dict[str, int]:
    """Column key -> terminal columns it takes (its widest cell or header, plus two spaces), for the `shown`
    columns in order."""
    return {key: max([display_width(header)] + [display_width(c[key]) for c in cells]) + 2
            for key, header, _ in shown}


def _column_blocks(widths: dict[str, int], width: int | None) -> list[list[str]]:
    """The column keys in blocks that each fit `width` (None: one block), each block led by the strategy column;
    the other columns keep their order and are never split. A line ends without its last column's two spaces."""
    if width is None:
        return [list(widths)]
    blocks: list[list[str]] = []
    for key in list(widths)[1:]:
        if not blocks or sum(widths[k] for k in blocks[-1]) + widths[key] - 2 > width:
            blocks.append(["strategy"])
        blocks[-1].append(key)
    return blocks


def format_table(comparison: Comparison, width: int | None = None) -> str:
    """The guide's layout: a title between '=' rules, a header, the rows between '-' rules, then the notes.

    width: terminal columns to fit (None: no limit). When the table is wider, the strategies get their short labels
    and the columns are split into blocks one under the other, each repeating the strategy column; nothing is left
    out."""
    has_baseline = comparison.baseline is not None
    cells = [_cells(row, has_baseline) for row in comparison.rows]
    widths = _column_widths(cells, columns(comparison))
    if width is not None and sum(widths.values()) - 2 <= width:
        width = None
    if width is not None:
        for c, row in zip(cells, comparison.rows):
            c["strategy"] = row.short_label
        widths = _column_widths(cells, columns(comparison))
    rule = max(sum(widths.values()), 100) if width is None else width
    headers = {key: header for key, header, _ in columns(comparison)}
    lines = ["=" * rule, " " * max(0, (rule - display_width(TITLE)) // 2) + TITLE, "=" * rule]
    for block in _column_blocks(widths, width):
        lines += ["", "".join(_pad(headers[key], widths[key]) for key in block).rstrip(), "-" * rule]
        lines += ["".join(_pad(c[key], widths[key]) for key in block).rstrip() for c in cells]
        lines.append("-" * rule)
    for note in notes(comparison, english=False):
        lines += _wrap(note, rule)
    return "\n".join(lines)


def format_markdown(comparison: Comparison) -> str:
    has_baseline = comparison.baseline is not None
    shown = columns(comparison)
    keys = [key for key, _, _ in shown]
    lines = ["| " + " | ".join(english for _, _, english in shown) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(shown) - 1)) + "|"]
    for row in comparison.rows:
        cells = _cells(row, has_baseline)
        lines.append("| " + " | ".join(cells[k].replace("|", "\\|") for k in keys) + " |")
    below = notes(comparison, english=True)
    if below:
        lines += [""] + [f"- {note}" for note in below]
    return "\n".join(lines)


CSV_FIELDS = ("file", "strategy", "method", "parameters", "accuracy", "correct",
              "samples", "errors", "delta", "avg_latency_s", "prefill_mean_s", "prefill_median_s", "prefill_spread",
              "prefill_speedup", "prefill_speedup_mean", "generate_speedup", "flops_ratio", "image_tokens",
              "kept_image_tokens", "image_tokens_per_layer", "busy_cores", "paired_samples", "mcnemar_b", "mcnemar_c",
              "p_value", "ci_low", "ci_high", "reference", "reference_delta", "reference_p_value", "baseline")


def format_csv(comparison: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in comparison.rows:
        data = row.to_dict()
        data["parameters"] = json.dumps(data["parameters"], sort_keys=True) if data["parameters"] is not None else None
        writer.writerow({key: "" if data[key] is None else data[key] for key in CSV_FIELDS})
    return buffer.getvalue().rstrip("\n")


def format_json(comparison: Comparison) -> str:
    return json.dumps({
        "title": "FastV Advanced comparison",
        "results_dir": comparison.results_dir,
        "baseline": comparison.baseline,
        "question_files": comparison.question_files,
        "models": comparison.models,
        "baseline_standard_error": comparison.standard_error,
        "significance": {"test": "exact two-sided McNemar on paired per-question correctness",
                         "interval": f"paired percentile bootstrap of Δ, {BOOTSTRAP_RESAMPLES} resamples, seed 0",
                         "level": SIGNIFICANCE_LEVEL},
        "timing": {"speedup_from": "median prefill time (time to first token, warm-up excluded)",
                   "trustworthy": not comparison.timing_problems, "problems": comparison.timing_problems},
        "rows": [row.to_dict() for row in comparison.rows],
        "embedded_model": comparison.embedded_model,
        "notes": model_notes(comparison) + comparison.notes,
        "warnings": comparison.warnings,
    }, indent=2, ensure_ascii=False)


FORMATTERS = {"table": format_table, "markdown": format_markdown, "csv": format_csv, "json": format_json}
