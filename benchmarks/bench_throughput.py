#!/usr/bin/env python
"""End-to-end ScienceQA evaluation throughput at several batch sizes: baseline and FastV (K=2, R=288 and 144).

    python benchmarks/bench_throughput.py --preset scaled                      # CPU, fp32, scaled LLaVA shapes
    python benchmarks/bench_throughput.py --preset scaled --num-questions 32 --threads 1
    python benchmarks/bench_throughput.py --preset llava7b                     # one CUDA GPU, fp16, 7B shapes

Each configuration x batch size is one `fastv_advanced.evaluation.evaluate` call over the same questions (the
embedded sample's questions and images, the embedded tokenizer and CLIP image processor) on a random-weight model
of the preset's shapes (benchmarks/presets.py; nothing is downloaded): image loading, preprocessing, prompts,
batching, `generate`, answer parsing and the per-sample JSONL, i.e. what `eval_scivqa.py --batch-size N` does.
Questions/s is measured on the wall clock around the call, after one untimed warm-up call per configuration.
Random weights never produce EOS, so every answer is `--max-new-tokens` long: the default 2 is what LLaVA-1.5
answers a `--single-pred-prompt` ScienceQA question with (a letter, then EOS).

The ratios are against batch 1 of the same configuration and against the baseline at batch 1. At the end the
script prints the command that measures the full ScienceQA-IMG test set with LLaVA-1.5-7B on one GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
try:
    import fastv_advanced  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use its src/ directly
    sys.path.insert(0, str(ROOT / "src"))
from fastv_advanced import FastVConfig  # noqa: E402
from fastv_advanced.embedded import resolve_embedded  # noqa: E402
from fastv_advanced.evaluation import RunOptions, evaluate  # noqa: E402
from fastv_advanced.model_loading import load_model, model_info_from  # noqa: E402
from fastv_advanced.run_config import RunConfig  # noqa: E402
from fastv_advanced.run_files import busy_cores, cpu_name, git_commit  # noqa: E402
from fastv_advanced.scienceqa import load_questions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import load_average  # noqa: E402
from presets import PRESETS, build_model  # noqa: E402

THROUGHPUT_PRESETS = ("scaled", "llava7b")  # 336 px / patch 14 = 576 image tokens, like LLaVA-1.5

GPU_COMMAND = """\
# Full ScienceQA-IMG test set (2,017 questions with an image), LLaVA-1.5-7B, one GPU: baseline and FastV K=2
# R=288 / R=144 in one process (one model load), at batch 1 (the guide's per-question latency) and batch 32.
# Each result file records wall_time_s, throughput.questions_per_s and the accuracy; predictions are the same
# at both batch sizes (compare the JSONLs' "prediction" fields, or fastv-compare).
for BS in 1 32; do
  fastv-sweep --model-path ./models/llava-1.5-7b-hf \\
      --question-file ./data/scienceqa/himap-inference-MCQ.json --image-folder ./data/scienceqa/images/test \\
      --single-pred-prompt --dtype float16 --methods max_head --ranks 288 144 --agg-layers 2 \\
      --batch-size $BS --output-dir runs/scienceqa-img-full/batch$BS --no-progress
done
# (the 2,017 questions: `python -m fastv_advanced.scienceqa ScienceQA/data/scienceqa --split test --images-only
#  -o ./data/scienceqa/himap-inference-MCQ.json` from the official release)
# The same measurement on random 7B-shaped weights, without the checkpoint or the dataset:
python benchmarks/bench_throughput.py --preset llava7b --num-questions 256 --batch-sizes 1 8 32"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", choices=THROUGHPUT_PRESETS, default="scaled",
                   help="model shapes (benchmarks/presets.py); both take 336-px images, as the embedded processor makes")
    p.add_argument("--device", help="cuda or cpu (default: the preset's)")
    p.add_argument("--num-questions", type=int, default=64,
                   help="questions per measurement (the embedded sample has 300; use at least the largest batch)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--ranks", type=int, nargs="+", default=[288, 144], help="FastV R values (K=2)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="measure every cell this many times (median)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="directory for the JSON and markdown result (a new timestamped file per run)")
    return p.parse_args(argv)


def configurations(args) -> dict[str, RunConfig]:
    configs = {} if args.no_baseline else {"baseline": None}
    for rank in args.ranks:
        configs[f"FastV K=2 R={rank}"] = FastVConfig(agg_layer=2, attention_rank=rank,
                                                     token_selection_method="avg_all_heads")
    return {name: RunConfig(method=method, single_pred_prompt=True, max_new_tokens=args.max_new_tokens)
            for name, method in configs.items()}


def measure(model, processor, info, questions, images, run_config, batch_size, workdir) -> dict:
    """One `evaluate` call, timed on the wall clock (the device synchronised before and after)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = evaluate(model, processor, questions, run_config,
                      RunOptions(output_dir=workdir, image_folder=images, overwrite=True, progress=False,
                                 batch_size=batch_size, log=lambda line: None),
                      model_info=info)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    prompt_tokens = sum(r["num_tokens"] for r in _records(result))
    return {"seconds": seconds, "questions_per_s": len(questions) / seconds, "prompt_tokens": prompt_tokens,
            "generate_questions_per_s": result["throughput"]["questions_per_s"],
            "prefill_tokens_per_s": result["throughput"]["prefill_tokens_per_s"],
            "predictions": [r["prediction"] for r in _records(result)],
            "peak_gpu_memory_bytes": result.get("peak_gpu_memory_bytes")}


def _records(result) -> list[dict]:
    lines = Path(result["samples_path"]).read_text().splitlines()
    return [json.loads(line) for line in lines[1:]]


def _measure_cells(args, model, processor, info, questions, image_folder, configs) -> dict:
    """(configuration, batch size) -> one measurement per round, after a warm-up evaluation of each configuration."""
    cells: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run_config in configs.items():  # warm-up: lazy initialisation, allocator, first-call costs
            evaluate(model, processor, questions.head(min(4, len(questions))), run_config,
                     RunOptions(output_dir=Path(tmp) / "warmup", image_folder=image_folder, overwrite=True,
                                progress=False, batch_size=min(4, max(args.batch_sizes)), log=lambda line: None),
                     model_info=info)
        for round_index in range(args.rounds):
            for name, run_config in configs.items():
                for batch_size in args.batch_sizes:
                    cell = measure(model, processor, info, questions, image_folder, run_config, batch_size,
                                   Path(tmp) / f"{round_index}-{batch_size}")
                    cells.setdefault((name, batch_size), []).append(cell)
                    print(f"  {name:<16} batch {batch_size:>3}: {cell['seconds']:7.2f} s, "
                          f"{cell['questions_per_s']:6.2f} questions/s", flush=True)
    return cells


def _write(out: Path, stem: str, conditions: dict, rows, identical: dict, report: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"conditions": conditions, "rows": rows,
                                                  "identical_predictions": identical}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(report + "\n")
    print(f"\nwritten: {out / stem}.json and .md")


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    device = torch.device(args.device or preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--preset {args.preset} runs on a CUDA GPU; none is available (use --preset scaled)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, preset.dtype)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    model_path, question_file, image_folder, _ = resolve_embedded(None, None, None, environ={"FASTV_EMBEDDED": "1"})
    processor = load_model(model_path, device="cpu", dtype="float32", progress=False).processor
    model = build_model(preset, device, dtype, args.seed)
    info = model_info_from(model, processor)
    questions = load_questions(question_file).head(args.num_questions)
    configs = configurations(args)
    busy_before, load_before = busy_cores(), load_average()
    print(f"bench_throughput: preset {args.preset} on {device} ({cpu_name() if device.type == 'cpu' else ''}"
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}), {dtype}, "
          f"{torch.get_num_threads()} threads, {len(questions)} questions, batch sizes {args.batch_sizes}; "
          f"busy cores before {busy_before}, load average {load_before}", flush=True)

    started = time.time()
    cells = _measure_cells(args, model, processor, info, questions, image_folder, configs)
    busy_after, load_after = busy_cores(), load_average()

    rows = _table(cells, configs, args.batch_sizes)
    identical = {name: all(cells[(name, b)][0]["predictions"] == cells[(name, args.batch_sizes[0])][0]["predictions"]
                           for b in args.batch_sizes) for name in configs}
    conditions = {
        "preset": args.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "num_questions": len(questions), "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
        "busy_cores_before": busy_before, "busy_cores_after": busy_after, "load_average_before": load_before,
        "load_average_after": load_after, "seconds": time.time() - started,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/bench_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    report = _markdown(rows, conditions, identical)
    print("\n" + report + "\n\nGPU command (full ScienceQA-IMG, LLaVA-1.5-7B):\n" + GPU_COMMAND)
    stem = f"bench_throughput_{args.preset}_{device.type}_{_dt.datetime.now():%Y%m%d-%H%M%S}"
    _write(Path(args.out), stem, conditions, rows, identical, report)
    return 0


def _table(cells, configs, batch_sizes) -> list[dict]:
    rows = []
    baseline = cells.get(("baseline", batch_sizes[0]))
    baseline_rate = statistics.median(c["questions_per_s"] for c in baseline) if baseline else None
    for name in configs:
        first = statistics.median(c["questions_per_s"] for c in cells[(name, batch_sizes[0])])
        for batch_size in batch_sizes:
            runs = cells[(name, batch_size)]
            rate = statistics.median(c["questions_per_s"] for c in runs)
            rows.append({
                "configuration": name, "batch_size": batch_size, "seconds": statistics.median(c["seconds"] for c in runs),
                "questions_per_s": rate, "vs_batch1": rate / first,
                "vs_baseline_batch1": rate / baseline_rate if baseline_rate else None,
                "generate_questions_per_s": statistics.median(c["generate_questions_per_s"] for c in runs),
                "prefill_tokens_per_s": statistics.median(c["prefill_tokens_per_s"] for c in runs),
                "peak_gpu_memory_bytes": max((c["peak_gpu_memory_bytes"] or 0) for c in runs) or None,
            })
    return rows


def _markdown(rows, conditions, identical) -> str:
    lines = [
        f"End-to-end evaluation throughput, preset {conditions['preset']} ({conditions['device_name']}, "
        f"{conditions['dtype']}, {conditions['threads']} threads), {conditions['num_questions']} questions, "
        f"{conditions['max_new_tokens']} new tokens each, median of {conditions['rounds']} round(s)",
        "",
        "| configuration | batch | s | questions/s | × batch 1 | × baseline batch 1 | prefill tokens/s (in generate) |"
        + (" peak GPU GiB |" if any(r["peak_gpu_memory_bytes"] for r in rows) else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if any(r["peak_gpu_memory_bytes"] for r in rows) else ""),
    ]
    for r in rows:
        vs_base = "–" if r["vs_baseline_batch1"] is None else f"{r['vs_baseline_batch1']:.2f}"
        line = (f"| {r['configuration']} | {r['batch_size']} | {r['seconds']:.1f} | {r['questions_per_s']:.2f} | "
                f"{r['vs_batch1']:.2f} | {vs_base} | {r['prefill_tokens_per_s']:.0f} |")
        if r["peak_gpu_memory_bytes"]:
            line += f" {r['peak_gpu_memory_bytes'] / 2**30:.1f} |"
        lines.append(line)
    lines += ["", "Same predictions at every batch size: "
              + ", ".join(f"{name} {'yes' if same else 'NO'}" for name, same in identical.items()),
              f"Load: busy cores {conditions['busy_cores_before']} before, {conditions['busy_cores_after']} after; "
              f"load average {conditions['load_average_before']} -> {conditions['load_average_after']}; "
              f"{conditions['seconds']:.0f} s; {conditions['date']}; commit {conditions['git_commit']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
