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
import datetime as _dt
import json
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

try:
    import fastv_advanced  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use its src/ directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fastv_advanced.flops import DecoderShape  # noqa: E402
from fastv_advanced.run_files import cpu_name, git_commit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import busy_cores, cpu_peak_supported, fix_mmap_threshold, load_average  # noqa: E402
from modes import ALL_MODES, PRUNED_MODES, Config  # noqa: E402
from presets import (  # noqa: E402
    GRID_K, GRID_RANKS, PRESETS, build_inputs, build_model, image_token_count, resolve_preset, resolve_settings,
)
from report import checks, markdown, selection_summary, summarise, targets  # noqa: E402
from selection_cost import selection_inputs, selection_memory_scaling  # noqa: E402
from timing import Bench, profile_prefill, run_rounds  # noqa: E402


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
    selection = selection_summary(bench, selection_configs, rows)
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


if __name__ == "__main__":
    main()
