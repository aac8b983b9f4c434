#!/usr/bin/env python
"""Prefill speed-up against the theoretical one on the other VLM families: LLaVA-NeXT-like (anyres: base image,
2 x 2 tiles, row newlines; Vicuna-style MHA decoder) and Qwen2.5-VL-like (M-RoPE, GQA decoder, merged patches)
shapes, random weights, FastV `avg_all_heads` at K=2 keeping 50% / 25% / 11% of the image tokens.

    python benchmarks/bench_families.py                      # scaled CPU shapes (~3 minutes on 2 cores)
    python benchmarks/bench_families.py --preset gpu7b       # 7B/8B-like widths and real token counts, on a GPU
    python benchmarks/bench_families.py --smoke              # one round, tiny widths (tests)

Each round runs the baseline and every budget once, in a rotating order; the table gives medians over the rounds:
the whole prefill (vision tower, projector, decoder, last-position logits) and the decoder alone (timed by hooks on
the language model), each as a speed-up over the baseline, beside the theoretical decoder speed-up (1 / the FLOPs
ratio of DESIGN.md section 4 at the model's real shapes). Writes JSON and a Markdown table to --output-dir.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import DecoderTimer  # noqa: E402

from fastv_advanced.flops import DecoderShape, schedule_flops  # noqa: E402
from fastv_advanced.methods.fastv import FastVConfig  # noqa: E402
from fastv_advanced.pruning import apply_pruning  # noqa: E402

IMAGE, PAD, BOS, START, END, VIDEO = 1000, 0, 1, 1001, 1002, 1003
KEEP_FRACTIONS = (0.5, 0.25, 1 / 9)


@dataclass
class Shape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_layers: int
    base_side: int  # NeXT: patches per side of the base image; Qwen: merged tokens per side
    device: str = "cpu"
    dtype: str = "float32"


PRESETS = {
    "scaled": {"next": Shape(1024, 2752, 8, 8, 8, 128, 2, 12), "qwen": Shape(1024, 5504, 8, 8, 2, 128, 2, 24)},
    "gpu7b": {"next": Shape(4096, 11008, 32, 32, 32, 1024, 24, 24, "cuda", "float16"),
              "qwen": Shape(3584, 18944, 28, 28, 4, 1280, 32, 32, "cuda", "bfloat16")},
    "smoke": {"next": Shape(64, 128, 4, 4, 4, 32, 1, 4), "qwen": Shape(64, 128, 4, 4, 2, 32, 1, 4)},
}


def _text(shape: Shape) -> dict:
    return dict(vocab_size=2048, hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                head_dim=shape.hidden // shape.heads, max_position_embeddings=16384, pad_token_id=PAD)


def build(family: str, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(model, inputs) of one prompt: 35 tokens, the image, 60 tokens."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if family == "next":
        patch = 14
        side = shape.base_side * patch
        vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
                                  num_hidden_layers=shape.vision_layers, num_attention_heads=max(shape.vision_hidden // 64, 2),
                                  image_size=side, patch_size=patch, projection_dim=shape.vision_hidden)
        config = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**_text(shape)), image_token_id=IMAGE,
                                 image_grid_pinpoints=[[2 * side, 2 * side]], vision_feature_layer=-2)
        model = LlavaNextForConditionalGeneration(config)
        base = shape.base_side
        num_image = base * base + (2 * base) * (2 * base) + 2 * base  # base + 2 x 2 tiles + a newline per tile row
        extra = {"pixel_values": torch.randn(1, 5, 3, side, side, generator=generator),
                 "image_sizes": torch.tensor([[2 * side, 2 * side]])}
    else:
        grid = 2 * shape.base_side
        vision = dict(depth=shape.vision_layers, hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
                      num_heads=max(shape.vision_hidden // 80, 2), patch_size=14, out_hidden_size=shape.hidden,
                      window_size=112, fullatt_block_indexes=[shape.vision_layers - 1], temporal_patch_size=2,
                      spatial_merge_size=2)
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
        head_dim = shape.hidden // shape.heads
        rope["mrope_section"] = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
        config = Qwen2_5_VLConfig(text_config=dict(**_text(shape), rope_parameters=rope), vision_config=vision,
                                  image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
                                  vision_end_token_id=END)
        model = Qwen2_5_VLForConditionalGeneration(config)
        num_image = shape.base_side * shape.base_side
        extra = {"pixel_values": torch.randn(grid * grid, 3 * 2 * 14 * 14, generator=generator),
                 "image_grid_thw": torch.tensor([[1, grid, grid]])}
    with torch.no_grad():
        for layer in model.model.language_model.layers:  # sharper than random init: rankings are not float noise
            layer.self_attn.q_proj.weight.mul_(2)
            layer.self_attn.k_proj.weight.mul_(2)
    model = model.to(device=device, dtype=dtype).eval()
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    before = torch.randint(3, 900, (34,), generator=generator).tolist()
    after = torch.randint(3, 900, (60,), generator=generator).tolist()
    image = ([START] if family == "qwen" else []) + [IMAGE] * num_image + ([END] if family == "qwen" else [])
    ids = torch.tensor([[BOS] + before + image + after])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}
    if family == "qwen":
        inputs["mm_token_type_ids"] = (ids == IMAGE).long()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model, inputs, num_image


def time_prefill(model, inputs, method, timer: DecoderTimer, device) -> tuple[float, float, int]:
    """(whole prefill s, decoder s, image tokens kept) of one forward with the cache, as `generate`'s prefill."""
    context = apply_pruning(model, method) if method is not None else None
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - start
        kept = context.last_selection.num_kept if context is not None else -1
    finally:
        if context is not None:
            context.remove()
    return total, timer.seconds, kept


def run_family(family: str, shape: Shape, rounds: int, k: int, log) -> dict:
    device, dtype = torch.device(shape.device), getattr(torch, shape.dtype)
    model, inputs, num_image = build(family, shape, device, dtype)
    num_tokens = int(inputs["input_ids"].shape[1])
    decoder_shape = DecoderShape.from_text_config(model.config.text_config)
    ranks = [max(1, round(num_image * f)) for f in KEEP_FRACTIONS]
    configs = [None] + [FastVConfig(agg_layer=k, attention_rank=r, token_selection_method="avg_all_heads")
                        for r in ranks]
    names = ["baseline"] + [f"K={k} R={r}" for r in ranks]
    timer = DecoderTimer(model.model.language_model, device)
    samples = {name: {"prefill_s": [], "decoder_s": []} for name in names}
    kept = {}
    for method in configs:  # warm-up
        time_prefill(model, inputs, method, timer, device)
    for index in range(rounds):
        order = list(range(len(configs)))
        order = order[index % len(order):] + order[: index % len(order)]
        for i in order:
            total, decoder, kept[names[i]] = time_prefill(model, inputs, configs[i], timer, device)
            samples[names[i]]["prefill_s"].append(total)
            samples[names[i]]["decoder_s"].append(decoder)
        log(f"  {family}: round {index + 1}/{rounds}")
    timer.remove()
    base = {key: statistics.median(samples["baseline"][key]) for key in ("prefill_s", "decoder_s")}
    rows = []
    for name, method, rank in zip(names, configs, [num_image] + ranks):
        prefill, decoder = (statistics.median(samples[name][key]) for key in ("prefill_s", "decoder_s"))
        flops = schedule_flops(decoder_shape, num_tokens, num_image, [] if method is None else [(k, rank)])
        theory = 1 / flops["ratio"]
        rows.append({"config": name, "kept": rank, "prefill_s": prefill, "decoder_s": decoder,
                     "speedup": base["prefill_s"] / prefill, "decoder_speedup": base["decoder_s"] / decoder,
                     "theoretical": theory, "speedup_vs_theory": base["prefill_s"] / prefill / theory,
                     "decoder_vs_theory": base["decoder_s"] / decoder / theory, "samples": samples[name],
                     "kept_measured": kept.get(name)})
    return {"family": family, "shape": vars(shape), "num_tokens": num_tokens, "num_image_tokens": num_image,
            "decoder_shape": vars(decoder_shape), "rows": rows}


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        lines += [f"### {result['family']}-like: {result['num_tokens']} tokens, {result['num_image_tokens']} image "
                  "tokens", "", "| config | image tokens kept | prefill s | decoder s | speed-up | decoder speed-up "
                  "| theor. × | ×/theor. | decoder ×/theor. |", "|---|---|---|---|---|---|---|---|---|"]
        for row in result["rows"]:
            lines.append(f"| {row['config']} | {row['kept']} | {row['prefill_s']:.3f} | {row['decoder_s']:.3f} | "
                         f"{row['speedup']:.2f} | {row['decoder_speedup']:.2f} | {row['theoretical']:.2f} | "
                         f"{row['speedup_vs_theory']:.2f} | {row['decoder_vs_theory']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="scaled")
    parser.add_argument("--smoke", action="store_true", help="tiny widths, one round (the code path only)")
    parser.add_argument("--families", default="next,qwen", help="comma-separated: next, qwen")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every configuration once)")
    parser.add_argument("--k", type=int, default=2, help="FastV's K")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--output-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    preset = "smoke" if args.smoke else args.preset
    rounds = 1 if args.smoke else args.rounds
    if args.threads:
        torch.set_num_threads(args.threads)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if unknown := [f for f in families if f not in ("next", "qwen")]:
        parser.error(f"--families: unknown {', '.join(unknown)} (choose next, qwen)")
    if PRESETS[preset][families[0]].device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--preset {preset} needs a CUDA GPU")
    started = time.strftime("%Y%m%d-%H%M%S")
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    results = [run_family(family, PRESETS[preset][family], rounds, args.k, log) for family in families]
    environment = {"torch": torch.__version__, "transformers": transformers.__version__,
                   "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
                   "threads": torch.get_num_threads(),
                   "device": torch.cuda.get_device_name(0) if PRESETS[preset][families[0]].device == "cuda" else "cpu"}
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    stem = output / f"bench_families_{preset}_{started}"
    stem.with_suffix(".json").write_text(json.dumps({"preset": preset, "rounds": rounds, "k": args.k,
                                                     "environment": environment, "results": results}, indent=1))
    table = markdown(results)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"written: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
