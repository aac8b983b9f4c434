"""Timed runs of the benchmark's configurations: one prefill or generate per call (with the decoder's share and,
when asked, peak memory), the interleaved rounds they run in, the paired speed-up estimator those rounds allow, and
a profile of one prefill per mode."""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from measure import MemoryProbe, Stopwatch, synchronize
from modes import Config, mode_context
from selection_cost import time_selection


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
