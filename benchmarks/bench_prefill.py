#!/usr/bin/env python
"""FastV prefill benchmark: speed-up and memory against the FLOPs ratio, mask-mode FastV and eager FastV.

    python benchmarks/bench_prefill.py --preset scaled            # CPU, fp32, scaled LLaVA shapes (~7-8 min, 2 quiet cores)
    python benchmarks/bench_prefill.py --preset llava7b           # one CUDA GPU, fp16, LLaVA-1.5-7B shapes (< 5 min)
    python benchmarks/bench_prefill.py --preset llava7b --device cpu --smoke   # CPU crash check of the GPU path

Random weights are created directly on the device; nothing is downloaded. Modes, all on the same prompt:

    baseline        unpruned model, SDPA attention (the reference every speed-up is measured against)
    drop            this project: `apply_fastv` (last-query scoring, physical drop after layer K), SDPA
    mask            research-repo FastV: same selection, dropped tokens only masked as keys in layers >= K
    eager_baseline  unpruned model, eager attention
    eager_fastv     original FastV: eager attention, full layer K-1 attention weights, physical drop

Timings are medians over rounds in which every configuration runs once, in a shuffled order (the baseline again
after every few configurations), after a warm-up round, so that drift hits all configurations alike. "prefill" is one forward of
the whole model (vision tower, projector, decoder, last-position logits, KV cache filled), as `generate` does it;
"decoder" is the Llama decoder's share of it (the part the FLOPs ratio describes), timed by hooks on its forward.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import LlavaForConditionalGeneration

try:
    import fastv_advanced  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use its src/ directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fastv_advanced.flops import DecoderShape, prefill_flops  # noqa: E402
from fastv_advanced.run_files import cpu_name, git_commit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    MemoryProbe, Stopwatch, busy_cores, cpu_peak_supported, fix_mmap_threshold, load_average, synchronize,
)
from modes import ALL_MODES, PRUNED_MODES, Config, mode_context, text_attention  # noqa: E402
from presets import (  # noqa: E402
    GRID_K, GRID_RANKS, PRESETS, build_inputs, build_model, image_token_count, resolve_preset, resolve_settings,
)
from selection_cost import selection_inputs, selection_memory_scaling, time_selection  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# timing


class DecoderTimer:
    """Times the Llama decoder's forward inside a model forward (hooks, device-synchronised)."""

    def __init__(self, language_model, device):
        self.device, self.seconds = device, float("nan")
        self._handles = [
            language_model.register_forward_pre_hook(self._start),
            language_model.register_forward_hook(self._stop),
        ]

    def _start(self, module, args):
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0

    def remove(self):
        for h in self._handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------------
# measurements


@dataclass
class Bench:
    model: LlavaForConditionalGeneration
    inputs: dict
    device: torch.device
    n_image: int
    measure_memory_in_timed_runs: bool  # GPU: cheap and exact; CPU: a separate memory round instead
    samples: dict = field(default_factory=dict)  # key -> {"prefill_s": [...], "decoder_s": [...], ...}
    selections: dict = field(default_factory=dict)  # key -> kept positions [batch, S']
    last_logits: dict = field(default_factory=dict)  # key -> FloatTensor[batch, vocab]
    memory: dict = field(default_factory=dict)  # key -> {"prefill_peak_extra_bytes": ..., ...}
    visits: list = field(default_factory=list)  # (round, key, prefill_s, decoder_s) of timed prefills, in run order
    round: int = 0
    selection_tensors: dict = field(default_factory=dict)  # K -> captured layer K-1 tensors (selection_inputs)

    def _record(self, config: Config, name: str, value) -> None:
        self.samples.setdefault(config.key, {}).setdefault(name, []).append(value)

    def visit(self, config: Config, memory: bool = False) -> None:
        """One timed run of a configuration in a prefill round."""
        if config.mode == "selection":
            self.selection(config)
        else:
            self.prefill(config, memory=memory)

    def selection(self, config: Config, reps: int = 5) -> None:
        """The selection step alone on the captured layer K-1 tensors: median of `reps` back-to-back calls."""
        medians = time_selection(self.selection_tensors[config.k], config.k, config.rank, self.device, reps)
        for name, seconds in medians.items():
            self._record(config, name, seconds)

    def prefill(self, config: Config, record: bool = True, memory: bool = False) -> None:
        timer = DecoderTimer(self.model.model.language_model, self.device)
        probe = MemoryProbe(self.device)
        watch = Stopwatch(self.device)
        try:
            with mode_context(self.model, config) as fastv, torch.inference_mode():
                with contextlib.ExitStack() as stack:
                    if memory:
                        stack.enter_context(probe)
                    with watch:
                        out = self.model(**self.inputs, use_cache=True, logits_to_keep=1)
        finally:
            timer.remove()
        if config.key not in self.last_logits:
            self.last_logits[config.key] = out.logits[:, -1].float().cpu()
            if fastv is not None:
                self.selections[config.key] = fastv.last_selection.kept_positions.cpu()
        if record:
            self._record(config, "prefill_s", watch.seconds)
            self._record(config, "decoder_s", timer.seconds)
            self.visits.append((self.round, config.key, watch.seconds, timer.seconds))
        if memory:
            self.memory.setdefault(config.key, {})["prefill_peak_extra_bytes"] = probe.peak_extra
            self.memory[config.key]["prefill_peak_total_bytes"] = probe.peak_total

    def generate(self, config: Config, new_tokens: tuple, record: bool = True, memory: bool = False) -> None:
        prompt_len = self.inputs["input_ids"].shape[1]
        for n in new_tokens:
            probe = MemoryProbe(self.device)
            watch = Stopwatch(self.device)
            with mode_context(self.model, config), torch.inference_mode():
                with contextlib.ExitStack() as stack:
                    if memory and n == max(new_tokens):
                        stack.enter_context(probe)
                    with watch:
                        out = self.model.generate(**self.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            if out.shape[1] != prompt_len + n:
                raise RuntimeError(f"{config.key}: generate returned {out.shape[1] - prompt_len} tokens, expected {n}")
            if record:
                self._record(config, f"e2e_{n}_s", watch.seconds)
            if memory and n == max(new_tokens):
                self.memory.setdefault(config.key, {})[f"generate_{n}_peak_extra_bytes"] = probe.peak_extra
                self.memory[config.key][f"generate_{n}_peak_total_bytes"] = probe.peak_total


def run_rounds(configs: list[Config], visit, min_reps: int, max_reps: int, deadline: float, seed: int,
               anchor_every: int = 0, log=print, label: str = "", reserve_rounds: int = 0, on_round=None) -> int:
    """Interleaved rounds: every config once per round, in a new shuffled order each round.

    With anchor_every = n > 0, the baseline also runs before the first config and after every n configs (so every
    config has a baseline run at most n slots away: see `paired_speedups`). Runs at least `min_reps` rounds, and
    more up to `max_reps` while the next round is expected to end before `deadline` (leaving time for
    `reserve_rounds` more rounds' worth of later work). Returns the rounds run.
    """
    rng = random.Random(seed)
    baseline = [c for c in configs if c.mode == "baseline"]
    others = [c for c in configs if c.mode != "baseline"]
    rounds = 0
    while rounds < max_reps:
        if on_round:
            on_round(rounds + 1)
        start = time.perf_counter()
        rng.shuffle(others)
        if anchor_every and baseline:
            order = []
            for i in range(0, len(others), anchor_every):
                order += baseline + others[i:i + anchor_every]
            order += baseline
        else:
            order = baseline + others
            rng.shuffle(order)
        for config in order:
            visit(config)
        rounds += 1
        took = time.perf_counter() - start
        log(f"  {label} round {rounds}: {took:.1f} s")
        if rounds >= min_reps and time.time() + took * (1 + reserve_rounds) > deadline:
            if rounds < max_reps:
                log(f"  {label}: stopping after {rounds} rounds (time budget)")
            break
    return rounds


def paired_speedups(visits: list, index: int) -> dict:
    """key -> median over its runs of (mean of the nearest baseline runs before and after it in the same round) /
    (its time). Robust to slow drift and to load that changes between rounds (a shared machine).
    index: 2 = whole prefill, 3 = decoder."""
    ratios: dict = {}
    by_round: dict = {}
    for v in visits:
        by_round.setdefault(v[0], []).append(v)
    for run in by_round.values():
        base_at = [i for i, v in enumerate(run) if v[1] == "baseline"]
        for i, v in enumerate(run):
            if v[1] == "baseline" or v[1].startswith("selection"):
                continue
            before = [run[j][index] for j in base_at if j < i][-1:]
            after = [run[j][index] for j in base_at if j > i][:1]
            neighbours = before + after
            if neighbours:
                ratios.setdefault(v[1], []).append(statistics.mean(neighbours) / v[index])
    return {key: statistics.median(r) for key, r in ratios.items()}


# ----------------------------------------------------------------------------------------------------------------
# reporting


def median(values):
    return statistics.median(values) if values else None


def summarise(bench: Bench, configs: list[Config], shape: DecoderShape, n_tokens: int, n_image: int) -> list[dict]:
    base = bench.samples.get("baseline", {})
    base_e2e = {name: median(v) for name, v in base.items() if name.startswith("e2e_")}
    paired = {label: paired_speedups(bench.visits, index) for label, index in (("prefill", 2), ("decoder", 3))}
    rows = []
    for config in configs:
        s = bench.samples.get(config.key, {})
        pruned = config.k is not None
        flops = prefill_flops(shape, n_tokens, n_image, config.rank if pruned else None, config.k)
        theory = 1.0 / flops["ratio"]
        row = {
            "mode": config.mode, "k": config.k, "rank": config.rank, "key": config.key,
            "attention": text_attention(config.mode),
            "tokens_after_k": flops["pruned_num_tokens"] if config.mode in ("drop", "eager_fastv") else n_tokens,
            "flops_ratio": flops["ratio"], "theoretical_speedup": theory,
            "n_prefill": len(s.get("prefill_s", [])),
        }
        for name in ("prefill_s", "decoder_s"):
            values = s.get(name, [])
            row[name] = median(values)
            row[name.replace("_s", "_iqr_s")] = (
                statistics.quantiles(values, n=4)[2] - statistics.quantiles(values, n=4)[0]
                if len(values) >= 2 else None
            )
            row[name.replace("_s", "_samples_s")] = values
        for label in ("prefill", "decoder"):
            values, reference = s.get(f"{label}_s", []), base.get(f"{label}_s", [])
            row[f"{label}_min_s"] = min(values) if values else None
            for suffix, own, ref in (("", row[f"{label}_s"], median(reference)),
                                     ("_min", row[f"{label}_min_s"], min(reference) if reference else None)):
                speedup = ref / own if own and ref else None
                row[f"{label}_speedup{suffix}"] = speedup
                row[f"{label}_speedup{suffix}_over_theoretical"] = speedup / theory if speedup else None
            speedup = 1.0 if config.mode == "baseline" else paired[label].get(config.key)
            row[f"{label}_speedup_paired"] = speedup
            row[f"{label}_speedup_paired_over_theoretical"] = speedup / theory if speedup else None
        for name, values in s.items():
            if name.startswith("e2e_"):
                row[name] = median(values)
                row[f"{name}_samples"] = values
                row[name.replace("_s", "_speedup")] = base_e2e.get(name) / row[name] if base_e2e.get(name) else None
        row.update(bench.memory.get(config.key, {}))
        rows.append(row)
    return rows


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


def targets(rows: list[dict], selection: list[dict], selection_memory: list[dict], n_image: int) -> dict:
    """Issue 5's targets: drop at K=2, R=288 and R=144 within 0.9 x theoretical; selection <= 2% of prefill;
    no O(S^2) memory in the selection (growth exponent of its peak memory over the sequence lengths)."""
    out = {}
    by_key = {r["key"]: r for r in rows}
    for rank in (288, 144):
        row = by_key.get(f"drop/K2/R{int(round(rank * n_image / 576))}")
        if row is None or row["prefill_speedup"] is None:
            continue
        out[f"K2_R{rank}"] = {
            name: row[name] for name in ("theoretical_speedup", "prefill_speedup", "prefill_speedup_over_theoretical",
                                         "decoder_speedup", "decoder_speedup_over_theoretical",
                                         "prefill_speedup_min_over_theoretical", "decoder_speedup_min_over_theoretical",
                                         "prefill_speedup_paired_over_theoretical",
                                         "decoder_speedup_paired_over_theoretical")
        }
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
    lines = [
        f"## FastV prefill benchmark — preset `{meta['preset']}`{' (smoke)' if meta['smoke'] else ''}",
        "",
        f"- device: {meta['device_name']} ({meta['device']}, {meta['dtype']}); torch {meta['torch']}, "
        f"transformers {meta['transformers']}; threads {meta['threads']}; {meta['date']}; commit {meta['git_commit']}",
        f"- command: `{meta['command']}`",
        f"- load average before/after: {meta['load_before']} / {meta['load_after']}; cores kept busy by other "
        f"processes just before the run: {fmt(meta['busy_cores_before'], '.1f')}; elapsed {meta['elapsed_s']:.0f} s",
        f"- prompt: {meta['n_tokens']} tokens ({meta['n_image']} image tokens at position {meta['image_start']}), "
        f"batch {meta['batch']}; decoder {meta['decoder_shape']}; vision: {meta['vision_note']}",
        f"- prefill: median of {meta['prefill_rounds']} interleaved rounds after {meta['warmup']} warm-up "
        f"round(s), baseline re-run after every {meta['anchor_every']} configurations; end-to-end: "
        f"{meta['e2e_rounds']} rounds; speed-ups against `baseline` (unpruned, SDPA). × = ratio of medians; "
        f"paired = median over runs of (neighbouring baseline runs) / (run), robust to load that drifts",
        "",
    ]
    t = result.get("targets", {})
    if t:
        lines += ["### Targets (issue 5)", ""]
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
        lines.append("")
    lines += [
        "### Prefill (theoretical = decoder FLOPs ratio of DESIGN.md §4; mask mode removes no FLOPs)",
        "",
        "| mode | K | R | tokens after K | FLOPs ratio | theor. × | prefill ms | × | ×/theor. | decoder ms | × | ×/theor. "
        "| paired ×/theor. (prefill, decoder) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {fmt(r['k'], 'd')} | {fmt(r['rank'], 'd')} | {r['tokens_after_k']} | "
            f"{r['flops_ratio']:.3f} | {r['theoretical_speedup']:.2f} | {fmt(r['prefill_s'], '.1f', 1e3)} | "
            f"{fmt(r['prefill_speedup'])} | {fmt(r['prefill_speedup_over_theoretical'])} | "
            f"{fmt(r['decoder_s'], '.1f', 1e3)} | {fmt(r['decoder_speedup'])} | "
            f"{fmt(r['decoder_speedup_over_theoretical'])} | {fmt(r['prefill_speedup_paired_over_theoretical'])}, "
            f"{fmt(r['decoder_speedup_paired_over_theoretical'])} |"
        )
    new_tokens = meta["new_tokens"]
    e2e_rows = [r for r in result["rows"] if any(k.startswith("e2e_") for k in r)]
    if e2e_rows:
        n_max = max(new_tokens)
        lines += [
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
    if result.get("selection"):
        lines += [
            "",
            "### Selection step (last-query scores + strategy + top-R + kept positions), timed alone on the tensors "
            "captured at layer K-1",
            "",
            "| K | R | selection ms | + drop gathers ms | drop prefill ms | share of prefill |",
            "|---|---|---|---|---|---|",
        ]
        for s in result["selection"]:
            lines.append(
                f"| {s['k']} | {s['rank']} | {s['selection_s'] * 1e3:.3f} | {s['selection_and_gathers_s'] * 1e3:.3f} | "
                f"{fmt(s.get('drop_prefill_s'), '.1f', 1e3)} | {fmt(s.get('share_of_prefill'), '.2%', 1)} |"
            )
    if result.get("selection_memory"):
        lines += [
            "",
            "### Selection memory vs sequence length (synthetic tensors at this model's heads and widths)",
            "",
            "| S | selection peak extra MiB | its inputs (q, k) MiB | H×S×S weights (eager FastV) MiB |",
            "|---|---|---|---|",
        ]
        for m in result["selection_memory"]:
            lines.append(f"| {m['seq_len']} | {mib(m['selection_peak_extra_bytes'])} | {mib(m['inputs_bytes'])} | "
                         f"{mib(m['full_attention_weights_bytes'])} |")
    if result.get("checks"):
        lines += ["", "### Checks (same prompt; last-position logits)", "",
                  "| K | R | mask same kept | mask vs drop max |Δlogit| | eager same kept (overlap) | "
                  "eager vs drop max |Δlogit| | max |logit| |",
                  "|---|---|---|---|---|---|---|"]
        for c in result["checks"]:
            eager_same = c.get("eager_fastv_same_kept_positions")
            eager_cell = "–" if eager_same is None else (
                "yes" if eager_same else f"no ({c.get('eager_fastv_kept_overlap', 0):.3f})")
            lines.append(
                f"| {c['k']} | {c['rank']} | {fmt(c.get('mask_same_kept_positions'), '')} | "
                f"{fmt(c.get('mask_vs_drop_max_abs_logit_diff'), '.2e')} | {eager_cell} | "
                f"{fmt(c.get('eager_fastv_vs_drop_max_abs_logit_diff'), '.2e')} | {c['logit_scale']:.2f} |"
            )
    if result.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--device", help="cuda or cpu (default: the preset's: llava7b cuda, scaled/tiny cpu)")
    p.add_argument("--smoke", action="store_true",
                   help="smallest grid and one round (on a CPU, llava7b also shrinks to 4 layers x hidden 256)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="directory for the JSON (and markdown) result; a new timestamped file per run")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-k", type=int, nargs="+", help=f"K values (default {list(GRID_K)})")
    p.add_argument("--grid-ranks", type=int, nargs="+",
                   help=f"ranks for 576 image tokens, scaled to the image (default {list(GRID_RANKS)})")
    p.add_argument("--side-by-side-k", type=int, nargs="+", help="K values at which mask/eager FastV also run")
    p.add_argument("--e2e-k", type=int, nargs="+", help="K values of the end-to-end and memory subset")
    p.add_argument("--e2e-ranks", type=int, nargs="+", help="ranks of the end-to-end and memory subset")
    p.add_argument("--new-tokens", type=int, nargs="+", help="end-to-end new-token counts (default 1 32)")
    p.add_argument("--modes", nargs="+", choices=ALL_MODES, help="modes to run (default: all)")
    p.add_argument("--reps", type=int, help="maximum timed prefill rounds")
    p.add_argument("--min-reps", type=int, help="minimum timed prefill rounds (the time budget never cuts these)")
    p.add_argument("--e2e-reps", type=int, help="maximum timed end-to-end rounds")
    p.add_argument("--time-budget", type=float,
                   help="seconds after which no further optional rounds start (default: preset's)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end and memory phase")
    p.add_argument("--profile", type=int, nargs=2, metavar=("K", "R"),
                   help="also profile one prefill of baseline, drop, mask and eager FastV at (K, R) with "
                        "torch.profiler: prints the top operators and writes Chrome traces next to the JSON")
    p.add_argument("--profile-only", action="store_true", help="with --profile: skip the benchmark itself")
    p.add_argument("--cpu-memory", choices=("subprocess", "inprocess"), default="subprocess",
                   help="CPU peak memory: a fresh process per configuration (default; sound) or in this process "
                        "(fast, but the resident set then also reflects what ran before: for tests only)")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)  # internal: measure one configuration's CPU memory
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the benchmark; returns the result dict (also written to --out). Leaves global state as it found it."""
    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    with warnings.catch_warnings():
        try:
            return _run(argv)
        finally:
            transformers.logging.set_verbosity(verbosity)
            torch.set_num_threads(threads)


def _run(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    if args.memory_worker:
        fix_mmap_threshold()  # before the model exists: see measure.fix_mmap_threshold
    preset, device = resolve_preset(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = resolve_settings(args, preset)
    modes = tuple(args.modes or ALL_MODES)
    dtype = getattr(torch, preset.dtype)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    load_before = load_average()
    log(f"[{time.time() - t_start:6.1f}s] preset {args.preset} on {device} ({preset.dtype}), threads "
        f"{torch.get_num_threads()}, load {load_before}")

    warnings.filterwarnings("ignore", message=".*generation flags.*")
    transformers.logging.set_verbosity_error()
    model = build_model(preset, device, dtype, args.seed)
    inputs = build_inputs(model, preset, device, dtype, args.batch, args.seed)
    n_image = image_token_count(model)
    n_tokens = inputs["input_ids"].shape[1]
    shape = DecoderShape.from_text_config(model.config.text_config)
    scale_rank = lambda r: int(round(r * n_image / 576))  # noqa: E731
    grid_ranks = sorted({scale_rank(r) for r in settings["grid_ranks"]}, reverse=True)
    e2e_ranks = sorted({scale_rank(r) for r in settings["e2e_ranks"]}, reverse=True)
    log(f"[{time.time() - t_start:6.1f}s] model built: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M "
        f"params; prompt {n_tokens} tokens, {n_image} image tokens")

    if args.memory_worker:
        return memory_worker(args, model, inputs, device, dtype, preset)

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"bench_prefill_{args.preset}{'_smoke' if args.smoke else ''}_{device.type}_{stamp}"
    out_dir = Path(args.out)
    if args.profile and args.profile_only:
        for _ in range(2):
            with torch.inference_mode():
                model(**inputs, use_cache=True, logits_to_keep=1)
        profiles = profile_prefill(model, inputs, device, *args.profile, out_dir, stem, log)
        return {"meta": {"preset": args.preset, "device": str(device)}, "profile": profiles}

    # configurations: drop on the full grid, mask/eager on side_by_side_k, two unpruned references
    configs = [Config(m) for m in ("baseline", "eager_baseline") if m in modes]
    for mode in PRUNED_MODES:
        if mode not in modes:
            continue
        ks = settings["grid_k"] if mode == "drop" else [k for k in settings["grid_k"] if k in settings["side_by_side_k"]]
        configs += [Config(mode, k, r) for k in ks for r in grid_ranks]
    if "baseline" not in modes:
        raise SystemExit("--modes must include baseline (every speed-up is measured against it)")

    busy_before = busy_cores() if device.type == "cpu" else None
    busy = busy_machine_note(device, busy_before)
    if busy:
        log(f"WARNING: {busy}")
    deadline = t_start + settings["time_budget_s"]
    bench = Bench(model, inputs, device, n_image, measure_memory_in_timed_runs=device.type == "cuda")
    notes = [busy] if busy else []

    # the selection step is timed alone, on the layer K-1 tensors of this prompt, inside the same rounds
    selection_configs = []
    if "drop" in modes:
        for k in settings["grid_k"]:
            bench.selection_tensors[k] = selection_inputs(model, inputs, k)
        selection_configs = [Config("selection", k, r) for k in settings["grid_k"] for r in grid_ranks]

    # global warm-up (kernels, allocator), then a warm-up round of every configuration
    for _ in range(2):
        bench.prefill(Config("baseline"), record=False)
    for _ in range(settings["warmup"]):
        for config in configs:
            bench.prefill(config, record=False)
    log(f"[{time.time() - t_start:6.1f}s] warm-up done ({len(configs)} configurations)")

    # phase 1: prefill, interleaved, baseline every few slots; memory in the timed runs on GPU
    prefill_deadline = t_start + 0.55 * settings["time_budget_s"]
    prefill_rounds = run_rounds(
        configs + selection_configs, lambda c: bench.visit(c, memory=bench.measure_memory_in_timed_runs),
        settings["min_reps"], settings["max_reps"], prefill_deadline, args.seed, settings["anchor_every"], log,
        "prefill", on_round=lambda r: setattr(bench, "round", r))
    log(f"[{time.time() - t_start:6.1f}s] prefill done ({prefill_rounds} rounds)")

    # phase 2: end-to-end and memory on the subset
    e2e_configs = [c for c in configs if c.k is None or (c.k in settings["e2e_k"] and c.rank in e2e_ranks)]
    new_tokens = tuple(settings["new_tokens"])
    e2e_rounds = 0
    memory_method = (
        "torch.cuda.max_memory_allocated, reset before each call" if device.type == "cuda"
        else ("a fresh process per configuration (model built, one warm-up prefill and generate, then the measured "
              "calls), glibc mmap threshold fixed at 64 KiB; " if args.cpu_memory == "subprocess"
              else "in this process (indicative only); ") + cpu_peak_supported()[1]
    )
    if not args.no_e2e:
        warm_tokens = tuple(sorted({min(new_tokens), min(2, max(new_tokens))}))
        for config in e2e_configs if settings["e2e_warmup"] else []:  # warm-up of generate (untimed, short)
            bench.generate(config, warm_tokens, record=False)
        log(f"[{time.time() - t_start:6.1f}s] end-to-end warm-up done ({len(e2e_configs)} configurations)")
        e2e_rounds = run_rounds(
            e2e_configs, lambda c: bench.generate(c, new_tokens), settings["e2e_min_reps"], settings["e2e_max_reps"],
            deadline - 0.05 * settings["time_budget_s"], args.seed + 1, 0, log, "end-to-end", reserve_rounds=1)
        log(f"[{time.time() - t_start:6.1f}s] end-to-end done ({e2e_rounds} rounds)")
        # memory pass, last. GPU: allocator statistics in this process. CPU: a fresh process per configuration
        if device.type == "cuda" or args.cpu_memory == "inprocess":
            for config in random.Random(args.seed + 2).sample(e2e_configs, len(e2e_configs)):
                if device.type == "cpu":
                    bench.prefill(config, record=False, memory=True)
                bench.generate(config, (max(new_tokens),), record=False, memory=True)
        else:
            for config in e2e_configs:
                bench.memory[config.key] = run_memory_worker(args, config.key, max(new_tokens))
        log(f"[{time.time() - t_start:6.1f}s] memory pass done")

    # phase 3: the selection's memory against sequence length; summaries
    rows = summarise(bench, configs, shape, n_tokens, n_image)
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
    seq_lens = [n_tokens * f for f in (1, 2, 4, 8)]
    if device.type == "cpu" and args.cpu_memory == "subprocess":
        selection_memory = run_memory_worker(args, "selection", 0, seq_lens)["selection_memory"]
    else:
        selection_memory = selection_memory_scaling(model, device, dtype, seq_lens, preset.n_before_image,
                                                    preset.n_after_image)
    log(f"[{time.time() - t_start:6.1f}s] selection measured")

    if settings["e2e_k"] != settings["grid_k"] or set(e2e_ranks) != set(grid_ranks):
        notes.append(f"end-to-end and memory columns measured on a subset: K in {list(settings['e2e_k'])}, "
                     f"R in {e2e_ranks} (plus the unpruned references), to keep the run within its time budget")
    if settings["side_by_side_k"] != settings["grid_k"]:
        notes.append(f"mask and eager FastV measured at K in {list(settings['side_by_side_k'])}; drop at every K")
    if prefill_rounds < settings["max_reps"] or (not args.no_e2e and e2e_rounds < settings["e2e_max_reps"]):
        notes.append(f"time budget ({settings['time_budget_s']:.0f} s) cut the rounds to {prefill_rounds} prefill / "
                     f"{e2e_rounds} end-to-end (maximum {settings['max_reps']} / {settings['e2e_max_reps']})")

    result = {
        "meta": {
            "preset": args.preset, "smoke": args.smoke, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{cpu_name()} ({os.cpu_count()} cores visible)",
            "dtype": preset.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "git_commit": git_commit(Path(__file__).resolve().parent),
            "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/bench_prefill.py"] + list(argv if argv is not None
                                                                                 else sys.argv[1:])),
            "load_before": load_before, "load_after": load_average(), "busy_cores_before": busy_before,
            "n_tokens": n_tokens, "n_image": n_image, "image_start": preset.n_before_image, "batch": args.batch,
            "decoder_shape": {k: v for k, v in shape.__dict__.items()},
            "vision_shape": dict(preset.vision), "vision_note": preset.vision_note, "qk_scale": preset.qk_scale,
            "warmup": settings["warmup"], "prefill_rounds": prefill_rounds, "e2e_rounds": e2e_rounds,
            "anchor_every": settings["anchor_every"], "new_tokens": list(new_tokens),
            "e2e_subset": f"K in {list(settings['e2e_k'])}, R in {e2e_ranks}",
            "memory_method": memory_method, "time_budget_s": settings["time_budget_s"],
        },
        "rows": rows,
        "selection": selection,
        "selection_memory": selection_memory,
        "checks": checks(bench, configs),
        "targets": targets(rows, selection, selection_memory, n_image),
        "notes": notes,
    }
    result["meta"]["elapsed_s"] = time.time() - t_start
    text = markdown(result)
    print(text, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1))
    (out_dir / f"{stem}.md").write_text(text + "\n")
    log(f"\nwrote {path} (and .md); elapsed {result['meta']['elapsed_s']:.0f} s")
    result["meta"]["json_path"] = str(path)
    if args.profile:
        result["profile"] = profile_prefill(model, inputs, device, *args.profile, out_dir, stem, log)
    return result


WORKER_MARK = "MEMORY-WORKER-RESULT "


def run_memory_worker(args, key: str, new_tokens: int, seq_lens: list[int] | None = None) -> dict:
    """Measure one configuration's CPU peak memory in a fresh Python process (this script, --memory-worker)."""
    import subprocess

    command = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--device", "cpu",
               "--seed", str(args.seed), "--batch", str(args.batch), "--memory-worker",
               json.dumps({"key": key, "new_tokens": new_tokens, "seq_lens": seq_lens or []})]
    if args.smoke:
        command.append("--smoke")
    if args.threads:
        command += ["--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(WORKER_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker for {key} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(WORKER_MARK):])


def memory_worker(args, model, inputs, device, dtype, preset) -> dict:
    """--memory-worker: warm up one configuration, then measure its prefill and generate peaks (or the selection's
    memory at growing sequence lengths); prints one JSON line."""
    job = json.loads(args.memory_worker)
    bench = Bench(model, inputs, device, image_token_count(model), measure_memory_in_timed_runs=False)
    if job["key"] == "selection":
        result = {"selection_memory": selection_memory_scaling(model, device, dtype, job["seq_lens"],
                                                               preset.n_before_image, preset.n_after_image)}
    else:
        config = Config.from_key(job["key"])
        n = job["new_tokens"]
        bench.prefill(config, record=False)
        bench.generate(config, (min(2, n),), record=False)
        bench.prefill(config, record=False, memory=True)
        bench.generate(config, (n,), record=False, memory=True)
        result = bench.memory[config.key]
    print(WORKER_MARK + json.dumps(result), flush=True)
    return result


def busy_machine_note(device: torch.device, busy: float | None) -> str | None:
    """A warning when other processes already use CPU cores this run's threads need."""
    if device.type != "cpu" or busy is None:
        return None
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    if busy + threads <= cores + 0.3:
        return None
    free = max(1, int(cores - busy + 0.3))
    note = (f"other processes kept {busy:.1f} of {cores} cores busy just before the run, which uses {threads} torch "
            f"thread(s): timings are slower and noisier than on a quiet machine")
    if threads > free:
        note += (f"; with more threads than free cores, OpenMP threads wait on descheduled peers, which makes pruned "
                 f"runs (same operator count, fewer FLOPs) gain much less than they should — re-run on a quiet "
                 f"machine, or with --threads {free}")
    return note


def profile_prefill(model, inputs, device, k: int, rank: int, out_dir: Path, stem: str, log) -> dict:
    """torch.profiler over one warm prefill per mode at (K, R): top operators by self time, and Chrome traces."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for config in (Config("baseline"), Config("drop", k, rank), Config("mask", k, rank), Config("eager_fastv", k, rank)):
        for _ in range(2):  # warm
            with mode_context(model, config), torch.inference_mode():
                model(**inputs, use_cache=True, logits_to_keep=1)
        with mode_context(model, config), torch.inference_mode():
            with profile(activities=activities, record_shapes=True) as prof:
                model(**inputs, use_cache=True, logits_to_keep=1)
                synchronize(device)
        trace = out_dir / f"{stem}_profile_{config.key.replace('/', '_')}.json"
        prof.export_chrome_trace(str(trace))
        table = prof.key_averages().table(sort_by=sort_by, row_limit=15)
        tables[config.key] = {"table": table, "trace": str(trace)}
        log(f"\n#### profile: {config.key} (trace {trace})\n{table}")
    model.set_attn_implementation({"text_config": "sdpa"})
    return tables


if __name__ == "__main__":
    main()
