#!/usr/bin/env python
"""Where a method's `choose` spends its time: torch.profiler over `choose` alone, re-run on the stage inputs a real
prefill handed it.

    python benchmarks/profile_choose.py --preset scaled --threads 1 zoo/divprune/64 zoo/sparsevlm/192

For each configuration (a key of `bench_prefill.py --zoo`: zoo/METHOD/PRESET), one prefill on the benchmark's
model captures every stage's `StageInputs`; then each stage's `choose` runs `--reps` times untimed (warm) and
`--reps` times under the profiler. Prints, per stage, the median wall time of one `choose` and the operators by
self CPU time (per call of `choose`: totals divided by the reps). Same model, prompt and preset mapping as the
benchmark (zoo_methods.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import fastv_advanced  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use its src/ directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import synchronize  # noqa: E402
from modes import Config, mode_context  # noqa: E402
from presets import PRESETS, build_inputs, build_model, resolve_preset  # noqa: E402


def capture_stage_inputs(model, inputs, config: Config) -> tuple[object, list]:
    """One prefill with `config`; returns its method and [(stage_index, StageInputs)] as `choose` received them."""
    captured = []
    with mode_context(model, config) as pruner, torch.inference_mode():
        method, original = pruner.method, pruner.method.choose

        def recording(stage_index, stage_inputs):
            captured.append((stage_index, stage_inputs))
            return original(stage_index, stage_inputs)

        method.choose = recording
        try:
            model(**inputs, use_cache=True, logits_to_keep=1)
        finally:
            del method.choose
    return method, captured


def profile_choose(method, stage_index: int, stage_inputs, device, reps: int) -> tuple[float, str]:
    """(median seconds of one `choose`, the profiler's operator table per call) for one stage."""
    from torch.profiler import ProfilerActivity, profile

    times = []
    with torch.inference_mode():
        for _ in range(reps):  # warm, and timed without the profiler
            synchronize(device)
            start = time.perf_counter()
            method.choose(stage_index, stage_inputs)
            synchronize(device)
            times.append(time.perf_counter() - start)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(reps):
                method.choose(stage_index, stage_inputs)
            synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=12)
    return statistics.median(times), table


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("keys", nargs="+", help="configurations, e.g. zoo/divprune/64 zoo/sparsevlm/192")
    p.add_argument("--preset", choices=sorted(PRESETS), default="scaled")
    p.add_argument("--device")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset, device = resolve_preset(args)
    dtype = getattr(torch, preset.dtype)
    model = build_model(preset, device, dtype, args.seed)
    inputs = build_inputs(model, preset, device, dtype, 1, args.seed)
    print(f"preset {args.preset} on {device} ({preset.dtype}), threads {torch.get_num_threads()}, "
          f"{args.reps} profiled calls per stage", flush=True)
    with torch.inference_mode():  # warm the model
        model(**inputs, use_cache=True, logits_to_keep=1)
    out = {}
    for key in args.keys:
        config = Config.from_key(key)
        method, stages = capture_stage_inputs(model, inputs, config)
        for stage_index, stage_inputs in stages:
            seconds, table = profile_choose(method, stage_index, stage_inputs, device, args.reps)
            out[f"{key}#{stage_index}"] = {"seconds": seconds, "table": table}
            print(f"\n#### {key} ({method.label()}), stage {stage_index}: {stage_inputs.num_image_tokens} image tokens "
                  f"in; choose {seconds * 1e3:.2f} ms (median of {args.reps}); profiler totals over {args.reps} "
                  f"calls\n{table}", flush=True)
    return out


if __name__ == "__main__":
    main()
