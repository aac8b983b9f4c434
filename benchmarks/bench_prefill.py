#!/usr/bin/env python
"""FastV prefill benchmark: speed-up and memory against the FLOPs ratio, mask-mode FastV and eager FastV.

    python benchmarks/bench_prefill.py --preset scaled            # CPU, fp32, scaled LLaVA shapes (~7-8 min, 2 quiet cores)
    python benchmarks/bench_prefill.py --preset llava7b           # one CUDA GPU, fp16, LLaVA-1.5-7B shapes (< 5 min)
    python benchmarks/bench_prefill.py --preset llava7b --device cpu --smoke   # CPU crash check of the GPU path
    python benchmarks/bench_prefill.py --preset scaled --zoo --threads 1     # every pruning method at 192/128/64
    python benchmarks/bench_prefill.py --preset llava7b --zoo                # the same on one CUDA GPU, 7B shapes

Random weights are created directly on the device; nothing is downloaded. Modes, all on the same prompt:

    baseline        unpruned model, SDPA attention (the reference every speed-up is measured against)
    drop            this project: `apply_fastv` (last-query scoring, physical drop after layer K), SDPA
    mask            research-repo FastV: same selection, dropped tokens only masked as keys in layers >= K
    eager_baseline  unpruned model, eager attention
    eager_fastv     original FastV: eager attention, full layer K-1 attention weights, physical drop

With --zoo (or --methods NAME ...), the run compares instead every pruning method of the package at its papers'
presets (192 / 128 / 64 image tokens; uniform and pool 144 / 64), mapped to the model's layers (zoo_methods.py),
against the baseline and their theoretical speed-up, and times each method's stage work (zoo.py).

Timings are medians over rounds in which every configuration runs once, in a shuffled order (the baseline again
after every few configurations), after a warm-up round, so that drift hits all configurations alike. "prefill" is one forward of
the whole model (vision tower, projector, decoder, last-position logits, KV cache filled), as `generate` does it;
"decoder" is the Llama decoder's share of it (the part the FLOPs ratio describes), timed by hooks on its forward.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
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
from fastv_advanced.flops import DecoderShape  # noqa: E402
from fastv_advanced.run_files import busy_cores, cpu_name, git_commit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    busy_machine_note, cpu_peak_supported, fix_mmap_threshold, load_average,
)
from modes import ALL_MODES, PRUNED_MODES, Config  # noqa: E402
from presets import (  # noqa: E402
    GRID_K, GRID_RANKS, PRESETS, Preset, build_inputs, build_model, image_token_count, resolve_preset, resolve_settings,
)
from report import checks, markdown, selection_summary, summarise, targets  # noqa: E402
from selection_cost import selection_inputs, selection_memory_scaling  # noqa: E402
from timing import Bench, profile_prefill, run_rounds  # noqa: E402
from zoo import ZOO_TIME_BUDGET_S, instrumented_pass, zoo_checks, zoo_configs, zoo_markdown, zoo_rows  # noqa: E402
from zoo_methods import LAYER_RULE, ZOO_METHODS  # noqa: E402


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
    p.add_argument("--zoo", action="store_true",
                   help="compare every pruning method at its papers' presets instead of FastV's grid (no end-to-end "
                        "or memory phase)")
    p.add_argument("--methods", nargs="+", choices=ZOO_METHODS, metavar="NAME",
                   help=f"the methods of --zoo (implies --zoo; default: all of {', '.join(ZOO_METHODS)})")
    p.add_argument("--stage-reps", type=int,
                   help="--zoo: instrumented prefills per configuration that time the stage work (default 5; smoke 1)")
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


@dataclass
class Run:
    """One benchmark run: its command line, the settings it resolved to, and the model and prompt it built."""

    args: argparse.Namespace
    argv: list | None
    preset: Preset
    settings: dict
    modes: tuple
    device: torch.device
    dtype: torch.dtype
    t_start: float
    load_before: list | None
    model: LlavaForConditionalGeneration | None = None
    inputs: dict = field(default_factory=dict)
    n_image: int = 0
    n_tokens: int = 0
    shape: DecoderShape | None = None
    grid_ranks: list = field(default_factory=list)  # the grid's ranks scaled to this image's token count
    e2e_ranks: list = field(default_factory=list)

    @staticmethod
    def log(msg: str) -> None:
        print(msg, flush=True)

    def stamp(self, msg: str) -> None:
        """Log with the seconds since the run started."""
        self.log(f"[{time.time() - self.t_start:6.1f}s] {msg}")


def _run(argv=None) -> dict:
    run = _start(argv)
    args, device = run.args, run.device
    if args.memory_worker:
        return memory_worker(args, run.model, run.inputs, device, run.dtype, run.preset)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"bench_prefill_{args.preset}{'_smoke' if args.smoke else ''}_{device.type}_{stamp}"
    out_dir = Path(args.out)
    if args.profile and args.profile_only:
        return _profile_only(run, out_dir, stem)
    if args.zoo or args.methods:
        return _zoo_run(run, out_dir, stem.replace("bench_prefill_", "bench_prefill_zoo_", 1))

    configs = _configurations(run)
    busy_before = busy_cores() if device.type == "cpu" else None
    busy = busy_machine_note(device, busy_before)
    if busy:
        run.log(f"WARNING: {busy}")
    bench = Bench(run.model, run.inputs, device, run.n_image, measure_memory_in_timed_runs=device.type == "cuda")
    selection_configs = _capture_selection_inputs(run, bench)
    prefill_rounds = _prefill_phase(run, bench, configs, selection_configs)
    memory_method = _memory_method(run)
    e2e_rounds = 0 if args.no_e2e else _end_to_end_phase(run, bench, configs)

    rows = summarise(bench, configs, run.shape, run.n_tokens, run.n_image)
    selection = selection_summary(bench, selection_configs, rows)
    selection_memory = _selection_memory(run)
    result = {
        "meta": _meta(run, busy_before, prefill_rounds, e2e_rounds, memory_method),
        "rows": rows,
        "selection": selection,
        "selection_memory": selection_memory,
        "checks": checks(bench, configs),
        "targets": targets(rows, selection, selection_memory, run.n_image),
        "notes": ([busy] if busy else []) + _budget_notes(run, prefill_rounds, e2e_rounds),
    }
    result["meta"]["elapsed_s"] = time.time() - run.t_start
    _write(run, result, out_dir, stem)
    if args.profile:
        result["profile"] = profile_prefill(run.model, run.inputs, device, *args.profile, out_dir, stem, run.log)
    return result


def _start(argv) -> Run:
    """Parse the command line, resolve the preset, build the model and its prompt."""
    args = parse_args(argv)
    t_start = time.time()
    if args.memory_worker:
        fix_mmap_threshold()  # before the model exists: see measure.fix_mmap_threshold
    preset, device = resolve_preset(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args, argv, preset, resolve_settings(args, preset), tuple(args.modes or ALL_MODES), device,
              getattr(torch, preset.dtype), t_start, load_average())
    run.stamp(f"preset {args.preset} on {device} ({preset.dtype}), threads {torch.get_num_threads()}, "
              f"load {run.load_before}")

    warnings.filterwarnings("ignore", message=".*generation flags.*")
    transformers.logging.set_verbosity_error()
    run.model = build_model(preset, device, run.dtype, args.seed)
    run.inputs = build_inputs(run.model, preset, device, run.dtype, args.batch, args.seed)
    run.n_image = image_token_count(run.model)
    run.n_tokens = run.inputs["input_ids"].shape[1]
    run.shape = DecoderShape.from_text_config(run.model.config.text_config)
    scale_rank = lambda r: int(round(r * run.n_image / 576))  # noqa: E731
    run.grid_ranks = sorted({scale_rank(r) for r in run.settings["grid_ranks"]}, reverse=True)
    run.e2e_ranks = sorted({scale_rank(r) for r in run.settings["e2e_ranks"]}, reverse=True)
    run.stamp(f"model built: {sum(p.numel() for p in run.model.parameters()) / 1e6:.0f} M params; prompt "
              f"{run.n_tokens} tokens, {run.n_image} image tokens")
    return run


def _zoo_run(run: Run, out_dir: Path, stem: str) -> dict:
    """--zoo: warm-up, interleaved prefill rounds of the baseline and every method x preset, then the instrumented
    pass that times each one's stage work; writes the zoo report."""
    args, settings, device = run.args, run.settings, run.device
    if args.time_budget is None:
        settings["time_budget_s"] = ZOO_TIME_BUDGET_S[args.preset]
    stage_reps = args.stage_reps or (1 if args.smoke else 5)
    configs = [Config("baseline")] + zoo_configs(args.methods)
    busy_before = busy_cores() if device.type == "cpu" else None
    busy = busy_machine_note(device, busy_before)
    if busy:
        run.log(f"WARNING: {busy}")
    bench = Bench(run.model, run.inputs, device, run.n_image, measure_memory_in_timed_runs=False)
    for _ in range(2):
        bench.prefill(Config("baseline"), record=False)
    for _ in range(settings["warmup"]):
        for config in configs:
            bench.prefill(config, record=False)
    run.stamp(f"warm-up done ({len(configs)} configurations)")
    # the instrumented pass runs each method stage_reps times: about stage_reps x 0.6 of a round (no baselines)
    rounds = run_rounds(configs, bench.prefill, settings["min_reps"], settings["max_reps"],
                        run.t_start + settings["time_budget_s"], args.seed, settings["anchor_every"], run.log,
                        "zoo prefill", reserve_rounds=max(1, round(0.6 * stage_reps)),
                        on_round=lambda r: setattr(bench, "round", r))
    run.stamp(f"prefill done ({rounds} rounds)")
    stage = instrumented_pass(bench, configs[1:], stage_reps)
    run.stamp(f"stage work timed ({stage_reps} instrumented prefill(s) per configuration)")
    rows = zoo_rows(bench, configs[1:], run.shape, run.n_tokens, run.n_image, stage)
    meta = _meta(run, busy_before, rounds, 0, "not measured with --zoo")
    meta.update(zoo=True, methods=list(args.methods or ZOO_METHODS), stage_reps=stage_reps, layer_rule=LAYER_RULE)
    for key in ("e2e_rounds", "new_tokens", "e2e_subset"):
        meta.pop(key)
    notes = ([busy] if busy else []) + zoo_checks(rows)
    if rounds < settings["max_reps"]:
        notes.append(f"time budget ({settings['time_budget_s']:.0f} s) cut the prefill rounds to {rounds} "
                     f"(maximum {settings['max_reps']})")
    result = {"meta": meta, "rows": rows, "notes": notes}
    result["meta"]["elapsed_s"] = time.time() - run.t_start
    _write(run, result, out_dir, stem, zoo_markdown)
    return result


def _profile_only(run: Run, out_dir: Path, stem: str) -> dict:
    """--profile K R --profile-only: two warm prefills, then the profiles; no benchmark."""
    for _ in range(2):
        with torch.inference_mode():
            run.model(**run.inputs, use_cache=True, logits_to_keep=1)
    profiles = profile_prefill(run.model, run.inputs, run.device, *run.args.profile, out_dir, stem, run.log)
    return {"meta": {"preset": run.args.preset, "device": str(run.device)}, "profile": profiles}


def _configurations(run: Run) -> list[Config]:
    """Drop on the full grid, mask / eager FastV at the side-by-side K values, and the two unpruned references."""
    settings, modes = run.settings, run.modes
    configs = [Config(m) for m in ("baseline", "eager_baseline") if m in modes]
    for mode in PRUNED_MODES:
        if mode not in modes:
            continue
        ks = settings["grid_k"] if mode == "drop" else [k for k in settings["grid_k"] if k in settings["side_by_side_k"]]
        configs += [Config(mode, k, r) for k in ks for r in run.grid_ranks]
    if "baseline" not in modes:
        raise SystemExit("--modes must include baseline (every speed-up is measured against it)")
    return configs


def _capture_selection_inputs(run: Run, bench: Bench) -> list[Config]:
    """The selection step is timed alone, on the layer K-1 tensors of this prompt, inside the same rounds as the
    prefills: capture those tensors for every K; returns the selection's configurations (none without drop)."""
    if "drop" not in run.modes:
        return []
    for k in run.settings["grid_k"]:
        bench.selection_tensors[k] = selection_inputs(run.model, run.inputs, k)
    return [Config("selection", k, r) for k in run.settings["grid_k"] for r in run.grid_ranks]


def _prefill_phase(run: Run, bench: Bench, configs: list[Config], selection_configs: list[Config]) -> int:
    """Warm-up, then interleaved prefill rounds (baseline every few slots; memory in the timed runs on GPU).
    Returns the rounds run."""
    settings = run.settings
    # global warm-up (kernels, allocator), then a warm-up round of every configuration
    for _ in range(2):
        bench.prefill(Config("baseline"), record=False)
    for _ in range(settings["warmup"]):
        for config in configs:
            bench.prefill(config, record=False)
    run.stamp(f"warm-up done ({len(configs)} configurations)")

    prefill_deadline = run.t_start + 0.55 * settings["time_budget_s"]
    prefill_rounds = run_rounds(
        configs + selection_configs, lambda c: bench.visit(c, memory=bench.measure_memory_in_timed_runs),
        settings["min_reps"], settings["max_reps"], prefill_deadline, run.args.seed, settings["anchor_every"],
        run.log, "prefill", on_round=lambda r: setattr(bench, "round", r))
    run.stamp(f"prefill done ({prefill_rounds} rounds)")
    return prefill_rounds


def _memory_method(run: Run) -> str:
    if run.device.type == "cuda":
        return "torch.cuda.max_memory_allocated, reset before each call"
    return ("a fresh process per configuration (model built, one warm-up prefill and generate, then the measured "
            "calls), glibc mmap threshold fixed at 64 KiB; " if run.args.cpu_memory == "subprocess"
            else "in this process (indicative only); ") + cpu_peak_supported()[1]


def _end_to_end_configs(run: Run, configs: list[Config]) -> list[Config]:
    """The end-to-end and memory subset: the unpruned references and the pruned ones at e2e_k x e2e_ranks."""
    e2e_k = run.settings["e2e_k"]
    return [c for c in configs if c.k is None or (c.k in e2e_k and c.rank in run.e2e_ranks)]


def _end_to_end_phase(run: Run, bench: Bench, configs: list[Config]) -> int:
    """Timed `generate` rounds on the end-to-end subset, then its peak memory. Returns the rounds run."""
    settings, args = run.settings, run.args
    e2e_configs = _end_to_end_configs(run, configs)
    new_tokens = tuple(settings["new_tokens"])
    warm_tokens = tuple(sorted({min(new_tokens), min(2, max(new_tokens))}))
    for config in e2e_configs if settings["e2e_warmup"] else []:  # warm-up of generate (untimed, short)
        bench.generate(config, warm_tokens, record=False)
    run.stamp(f"end-to-end warm-up done ({len(e2e_configs)} configurations)")
    deadline = run.t_start + settings["time_budget_s"]
    e2e_rounds = run_rounds(
        e2e_configs, lambda c: bench.generate(c, new_tokens), settings["e2e_min_reps"], settings["e2e_max_reps"],
        deadline - 0.05 * settings["time_budget_s"], args.seed + 1, 0, run.log, "end-to-end", reserve_rounds=1)
    run.stamp(f"end-to-end done ({e2e_rounds} rounds)")
    _memory_pass(run, bench, e2e_configs, max(new_tokens))
    run.stamp("memory pass done")
    return e2e_rounds


def _memory_pass(run: Run, bench: Bench, e2e_configs: list[Config], new_tokens: int) -> None:
    """Peak memory of each configuration's prefill and generate(new_tokens), last. GPU: allocator statistics in
    this process. CPU: a fresh process per configuration (or, --cpu-memory inprocess, this one)."""
    device, args = run.device, run.args
    if device.type == "cuda" or args.cpu_memory == "inprocess":
        for config in random.Random(args.seed + 2).sample(e2e_configs, len(e2e_configs)):
            if device.type == "cpu":
                bench.prefill(config, record=False, memory=True)
            bench.generate(config, (new_tokens,), record=False, memory=True)
    else:
        for config in e2e_configs:
            bench.memory[config.key] = run_memory_worker(args, config.key, new_tokens)


def _selection_memory(run: Run) -> list[dict]:
    """The selection's peak memory at 1, 2, 4 and 8 times the prompt's length (CPU: in a fresh process)."""
    seq_lens = [run.n_tokens * f for f in (1, 2, 4, 8)]
    if run.device.type == "cpu" and run.args.cpu_memory == "subprocess":
        selection_memory = run_memory_worker(run.args, "selection", 0, seq_lens)["selection_memory"]
    else:
        selection_memory = selection_memory_scaling(run.model, run.device, run.dtype, seq_lens,
                                                    run.preset.n_before_image, run.preset.n_after_image)
    run.stamp("selection measured")
    return selection_memory


def _budget_notes(run: Run, prefill_rounds: int, e2e_rounds: int) -> list[str]:
    """What this run measured less of than the full grid and the maximum rounds, and why."""
    settings, notes = run.settings, []
    if settings["e2e_k"] != settings["grid_k"] or set(run.e2e_ranks) != set(run.grid_ranks):
        notes.append(f"end-to-end and memory columns measured on a subset: K in {list(settings['e2e_k'])}, "
                     f"R in {run.e2e_ranks} (plus the unpruned references), to keep the run within its time budget")
    if settings["side_by_side_k"] != settings["grid_k"]:
        notes.append(f"mask and eager FastV measured at K in {list(settings['side_by_side_k'])}; drop at every K")
    if prefill_rounds < settings["max_reps"] or (not run.args.no_e2e and e2e_rounds < settings["e2e_max_reps"]):
        notes.append(f"time budget ({settings['time_budget_s']:.0f} s) cut the rounds to {prefill_rounds} prefill / "
                     f"{e2e_rounds} end-to-end (maximum {settings['max_reps']} / {settings['e2e_max_reps']})")
    return notes


def _meta(run: Run, busy_before, prefill_rounds: int, e2e_rounds: int, memory_method: str) -> dict:
    """Device, versions, command, load, prompt and model shapes, and the rounds this run made."""
    args, device, preset, settings = run.args, run.device, run.preset, run.settings
    return {
        "preset": args.preset, "smoke": args.smoke, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{cpu_name()} ({os.cpu_count()} cores visible)",
        "dtype": preset.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "git_commit": git_commit(Path(__file__).resolve().parent),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/bench_prefill.py"] + list(run.argv if run.argv is not None
                                                                             else sys.argv[1:])),
        "load_before": run.load_before, "load_after": load_average(), "busy_cores_before": busy_before,
        "n_tokens": run.n_tokens, "n_image": run.n_image, "image_start": preset.n_before_image, "batch": args.batch,
        "decoder_shape": {k: v for k, v in run.shape.__dict__.items()},
        "vision_shape": dict(preset.vision), "vision_note": preset.vision_note, "qk_scale": preset.qk_scale,
        "warmup": settings["warmup"], "prefill_rounds": prefill_rounds, "e2e_rounds": e2e_rounds,
        "anchor_every": settings["anchor_every"], "new_tokens": list(settings["new_tokens"]),
        "e2e_subset": f"K in {list(settings['e2e_k'])}, R in {run.e2e_ranks}",
        "memory_method": memory_method, "time_budget_s": settings["time_budget_s"],
    }


def _write(run: Run, result: dict, out_dir: Path, stem: str, render=markdown) -> None:
    """Print the markdown report and write it and the JSON result to out_dir/stem.{json,md}."""
    text = render(result)
    print(text, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1))
    (out_dir / f"{stem}.md").write_text(text + "\n")
    run.log(f"\nwrote {path} (and .md); elapsed {result['meta']['elapsed_s']:.0f} s")
    result["meta"]["json_path"] = str(path)


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


if __name__ == "__main__":
    main()
