"""From timed runs to the result: one summary row per configuration (FLOPs ratio, medians, three speed-up
estimators, end-to-end, memory), the selection step's share of the prefill, the cross-mode checks, issue 5's targets,
and the markdown report of a result."""

from __future__ import annotations

import math
import statistics

import torch

from fastv_advanced.flops import DecoderShape, prefill_flops
from modes import Config, text_attention
from timing import Bench, paired_speedups


def median(values):
    return statistics.median(values) if values else None


# -- summaries -----------------------------------------------------------------------------------------------------


def summarise(bench: Bench, configs: list[Config], shape: DecoderShape, n_tokens: int, n_image: int) -> list[dict]:
    """One row per configuration, in `configs` order."""
    base = bench.samples.get("baseline", {})
    base_e2e = {name: median(v) for name, v in base.items() if name.startswith("e2e_")}
    paired = {label: paired_speedups(bench.visits, index) for label, index in (("prefill", 2), ("decoder", 3))}
    rows = []
    for config in configs:
        s = bench.samples.get(config.key, {})
        row = _flops_columns(config, shape, n_tokens, n_image)
        row["n_prefill"] = len(s.get("prefill_s", []))
        row.update(_sample_columns(s))
        for label in ("prefill", "decoder"):
            speedup_paired = 1.0 if config.mode == "baseline" else paired[label].get(config.key)
            row.update(_speedup_columns(label, s, base, speedup_paired, row[f"{label}_s"], row["theoretical_speedup"]))
        row.update(_e2e_columns(s, base_e2e))
        row.update(bench.memory.get(config.key, {}))
        rows.append(row)
    return rows


def _flops_columns(config: Config, shape: DecoderShape, n_tokens: int, n_image: int) -> dict:
    pruned = config.k is not None
    flops = prefill_flops(shape, n_tokens, n_image, config.rank if pruned else None, config.k)
    return {
        "mode": config.mode, "k": config.k, "rank": config.rank, "key": config.key,
        "attention": text_attention(config.mode),
        "tokens_after_k": flops["pruned_num_tokens"] if config.mode in ("drop", "eager_fastv") else n_tokens,
        "flops_ratio": flops["ratio"], "theoretical_speedup": 1.0 / flops["ratio"],
    }


def _sample_columns(s: dict) -> dict:
    """Median, interquartile range and the samples of the whole prefill and of the decoder."""
    row = {}
    for name in ("prefill_s", "decoder_s"):
        values = s.get(name, [])
        row[name] = median(values)
        row[name.replace("_s", "_iqr_s")] = (
            statistics.quantiles(values, n=4)[2] - statistics.quantiles(values, n=4)[0]
            if len(values) >= 2 else None
        )
        row[name.replace("_s", "_samples_s")] = values
    return row


def _speedup_columns(label: str, s: dict, base: dict, paired, own_median, theory: float) -> dict:
    """Ratio of medians, best-of-rounds and paired speed-ups of `label` ("prefill" or "decoder"), and each over
    the theoretical speed-up."""
    values, reference = s.get(f"{label}_s", []), base.get(f"{label}_s", [])
    row = {f"{label}_min_s": min(values) if values else None}
    for suffix, own, ref in (("", own_median, median(reference)),
                             ("_min", row[f"{label}_min_s"], min(reference) if reference else None)):
        speedup = ref / own if own and ref else None
        row[f"{label}_speedup{suffix}"] = speedup
        row[f"{label}_speedup{suffix}_over_theoretical"] = speedup / theory if speedup else None
    row[f"{label}_speedup_paired"] = paired
    row[f"{label}_speedup_paired_over_theoretical"] = paired / theory if paired else None
    return row


def _e2e_columns(s: dict, base_e2e: dict) -> dict:
    row = {}
    for name, values in s.items():
        if name.startswith("e2e_"):
            row[name] = median(values)
            row[f"{name}_samples"] = values
            row[name.replace("_s", "_speedup")] = base_e2e.get(name) / row[name] if base_e2e.get(name) else None
    return row


def selection_summary(bench: Bench, selection_configs: list[Config], rows: list[dict]) -> list[dict]:
    """Per (K, R): the selection step's median time, without and with the drop's gathers, and its share of the
    drop's prefill."""
    by_key = {r["key"]: r for r in rows}
    selection = []
    for config in selection_configs:
        sample = bench.samples.get(config.key, {})
        entry = {"k": config.k, "rank": config.rank,
                 "selection_s": median(sample.get("selection_s", [])),
                 "selection_min_s": min(sample.get("selection_s", [float("nan")])),
                 "selection_and_gathers_s": median(sample.get("selection_and_gathers_s", []))}
        drop = by_key.get(Config("drop", config.k, config.rank).key)
        if drop and drop["prefill_s"] and entry["selection_s"] is not None:
            entry["drop_prefill_s"] = drop["prefill_s"]
            entry["share_of_prefill"] = entry["selection_s"] / drop["prefill_s"]
        selection.append(entry)
    return selection


def checks(bench: Bench, configs: list[Config]) -> list[dict]:
    """Per (K, R) with several modes: same kept tokens, and last-position logits of mask/eager vs drop."""
    out = []
    base_logits = bench.last_logits.get("baseline")
    for config in configs:
        if config.mode != "drop":
            continue
        drop = bench.last_logits[config.key]
        kept = bench.selections[config.key]
        row = {"k": config.k, "rank": config.rank, "logits_finite": bool(torch.isfinite(drop).all())}
        if config.rank == bench.n_image and base_logits is not None:
            row["drop_full_rank_vs_baseline_max_abs_diff"] = float((drop - base_logits).abs().max())
        for other in ("mask", "eager_fastv"):
            key = Config(other, config.k, config.rank).key
            if key not in bench.last_logits:
                continue
            other_kept = bench.selections[key]
            same = other_kept.shape == kept.shape and bool((other_kept == kept).all())
            row[f"{other}_same_kept_positions"] = same
            if not same:
                overlap = len(set(other_kept[0].tolist()) & set(kept[0].tolist())) / max(1, kept.shape[1])
                row[f"{other}_kept_overlap"] = overlap
            row[f"{other}_vs_drop_max_abs_logit_diff"] = float((bench.last_logits[key] - drop).abs().max())
        row["logit_scale"] = float(drop.abs().max())
        out.append(row)
    return out


TARGET_FIELDS = ("theoretical_speedup", "prefill_speedup", "prefill_speedup_over_theoretical",
                 "decoder_speedup", "decoder_speedup_over_theoretical",
                 "prefill_speedup_min_over_theoretical", "decoder_speedup_min_over_theoretical",
                 "prefill_speedup_paired_over_theoretical", "decoder_speedup_paired_over_theoretical")


def targets(rows: list[dict], selection: list[dict], selection_memory: list[dict], n_image: int) -> dict:
    """Issue 5's targets: drop at K=2, R=288 and R=144 within 0.9 x theoretical; selection <= 2% of prefill;
    no O(S^2) memory in the selection (growth exponent of its peak memory over the sequence lengths)."""
    out = {}
    by_key = {r["key"]: r for r in rows}
    for rank in (288, 144):
        row = by_key.get(f"drop/K2/R{int(round(rank * n_image / 576))}")
        if row is None or row["prefill_speedup"] is None:
            continue
        out[f"K2_R{rank}"] = {name: row[name] for name in TARGET_FIELDS}
        out[f"K2_R{rank}"]["met"] = row["prefill_speedup_over_theoretical"] >= 0.9
        out[f"K2_R{rank}"]["rank"] = row["rank"]
    shares = [s["share_of_prefill"] for s in selection if s.get("share_of_prefill") is not None]
    if shares:
        out["selection_max_share_of_prefill"] = max(shares)
        out["selection_share_met"] = max(shares) <= 0.02
    points = [(m["seq_len"], m["selection_peak_extra_bytes"]) for m in selection_memory
              if m["selection_peak_extra_bytes"]]
    if len(points) >= 2:
        (s0, m0), (s1, m1) = points[0], points[-1]
        exponent = math.log(m1 / m0) / math.log(s1 / s0)
        out["selection_memory_growth_exponent"] = exponent  # 1 = linear in S, 2 = quadratic
        out["selection_memory_met"] = exponent < 1.5
    return out


# -- markdown ------------------------------------------------------------------------------------------------------


def fmt(value, spec=".2f", scale=1.0, empty="–"):
    if value is None:
        return empty
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value * scale if scale != 1.0 else value, spec)


def mib(value):
    return fmt(value, ".1f", 1 / 2**20)


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = _header(meta) + _targets_section(result.get("targets", {})) + _prefill_table(result["rows"])
    lines += _end_to_end_table(result["rows"], meta)
    if result.get("selection"):
        lines += _selection_table(result["selection"])
    if result.get("selection_memory"):
        lines += _selection_memory_table(result["selection_memory"])
    if result.get("checks"):
        lines += _checks_table(result["checks"])
    if result.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


def run_conditions(meta: dict, title: str) -> list[str]:
    """The report's title and the run's conditions: device and versions, command, machine load, prompt."""
    return [
        f"## {title} — preset `{meta['preset']}`{' (smoke)' if meta['smoke'] else ''}",
        "",
        f"- device: {meta['device_name']} ({meta['device']}, {meta['dtype']}); torch {meta['torch']}, "
        f"transformers {meta['transformers']}; threads {meta['threads']}; {meta['date']}; commit {meta['git_commit']}",
        f"- command: `{meta['command']}`",
        f"- load average before/after: {meta['load_before']} / {meta['load_after']}; cores kept busy by other "
        f"processes just before the run: {fmt(meta['busy_cores_before'], '.1f')}; elapsed {meta['elapsed_s']:.0f} s",
        f"- prompt: {meta['n_tokens']} tokens ({meta['n_image']} image tokens at position {meta['image_start']}), "
        f"batch {meta['batch']}; decoder {meta['decoder_shape']}; vision: {meta['vision_note']}",
    ]


def _header(meta: dict) -> list[str]:
    return run_conditions(meta, "FastV prefill benchmark") + [
        f"- prefill: median of {meta['prefill_rounds']} interleaved rounds after {meta['warmup']} warm-up "
        f"round(s), baseline re-run after every {meta['anchor_every']} configurations; end-to-end: "
        f"{meta['e2e_rounds']} rounds; speed-ups against `baseline` (unpruned, SDPA). × = ratio of medians; "
        f"paired = median over runs of (neighbouring baseline runs) / (run), robust to load that drifts",
        "",
    ]


def _targets_section(t: dict) -> list[str]:
    if not t:
        return []
    lines = ["### Targets (issue 5)", ""]
    for rank in (288, 144):
        x = t.get(f"K2_R{rank}")
        if x:
            lines.append(
                f"- drop K=2 R={x['rank']}: theoretical {x['theoretical_speedup']:.2f}×, measured prefill "
                f"{x['prefill_speedup']:.2f}× = **{x['prefill_speedup_over_theoretical']:.2f}** of theoretical "
                f"(decoder alone {x['decoder_speedup_over_theoretical']:.2f}; other estimators, prefill / "
                f"decoder: paired with neighbouring baseline runs {fmt(x['prefill_speedup_paired_over_theoretical'])}"
                f" / {fmt(x['decoder_speedup_paired_over_theoretical'])}, best-of-rounds "
                f"{x['prefill_speedup_min_over_theoretical']:.2f} / {x['decoder_speedup_min_over_theoretical']:.2f})"
                f" — target ≥ 0.9: {'met' if x['met'] else 'NOT met'}")
    if "selection_max_share_of_prefill" in t:
        lines.append(f"- selection step: at most {t['selection_max_share_of_prefill']:.3%} of the drop's prefill "
                     f"— target ≤ 2%: {'met' if t['selection_share_met'] else 'NOT met'}")
    if "selection_memory_growth_exponent" in t:
        lines.append(f"- selection peak memory grows as S^{t['selection_memory_growth_exponent']:.2f} over the "
                     f"sequence lengths below (1 = linear, 2 = quadratic) — no O(S²): "
                     f"{'met' if t['selection_memory_met'] else 'NOT met'}")
    return lines + [""]


def _prefill_table(rows: list[dict]) -> list[str]:
    lines = [
        "### Prefill (theoretical = decoder FLOPs ratio of DESIGN.md §4; mask mode removes no FLOPs)",
        "",
        "| mode | K | R | tokens after K | FLOPs ratio | theor. × | prefill ms | × | ×/theor. | decoder ms | × | ×/theor. "
        "| paired ×/theor. (prefill, decoder) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {fmt(r['k'], 'd')} | {fmt(r['rank'], 'd')} | {r['tokens_after_k']} | "
            f"{r['flops_ratio']:.3f} | {r['theoretical_speedup']:.2f} | {fmt(r['prefill_s'], '.1f', 1e3)} | "
            f"{fmt(r['prefill_speedup'])} | {fmt(r['prefill_speedup_over_theoretical'])} | "
            f"{fmt(r['decoder_s'], '.1f', 1e3)} | {fmt(r['decoder_speedup'])} | "
            f"{fmt(r['decoder_speedup_over_theoretical'])} | {fmt(r['prefill_speedup_paired_over_theoretical'])}, "
            f"{fmt(r['decoder_speedup_paired_over_theoretical'])} |"
        )
    return lines


def _end_to_end_table(rows: list[dict], meta: dict) -> list[str]:
    new_tokens = meta["new_tokens"]
    e2e_rows = [r for r in rows if any(k.startswith("e2e_") for k in r)]
    if not e2e_rows:
        return []
    n_max = max(new_tokens)
    lines = [
        "",
        f"### End-to-end (greedy generate, min = max new tokens) and peak memory — subset: {meta['e2e_subset']}",
        "",
        f"Peak memory: {meta['memory_method']}. 'extra' = above the memory in use before the call "
        "(weights, inputs).",
        "",
        "| mode | K | R | " + " | ".join(f"{n} tok ms | ×" for n in new_tokens)
        + f" | prefill peak extra MiB | generate({n_max}) peak extra MiB | peak total MiB |",
        "|---|---|---|" + "---|---|" * len(new_tokens) + "---|---|---|",
    ]
    for r in e2e_rows:
        cells = " | ".join(f"{fmt(r.get(f'e2e_{n}_s'), '.1f', 1e3)} | {fmt(r.get(f'e2e_{n}_speedup'))}"
                           for n in new_tokens)
        lines.append(
            f"| {r['mode']} | {fmt(r['k'], 'd')} | {fmt(r['rank'], 'd')} | {cells} | "
            f"{mib(r.get('prefill_peak_extra_bytes'))} | {mib(r.get(f'generate_{n_max}_peak_extra_bytes'))} | "
            f"{mib(r.get(f'generate_{n_max}_peak_total_bytes', r.get('prefill_peak_total_bytes')))} |"
        )
    return lines


def _selection_table(selection: list[dict]) -> list[str]:
    lines = [
        "",
        "### Selection step (last-query scores + strategy + top-R + kept positions), timed alone on the tensors "
        "captured at layer K-1",
        "",
        "| K | R | selection ms | + drop gathers ms | drop prefill ms | share of prefill |",
        "|---|---|---|---|---|---|",
    ]
    for s in selection:
        lines.append(
            f"| {s['k']} | {s['rank']} | {s['selection_s'] * 1e3:.3f} | {s['selection_and_gathers_s'] * 1e3:.3f} | "
            f"{fmt(s.get('drop_prefill_s'), '.1f', 1e3)} | {fmt(s.get('share_of_prefill'), '.2%', 1)} |"
        )
    return lines


def _selection_memory_table(selection_memory: list[dict]) -> list[str]:
    lines = [
        "",
        "### Selection memory vs sequence length (synthetic tensors at this model's heads and widths)",
        "",
        "| S | selection peak extra MiB | its inputs (q, k) MiB | H×S×S weights (eager FastV) MiB |",
        "|---|---|---|---|",
    ]
    for m in selection_memory:
        lines.append(f"| {m['seq_len']} | {mib(m['selection_peak_extra_bytes'])} | {mib(m['inputs_bytes'])} | "
                     f"{mib(m['full_attention_weights_bytes'])} |")
    return lines


def _checks_table(checks_rows: list[dict]) -> list[str]:
    lines = ["", "### Checks (same prompt; last-position logits)", "",
             "| K | R | mask same kept | mask vs drop max |Δlogit| | eager same kept (overlap) | "
             "eager vs drop max |Δlogit| | max |logit| |",
             "|---|---|---|---|---|---|---|"]
    for c in checks_rows:
        eager_same = c.get("eager_fastv_same_kept_positions")
        eager_cell = "–" if eager_same is None else (
            "yes" if eager_same else f"no ({c.get('eager_fastv_kept_overlap', 0):.3f})")
        lines.append(
            f"| {c['k']} | {c['rank']} | {fmt(c.get('mask_same_kept_positions'), '')} | "
            f"{fmt(c.get('mask_vs_drop_max_abs_logit_diff'), '.2e')} | {eager_cell} | "
            f"{fmt(c.get('eager_fastv_vs_drop_max_abs_logit_diff'), '.2e')} | {c['logit_scale']:.2f} |"
        )
    return lines
