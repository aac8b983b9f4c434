"""One-process sweeps: load a LLaVA once and evaluate a grid of configurations with it.

A grid is the unpruned baseline, the guide's FastV grid (selection rules x alphas (weighted_combination only) x
ranks R x aggregation layers K) and any pruning methods, each over every combination of the parameter values given
for it, its named presets and FLOPs targets (its budget parameter solved for each). Every configuration is evaluated by `evaluation.evaluate` exactly as a single `eval_scivqa.py` run with
the same flags would be, so it writes the same files: `scienceqa_results_<config>.json` and the per-sample
`scienceqa_results_<config>.jsonl`, with the same fingerprints. A single run and a sweep therefore resume each
other's files.

- `SweepGrid` + `expand_grid(grid, template)`: the `RunConfig`s, in a fixed order (baseline, then methods as
  given, then alpha, rank, K), duplicates (same result file) removed.
- `plan_run(...)`: what is on disk for one configuration, before anything loads: `done` (result file and JSONL of
  this configuration cover every selected question), `resume` (some samples done), `new`, or `conflict` (files of
  another configuration under this name; a single run would refuse them too).
- `Sweep.run(load)`: skips the finished configurations, loads the model (once, and only if something is left to
  compute), evaluates the rest in order and records what happened to each (`entries`), also when it fails.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Callable, Iterable

import torch

from .evaluation import RunOptions, evaluate
from .metrics import format_failures
from .model_loading import LoadedModel, ModelInfo, ModelSpec
from .budget import solve_budget
from .flops import DecoderShape
from .methods import PruningMethod, get_method_class
from .pruning import apply_pruning
from .methods.fastv import DEFAULT_ALPHA, GUIDE_AGG_LAYER, GUIDE_ATTENTION_RANK, alphas_of
from .run_config import RunConfig, build_checked, fingerprint_config, result_file_name, samples_file_name
from .run_files import ConfigurationMismatch, SampleJournal, check_result_file, fingerprint_of
from .scienceqa import QuestionSet

DEFAULT_METHODS = ("max_head", "avg_all_heads", "weighted_combination")

STATUS_DONE, STATUS_RESUME, STATUS_NEW, STATUS_CONFLICT = "done", "resume", "new", "conflict"


class SweepError(RuntimeError):
    """A configuration of the sweep failed; `index` (1-based) and `label` name it."""

    def __init__(self, index: int, total: int, label: str, cause: BaseException):
        self.index, self.total, self.label, self.cause = index, total, label, cause
        super().__init__(f"configuration {index}/{total} ({label}) failed: {cause}")


@dataclass(frozen=True)
class Cost:
    """What FLOPs targets are solved for: the decoder's shape and a prompt of `num_tokens` tokens, `num_image_tokens`
    of them image tokens."""

    shape: DecoderShape
    num_tokens: int
    num_image_tokens: int


@dataclass(frozen=True)
class MethodGrid:
    """One pruning method over a grid: every combination of the `params` values (name -> values, command-line text
    or values), under each of its `presets` that it has (none: its defaults; presets are written for 32 decoder
    layers and are moved to the same relative depth of a model of `num_layers`), and with its budget parameter
    solved for each of `flops_targets` (none: as given)."""

    name: str
    params: tuple[tuple[str, tuple], ...] = ()
    presets: tuple[str, ...] = ()
    flops_targets: tuple[float, ...] = ()
    num_layers: int | None = None

    def methods(self, cost: Cost | None = None) -> list[PruningMethod]:
        """The grid's methods in order (presets, then parameter combinations, then targets); `FieldError` for a
        bad value, ValueError for an unknown preset or a FLOPs target without a `cost`."""
        cls = get_method_class(self.name)
        presets = [p for p in self.presets if p in cls.presets]
        if self.presets and not presets:
            raise ValueError(f"pruning method {self.name!r} has none of the presets {', '.join(self.presets)}; its "
                             f"presets: {', '.join(cls.presets) or 'none'}")
        names = [name for name, _ in self.params]
        combinations = [dict(zip(names, values)) for values in product(*(values for _, values in self.params))]
        methods = [self._preset(cls, p, combo) for p in (presets or [None]) for combo in combinations]
        if not self.flops_targets:
            return methods
        if cost is None:
            raise ValueError("--flops-target needs the model's decoder shape and a fixed number of image tokens per "
                             "image, read from its config (LLaVA-1.5, Gemma 3); anyres and Qwen-VL models make "
                             "a number that depends on the image's size: give the budget as a ratio instead (e.g. "
                             "--pruning-param keep_ratio=...)")
        return [solve_budget(m, t, cost.shape, cost.num_tokens, cost.num_image_tokens)
                for m in methods for t in self.flops_targets]


    def _preset(self, cls, preset: str | None, params: dict) -> PruningMethod:
        if preset is None:
            return build_checked(self.name, params)
        method = build_checked(self.name, cls.presets[preset])
        if self.num_layers is not None:
            method = method.scaled_to(self.num_layers)
        return build_checked(self.name, {**method.parameters(), **params})


@dataclass(frozen=True)
class SweepGrid:
    """The grid: the baseline; the guide's FastV grid, every selection rule (`methods`) x rank x K
    (weighted_combination additionally x alpha); and the `pruning` method grids."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    alphas: tuple[float, ...] = (DEFAULT_ALPHA,)
    ranks: tuple[int, ...] = (GUIDE_ATTENTION_RANK,)
    agg_layers: tuple[int, ...] = (GUIDE_AGG_LAYER,)
    baseline: bool = True
    pruning: tuple[MethodGrid, ...] = ()


def expand_grid(
    grid: SweepGrid, template: RunConfig, *, sys_length: int | None = None, image_token_length: int | None = None,
    cost: Cost | None = None,
) -> list[RunConfig]:
    """The grid's `RunConfig`s: `template`'s prompt/generation settings with each method (None = baseline).

    Order: baseline first, then the guide's FastV rules in the order given, each over alpha (weighted_combination
    only), rank and K ascending as given (other rules get alpha 0.5, as a single run of them does), then each method
    grid. Configurations with the same result file are kept once. `run_config.FieldError` names the field of a bad
    value.
    """
    methods: list[PruningMethod | None] = [None] if grid.baseline else []
    for rule in grid.methods:
        for alpha in alphas_of(rule, grid.alphas):
            for rank in grid.ranks:
                for agg_layer in grid.agg_layers:
                    methods.append(build_checked("fastv", {
                        "agg_layer": agg_layer, "attention_rank": rank, "token_selection_method": rule,
                        "weighted_alpha": float(alpha), "sys_length": sys_length,
                        "image_token_length": image_token_length, "seed": template.seed,
                    }))
    for method_grid in grid.pruning:
        methods += method_grid.methods(cost)
    unique: dict[str, RunConfig] = {}
    for method in methods:
        config = replace(template, method=method)
        unique.setdefault(result_file_name(config), config)
    return list(unique.values())


def expected_model_info(spec: ModelSpec, model_base: str | None, device: torch.device, dtype: torch.dtype) -> ModelInfo:
    """The `ModelInfo` that `load_model` will report, as far as fingerprints need it (path, base, format, dtype,
    device), from what is known before loading. Used to plan; the sweep re-plans with the real one after loading."""
    return ModelInfo(
        model_path=spec.path, model_base=model_base, format=spec.format, dtype=str(dtype).replace("torch.", ""),
        device=str(device), device_name="", num_layers=spec.num_layers or 0,
        num_image_tokens=spec.num_image_tokens or 0, image_processor="",
    )


@dataclass
class PlannedRun:
    """One configuration and the state of its files."""

    run_config: RunConfig
    result_path: Path
    samples_path: Path
    status: str  # done / resume / new / conflict
    done_samples: int = 0
    total_samples: int = 0
    detail: str = ""

    @property
    def label(self) -> str:
        return self.run_config.label


def plan_run(
    run_config: RunConfig,
    model_info: ModelInfo,
    questions: QuestionSet,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    unfixable: Iterable[str] = (),
) -> PlannedRun:
    """What is on disk for `run_config` in `output_dir`.

    `done` when the result file and the JSONL carry this configuration's fingerprint, the JSONL's selection is
    exactly `questions`, every selected question has a record, and the only error records are of questions in
    `unfixable` (ids whose entry is malformed or whose image is missing now: re-running cannot change them). A
    single run would retry them; the sweep keeps the model unloaded instead.
    """
    output_dir = Path(output_dir)
    selected = [q.id for q in questions.questions]
    planned = PlannedRun(run_config, output_dir / result_file_name(run_config),
                         output_dir / samples_file_name(run_config), STATUS_NEW, 0, len(selected))
    if overwrite:
        planned.detail = "starting over (--overwrite)"
        return planned
    config = fingerprint_config(run_config, model_info, questions)
    fingerprint = fingerprint_of(config)
    try:
        check_result_file(planned.result_path, config, overwrite=False)
        header, records = _journal_of(planned.samples_path, fingerprint)
    except ConfigurationMismatch as exc:
        planned.status, planned.detail = STATUS_CONFLICT, str(exc)
        return planned
    unfixable = set(unfixable)
    finished = [qid for qid in selected if qid in records and records[qid].get("error") is None]
    settled = [qid for qid in selected if qid in records and (records[qid].get("error") is None or qid in unfixable)]
    planned.done_samples = len(finished)
    same_selection = header.get("selection", {}).get("ids") == selected
    result_ok = _result_is(planned.result_path, fingerprint, len(selected))
    if result_ok and same_selection and len(settled) == len(selected):
        planned.status = STATUS_DONE
        errors = len(selected) - len(finished)
        planned.detail = f"{len(selected)} samples"
        if errors:
            planned.detail += f", {errors} recorded errors that cannot be fixed"
    elif finished:
        planned.status = STATUS_RESUME
        planned.detail = f"{len(finished)} of {len(selected)} samples already done"
    return planned


def _journal_of(path: Path, fingerprint: str) -> tuple[dict, dict[str, dict]]:
    """(header, records by id) of the JSONL at `path` ({} and {} when absent); `ConfigurationMismatch` when it
    cannot be read or holds another configuration."""
    if not path.exists():
        return {}, {}
    try:
        header, records = SampleJournal.read(path)
    except (OSError, ValueError) as exc:
        raise ConfigurationMismatch(f"{exc}. Pass --overwrite to start over.") from exc
    if header.get("fingerprint") != fingerprint:
        raise ConfigurationMismatch(
            f"{path} holds per-sample results of a different configuration. Refusing to mix or "
            "overwrite it: pass --overwrite to replace it, or --output-dir to write elsewhere."
        )
    return header, records


def _result_is(path: Path, fingerprint: str, total_samples: int) -> bool:
    """Whether `path` is a result file of this fingerprint over `total_samples` samples."""
    if not path.exists():
        return False
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return result.get("fingerprint") == fingerprint and result.get("total_samples") == total_samples


def not_applicable(model: torch.nn.Module, method: PruningMethod | None) -> str | None:
    """Why `method` cannot prune `model` (what building its pruner refuses), or None."""
    if method is None:
        return None
    try:
        apply_pruning(model, method).remove()
    except ValueError as exc:
        return str(exc)
    return None


@dataclass
class SweepEntry:
    """What the sweep did with one configuration."""

    planned: PlannedRun
    status: str = "pending"  # pending / skipped / computed / not applicable / failed / interrupted
    seconds: float | None = None
    result: dict | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return self.planned.label


@dataclass
class Sweep:
    """A grid evaluated with one model load. Build it, `plan()` (cheap, no model), then `run(load)`.

    `options` are every configuration's (output folder, images, overwrite, on_error, ...); `options.log` also
    receives the sweep's own lines. `unfixable`: question ids whose error records a re-run cannot change.
    """

    run_configs: list[RunConfig]
    questions: QuestionSet
    expected_info: ModelInfo
    options: RunOptions = field(default_factory=RunOptions)
    unfixable: frozenset[str] = frozenset()
    entries: list[SweepEntry] = field(default_factory=list)
    model_loaded: bool = False

    @property
    def output_dir(self) -> Path:
        return Path(self.options.output_dir)

    def plan(self, model_info: ModelInfo | None = None) -> list[PlannedRun]:
        """Plan every configuration against the files in `output_dir` (the expected model info by default)."""
        info = model_info or self.expected_info
        return [
            plan_run(config, info, self.questions, self.output_dir, overwrite=self.options.overwrite,
                     unfixable=self.unfixable)
            for config in self.run_configs
        ]

    @staticmethod
    def conflicts(plans: list[PlannedRun]) -> list[PlannedRun]:
        return [p for p in plans if p.status == STATUS_CONFLICT]

    def run(self, load: Callable[[], LoadedModel]) -> list[SweepEntry]:
        """Evaluate what is not finished. `load()` is called once, and only when something is left to compute.

        A configuration whose method cannot prune this model (a method that reads a [CLS] attention on a tower
        without one, a patch-grid method on anyres tokens, ...) is marked `not applicable`, with the reason in
        `error`, and the sweep goes on. Raises `ConfigurationMismatch` (before loading) when files of another
        configuration are in the way, `SweepError` naming the configuration that failed, and lets
        `KeyboardInterrupt` through with the entry marked `interrupted`. `entries` says what happened to every
        configuration in each case.
        """
        plans = self.plan()
        self._raise_conflicts(plans)
        self.entries = [SweepEntry(p) for p in plans]
        total = len(plans)
        if all(p.status == STATUS_DONE for p in plans):
            for number, entry in enumerate(self.entries, start=1):
                self._skip(number, total, entry)
            return self.entries
        loaded = load()
        self.model_loaded = True
        replanned = self.plan(loaded.info)
        self._raise_conflicts(replanned)
        for entry, planned in zip(self.entries, replanned):
            entry.planned = planned
        for number, entry in enumerate(self.entries, start=1):
            if entry.planned.status == STATUS_DONE:
                self._skip(number, total, entry)
                continue
            entry.error = not_applicable(loaded.model, entry.planned.run_config.method)
            if entry.error is not None:
                entry.status = "not applicable"
                self.options.log(f"[{number}/{total}] {entry.label}: not applicable to this model - {entry.error}")
                continue
            self._compute(number, total, entry, loaded)
        return self.entries

    def _raise_conflicts(self, plans: list[PlannedRun]) -> None:
        conflicts = self.conflicts(plans)
        if conflicts:
            raise ConfigurationMismatch(
                f"{len(conflicts)} of {len(plans)} configurations have files of another configuration in the way "
                "(nothing was evaluated):\n" + "\n".join(f"  - {p.label}: {p.detail}" for p in conflicts)
            )

    def _skip(self, number: int, total: int, entry: SweepEntry) -> None:
        entry.status = "skipped"
        try:
            entry.result = json.loads(entry.planned.result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entry.result = None
        accuracy = f", accuracy {entry.result['accuracy']:.4f}" if entry.result else ""
        self.options.log(f"[{number}/{total}] {entry.label}: already finished ({entry.planned.detail}{accuracy}) - "
                         f"skipped, {entry.planned.result_path.name}")

    def _compute(self, number: int, total: int, entry: SweepEntry, loaded: LoadedModel) -> None:
        planned, log = entry.planned, self.options.log
        doing = (f"resuming, {planned.detail}" if planned.status == STATUS_RESUME
                 else planned.detail or f"{planned.total_samples} samples")
        log(f"[{number}/{total}] {entry.label}: computing ({doing}) -> {planned.result_path.name}")
        started = time.perf_counter()
        try:
            result = evaluate(loaded.model, loaded.processor, self.questions, planned.run_config, self.options,
                              model_info=loaded.info)
        except KeyboardInterrupt:
            entry.status, entry.seconds = "interrupted", time.perf_counter() - started
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the configuration named
            entry.status, entry.seconds, entry.error = "failed", time.perf_counter() - started, str(exc)
            raise SweepError(number, total, entry.label, exc) from exc
        entry.status, entry.seconds, entry.result = "computed", time.perf_counter() - started, result
        latency = result["latency"]["prefill_mean"]
        log(
            f"[{number}/{total}] {entry.label}: done in {entry.seconds:.1f} s - accuracy {result['accuracy']:.4f} "
            f"({result['correct_samples']}/{result['total_samples']}), prefill "
            + ("n/a" if latency is None else f"{latency:.3f} s")
            + f", FLOPs ratio {result['flops_info']['flops_ratio']:.4f}"
        )
        for line in format_failures(result["failures"]):
            log(line)


def format_report(entries: list[SweepEntry], model_loaded: bool) -> str:
    """The sweep's closing summary: one line per configuration (status, accuracy, file) and the counts."""
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.status] = counts.get(entry.status, 0) + 1
    width = max((len(e.label) for e in entries), default=10)
    lines = ["", "Sweep summary"
             + ("" if model_loaded else " (model not loaded: every configuration was already finished)")]
    for entry in entries:
        accuracy = f"accuracy {entry.result['accuracy']:.4f}" if entry.result else " " * 15
        lines.append(f"  {entry.status:<14} {entry.label:<{width}}  {accuracy}  {entry.planned.result_path.name}")
        if entry.status == "not applicable":
            lines.append(f"      {entry.error}")
    order = ("computed", "skipped", "not applicable", "failed", "interrupted", "pending")
    lines.append("  " + ", ".join(f"{counts[s]} {s if s != 'pending' else 'not run'}" for s in order if s in counts)
                 + f" of {len(entries)} configurations")
    return "\n".join(lines)
