#!/usr/bin/env python
"""Write tiny random checkpoints of the other VLM families (LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Gemma 3), each with its processor and chat template, for trying the evaluation CLI, the sweep and the
suite on every family without downloading anything (`fastv_advanced.tiny_families`; a few seconds, ~1 MB each):

    python scripts/make_tiny_family_models.py                      # every family into runs/tiny-families/<type>/
    python scripts/make_tiny_family_models.py --families qwen2_5_vl --output /tmp/tiny
    NUM_SAMPLES=10 bash ./src/HiMAP/inference/eval_scivqa_fastv_advanced.sh \\
        --model-path runs/tiny-families/qwen2_5_vl --question-file data/scienceqa/himap-inference-MCQ.json \\
        --image-folder data/scienceqa/images/test --output-dir runs/qwen-suite

The weights are random, so the answers are noise; the image tokens (576 for Qwen-VL and Gemma 3, 1,176 for the
anyres families on the shipped 336 x 336 pictures), the prompts and the pruning are those of the real families.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastv_advanced.tiny_families import TINY_FAMILIES, save_tiny_family


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/tiny-families", help="folder that receives one folder per family")
    parser.add_argument("--families", default=",".join(TINY_FAMILIES),
                        help=f"comma-separated model types (default: all of {', '.join(TINY_FAMILIES)})")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = [name for name in families if name not in TINY_FAMILIES]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(TINY_FAMILIES)}")
    for name in families:
        path = Path(args.output) / name
        save_tiny_family(name, path, seed=args.seed)
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
