"""`--zoo`: every pruning method at its papers' budgets, prefill speed-up against its theoretical one, and the share
of the prefill its stage work takes.

The timed prefills are the benchmark's own (`timing.Bench.prefill` in `timing.run_rounds`' interleaved rounds with
the baseline re-run every few configurations), so the speed-up columns mean what they mean for FastV's grid. The
theoretical speed-up is 1 / `fastv_advanced.budget.planned_flops(method, ...)["ratio"]`, from the method's own
schedule (`kept_per_stage`) on this model's decoder shape: decoder FLOPs only, as the decoder-alone column.

The stage work is timed in a separate, instrumented pass (after the timed rounds, so its synchronisations and
wrappers never touch a timed prefill): `StageTimer` wraps, for the duration of one prefill,

- `capture`: what the pruner computes for a stage in the hooks of an earlier layer or of the vision tower —
  `last_query_attention` / `query_rows_attention` + `image_attention` (the attention rows FastV, SparseVLM read),
  `rotated_keys` (DART's keys), the adapter's `vision_features` (VisionZip's [CLS] row and keys);
- `stage`: everything at a stage layer (`Pruner._run_stage`), split into `inputs` (`Pruner._stage_inputs`: the
  stage layer's own attention for PyramidDrop — its q/k projections, RoPE and one softmax row — and the hand-over of
  what was captured), `choose` (the method's `choose`), `select_drop` (`fastv_advanced.pruning.kept_image_tokens`,
  the top-R, `drop_tokens`, the gather of hidden states, and `gather_layer_inputs`, the gathers of mask, positions
  and cos/sin) and the rest (the pruner's bookkeeping and the scatter of merged tokens).

"selection" = `choose` + `select_drop` (what issue 12 asks to stay small); "stage work" = `capture` + `stage`,
everything pruning adds to a prefill except the per-prefill lookup of the image tokens (`image_lookup`, reported
in the JSON). Only the outermost wrapped call counts, so nothing is counted twice (PyramidDrop's own attention
calls `last_query_attention` inside `inputs`). A share is the median, over the instrumented prefills, of the part's
time over that prefill's own time: same run, same machine load (the timed rounds may have run under another).
"""

from __future__ import annotations

import statistics
import time

import torch

import fastv_advanced.pruning as pruning
from fastv_advanced.budget import planned_flops
from measure import Stopwatch, synchronize
from modes import Config, mode_context
from report import _sample_columns, _speedup_columns, fmt, median, run_conditions
from timing import Bench, paired_speedups
from zoo_methods import changed_settings, zoo_grid, zoo_method, zoo_params

CAPTURE_FUNCTIONS = ("last_query_attention", "query_rows_attention", "image_attention", "rotated_keys")
SELECT_FUNCTIONS = ("kept_image_tokens", "drop_tokens", "gather_layer_inputs")
CATEGORIES = ("capture", "stage", "inputs", "choose", "select_drop", "image_lookup")
TOP_LEVEL = ("capture", "stage", "image_lookup")
SHARE_WARNING = 0.02  # issue 5's bound for FastV's selection; above it a method's row is called out
ZOO_TIME_BUDGET_S = {"scaled": 400.0, "llava7b": 270.0, "tiny": 60.0}  # default --time-budget with --zoo


class StageTimer:
    """Times a pruner's stage work during the prefills run inside `with StageTimer(pruner, device) as t:`
    (see the module docstring); `t.seconds[category]` accumulates, device-synchronised around each region."""

    def __init__(self, pruner, device: torch.device):
        self.pruner, self.device = pruner, device
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self._stack: list[str] = []
        self._module_originals: dict = {}

    def _wrap(self, fn, category: str):
        def timed(*args, **kwargs):
            counted = not self._stack if category in TOP_LEVEL else self._stack == ["stage"]
            self._stack.append(category)
            if counted:
                synchronize(self.device)
                start = _now()
            try:
                return fn(*args, **kwargs)
            finally:
                if counted:
                    synchronize(self.device)
                    self.seconds[category] += _now() - start
                self._stack.pop()
        return timed

    def __enter__(self) -> "StageTimer":
        for names, category in ((CAPTURE_FUNCTIONS, "capture"), (SELECT_FUNCTIONS, "select_drop")):
            for name in names:
                original = getattr(pruning, name)
                self._module_originals[name] = original
                setattr(pruning, name, self._wrap(original, category))
        pruner = self.pruner
        pruner._run_stage = self._wrap(pruner._run_stage, "stage")
        pruner._stage_inputs = self._wrap(pruner._stage_inputs, "inputs")
        pruner._find_image_tokens = self._wrap(pruner._find_image_tokens, "image_lookup")
        pruner.method.choose = self._wrap(pruner.method.choose, "choose")
        pruner.adapter.vision_features = self._wrap(pruner.adapter.vision_features, "capture")
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._module_originals.items():
            setattr(pruning, name, original)
        for name in ("_run_stage", "_stage_inputs", "_find_image_tokens"):
            self.pruner.__dict__.pop(name, None)
        self.pruner.method.__dict__.pop("choose", None)
        self.pruner.adapter.__dict__.pop("vision_features", None)


def _now() -> float:
    return time.perf_counter()


def zoo_configs(methods=None) -> list[Config]:
    return [Config("zoo", method=m, preset=p) for m, p in zoo_grid(methods)]


def instrumented_pass(bench: Bench, configs: list[Config], reps: int) -> dict:
    """key -> {"stage_seconds": {category: [per rep]}, "instrumented_prefill_s": [...], "kept_per_stage": [(layer,
    image tokens kept)] of the last rep, "logits_finite": bool}: `reps` prefills per configuration with a
    StageTimer, configurations in order, one rep of each before the next rep."""
    model, inputs, device = bench.model, bench.inputs, bench.device
    out = {c.key: {"stage_seconds": {k: [] for k in CATEGORIES}, "instrumented_prefill_s": []} for c in configs}
    for _ in range(reps):
        for config in configs:
            entry = out[config.key]
            with mode_context(model, config) as pruner, torch.inference_mode():
                with StageTimer(pruner, device) as timer, Stopwatch(device) as watch:
                    logits = model(**inputs, use_cache=True, logits_to_keep=1).logits
                entry["kept_per_stage"] = [[s.layer, s.num_kept] for s in pruner.selections]
            entry["logits_finite"] = bool(torch.isfinite(logits).all())
            entry["instrumented_prefill_s"].append(watch.seconds)
            for category, seconds in timer.seconds.items():
                entry["stage_seconds"][category].append(seconds)
    return out


def zoo_rows(bench: Bench, configs: list[Config], shape, n_tokens: int, n_image: int, stage: dict) -> list[dict]:
    """One row for the baseline and one per (method, preset): planned schedule and FLOPs, timed prefill and decoder
    medians with the three speed-up estimators against the baseline, and the stage work's times and shares."""
    base = bench.samples.get("baseline", {})
    paired = {label: paired_speedups(bench.visits, index) for label, index in (("prefill", 2), ("decoder", 3))}
    rows = []
    for config in [Config("baseline")] + configs:
        s = bench.samples.get(config.key, {})
        row = {"key": config.key, "mode": config.mode, "method": config.method, "preset": config.preset}
        if config.mode == "zoo":
            method = zoo_method(config.method, config.preset, shape.num_layers, n_image)
            plan = planned_flops(method, shape, n_tokens, n_image)
            row.update(
                label=method.label(), parameters=zoo_params(config.method, config.preset, shape.num_layers, n_image),
                mapped={k: list(v) for k, v in changed_settings(config.method, config.preset, shape.num_layers,
                                                                 n_image).items()},
                planned_kept_per_stage=[list(x) for x in method.kept_per_stage(shape.num_layers, n_image)],
                image_tokens_per_layer=plan["image_tokens_per_layer"],
                mean_image_tokens_per_layer=statistics.mean(plan["image_tokens_per_layer"]),
                tokens_after_last_stage=plan["pruned_num_tokens"], flops_ratio=plan["ratio"],
            )
        else:
            row.update(label="unpruned (SDPA)", tokens_after_last_stage=n_tokens, flops_ratio=1.0,
                       mean_image_tokens_per_layer=float(n_image))
        row["theoretical_speedup"] = 1.0 / row["flops_ratio"]
        row["n_prefill"] = len(s.get("prefill_s", []))
        row.update(_sample_columns(s))
        for label in ("prefill", "decoder"):
            speedup_paired = 1.0 if config.mode == "baseline" else paired[label].get(config.key)
            row.update(_speedup_columns(label, s, base, speedup_paired, row[f"{label}_s"], row["theoretical_speedup"]))
        row.update(_ceiling_columns(rows[0] if rows else row, row["flops_ratio"], row["theoretical_speedup"]))
        if config.key in stage:
            row.update(_stage_columns(stage[config.key]))
        rows.append(row)
    return rows


def _ceiling_columns(baseline: dict, flops_ratio: float, theory: float) -> dict:
    """The whole prefill's speed-up if the decoder met its FLOPs ratio exactly and the rest of the prefill (vision
    tower, projector, embeddings, logits: the baseline's prefill - decoder) stayed as it is; and that over the
    theoretical speed-up, the most the prefill column can reach."""
    prefill, decoder = baseline.get("prefill_s"), baseline.get("decoder_s")
    if not prefill or not decoder:
        return {"ceiling_speedup": None, "ceiling_over_theoretical": None}
    ceiling = prefill / (prefill - decoder + decoder * flops_ratio)
    return {"ceiling_speedup": ceiling, "ceiling_over_theoretical": ceiling / theory}


def _stage_columns(entry: dict) -> dict:
    """Medians over the instrumented prefills; each share is the median over them of (part / that prefill)."""
    samples, prefills = entry["stage_seconds"], entry["instrumented_prefill_s"]
    times = {k: median(v) for k, v in samples.items()}
    selection = [c + d for c, d in zip(samples["choose"], samples["select_drop"])]
    work = [c + s for c, s in zip(samples["capture"], samples["stage"])]
    return {
        "stage_seconds": times, "stage_seconds_samples": samples,
        "stage_other_s": max(0.0, times["stage"] - times["inputs"] - times["choose"] - times["select_drop"]),
        "selection_s": median(selection), "stage_work_s": median(work),
        "selection_share": median([x / p for x, p in zip(selection, prefills)]),
        "stage_work_share": median([x / p for x, p in zip(work, prefills)]),
        "instrumented_prefill_s": median(prefills), "instrumented_prefill_samples_s": prefills,
        "measured_kept_per_stage": entry.get("kept_per_stage"), "logits_finite": entry.get("logits_finite"),
    }


def zoo_checks(rows: list[dict]) -> list[str]:
    """Problems worth a note: a schedule that kept other counts than planned, non-finite logits, and every method
    whose stage work is not a small share of its prefill."""
    notes = []
    for r in rows:
        if r["mode"] != "zoo":
            continue
        if r.get("measured_kept_per_stage") is not None and r["measured_kept_per_stage"] != r["planned_kept_per_stage"]:
            notes.append(f"{r['key']}: kept {r['measured_kept_per_stage']} per stage, planned "
                         f"{r['planned_kept_per_stage']}")
        if r.get("logits_finite") is False:
            notes.append(f"{r['key']}: non-finite logits")
        share = r.get("stage_work_share")
        if share is not None and share > SHARE_WARNING:
            notes.append(f"{r['key']}: stage work takes {share:.1%} of the prefill ({r['stage_work_s'] * 1e3:.1f} of "
                         f"{r['instrumented_prefill_s'] * 1e3:.1f} ms; selection {r['selection_share']:.1%}), above "
                         f"{SHARE_WARNING:.0%}")
    return notes


# -- markdown ------------------------------------------------------------------------------------------------------


def zoo_markdown(result: dict) -> str:
    """The zoo report: conditions, the speed-up table, the stage work by part, the mapped presets, notes."""
    lines = _zoo_conditions(result["meta"]) + _zoo_speed_table(result["rows"]) + _zoo_stage_table(result["rows"])
    lines += _zoo_mapping(result["meta"], result["rows"])
    if result.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


def _zoo_conditions(meta: dict) -> list[str]:
    return run_conditions(meta, "Pruning-method zoo, prefill benchmark") + [
        f"- prefill: median of {meta['prefill_rounds']} interleaved rounds after {meta['warmup']} warm-up round(s), "
        f"baseline re-run after every {meta['anchor_every']} configurations; × = ratio of medians against the "
        f"unpruned baseline; paired = median over runs of (neighbouring baseline runs) / (run), robust to load that "
        f"drifts; theor. × = 1 / planned decoder FLOPs ratio (`budget.planned_flops`); ceiling = the prefill's "
        f"speed-up if the decoder met that ratio and the rest (vision tower, projector, logits) stayed; selection (choose + top-R + "
        f"drop) and stage work (+ attention rows, keys, vision features, own attention) from "
        f"{meta['stage_reps']} instrumented prefill(s) per configuration after the rounds: medians, shares of "
        f"those prefills",
        f"- layer mapping: {meta['layer_rule']}",
        "",
    ]


def _zoo_speed_table(rows: list[dict]) -> list[str]:
    lines = [
        "### Prefill speed-up against theoretical, and the share of the prefill the method's own work takes",
        "",
        "| method | preset | settings run | image tokens / layer (mean) | FLOPs ratio | theor. × | prefill ms | × "
        "| ×/theor. | decoder × | ×/theor. | paired ×/theor. | ceiling ÷ theor. | selection ms | share | stage work ms "
        "| share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        settings = ", ".join(f"{k}={_short(v)}" for k, v in (r.get("parameters") or {}).items())
        lines.append(
            f"| {r['method'] or 'baseline'} | {r['preset'] or '–'} | {settings or '–'} | "
            f"{r['mean_image_tokens_per_layer']:.1f} | {r['flops_ratio']:.3f} | {r['theoretical_speedup']:.2f} | "
            f"{fmt(r['prefill_s'], '.1f', 1e3)} | {fmt(r['prefill_speedup'])} | "
            f"{fmt(r['prefill_speedup_over_theoretical'])} | {fmt(r['decoder_speedup'])} | "
            f"{fmt(r['decoder_speedup_over_theoretical'])} | {fmt(r['prefill_speedup_paired_over_theoretical'])} | "
            f"{fmt(r['ceiling_over_theoretical'])} | {fmt(r.get('selection_s'), '.2f', 1e3)} | {fmt(r.get('selection_share'), '.2%')} | "
            f"{fmt(r.get('stage_work_s'), '.2f', 1e3)} | {fmt(r.get('stage_work_share'), '.2%')} |"
        )
    return lines


def _zoo_stage_table(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "### Stage work, by part (ms, medians of the instrumented prefills)",
        "",
        "capture: attention rows / keys / vision features computed in earlier layers' hooks; inputs: the stage "
        "layer's own attention (PyramidDrop) and the hand-over; choose: the method; top-R + drop: the pruner's "
        "`kept_image_tokens`, `drop_tokens` and `gather_layer_inputs`; other: bookkeeping and the scatter of "
        "merged tokens; image lookup: finding the image tokens once per prefill (not counted as stage work).",
        "",
        "| method | preset | planned image tokens after each stage (layer: kept) | capture | inputs | choose "
        "| top-R + drop | other | stage work | image lookup | instrumented prefill ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "stage_seconds" not in r:
            continue
        t = r["stage_seconds"]
        plan = ", ".join(f"{layer}: {kept}" for layer, kept in r["planned_kept_per_stage"])
        lines.append(
            f"| {r['method']} | {r['preset']} | {plan} | {t['capture'] * 1e3:.2f} | {t['inputs'] * 1e3:.2f} | "
            f"{t['choose'] * 1e3:.2f} | {t['select_drop'] * 1e3:.2f} | {r['stage_other_s'] * 1e3:.2f} | "
            f"{r['stage_work_s'] * 1e3:.2f} | {t['image_lookup'] * 1e3:.2f} | "
            f"{fmt(r['instrumented_prefill_s'], '.1f', 1e3)} |"
        )
    return lines


def _zoo_mapping(meta: dict, rows: list[dict]) -> list[str]:
    mapped = [r for r in rows if r.get("mapped")]
    if mapped:
        return ["", f"### Presets mapped to this model ({meta['decoder_shape']['num_layers']} layers, "
                      f"{meta['n_image']} image tokens; paper: 32 layers, 576)", "",
                  "| method | preset | parameter: paper → here |", "|---|---|---|"] + [
            f"| {r['method']} | {r['preset']} | "
            + "; ".join(f"{k}: {_short(a)} → {_short(b)}" for k, (a, b) in r["mapped"].items()) + " |"
            for r in mapped]
    return []


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_short(v) for v in value) + ")"
    return str(value)
