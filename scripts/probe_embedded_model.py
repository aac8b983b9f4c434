#!/usr/bin/env python
"""Where does the embedded tiny LLaVA read the picture at K=2? Keep sets chosen by the object mask, not by attention.

    python scripts/probe_embedded_model.py                          # first 100 test questions, R = 64 and 16
    python scripts/probe_embedded_model.py --model-path /tmp/try --ranks 64,32,16

For each budget R it prunes after layer 1 (K=2) as FastV does, but ranks the image tokens by the picture itself:

- `object_first`: every object patch (any non-white pixel), then random background patches;
- `background_only`: random background patches, never an object patch;

beside `random` and `avg_all_heads`. If `background_only` answers as well as the baseline, the colour has been
spread over the image tokens (by the vision tower's or the decoder's attention among image tokens) and no
selection rule can matter much; if `object_first` answers and `background_only` does not, the answer lives in the
object's patches and a selection that finds them should beat `random` at small budgets. Same loop as
`scripts/measure_embedded_model.py` (greedy decoding, LLaVA's answer parser, generators reseeded per question).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure_embedded_model as measure  # noqa: E402

from fastv_advanced import FastVConfig, apply_fastv, embedded, strategies  # noqa: E402
from fastv_advanced.answers import parse_answer  # noqa: E402

_CURRENT: dict[str, torch.Tensor] = {}  # the question being answered: its object patches


@strategies.register_strategy("probe_object_first")
def object_first(attention, config, generator=None):
    noise = torch.rand(attention.shape[0], attention.shape[-1], generator=generator)
    return _CURRENT["object_patches"].float()[None].to(noise.device) + noise


@strategies.register_strategy("probe_background_only")
def background_only(attention, config, generator=None):
    noise = torch.rand(attention.shape[0], attention.shape[-1], generator=generator)
    return noise - _CURRENT["object_patches"].float()[None].to(noise.device)


def probe(model, processor, questions, method: str, rank: int) -> tuple[float, float]:
    """(accuracy, mean share of object patches kept) of one keep rule at one budget."""
    fastv = FastVConfig(agg_layer=2, attention_rank=rank, token_selection_method=method)
    pruner = apply_fastv(model, fastv)
    correct, kept_share = 0, 0.0
    try:
        for index, question in enumerate(questions):
            pruner.reseed(fastv.seed + index)
            _CURRENT["object_patches"] = question["object_patches"]
            correct += parse_answer(measure.answer(model, processor, question)) == question["label"]
            kept = pruner.last_selection.kept_image_indices[0].cpu()
            painted = question["object_patches"]
            kept_share += float(painted[kept].sum()) / max(1, int(painted.sum()))
    finally:
        pruner.remove()
    return correct / len(questions), kept_share / len(questions)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=str(embedded.MODEL_PATH))
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--ranks", default="64,16")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = measure.load_model(args.model_path)
    questions, _ = measure.load_questions(embedded.QUESTION_FILE, embedded.IMAGE_FOLDER, args.num_samples)
    print(f"{len(questions)} questions, {sum(int(q['object_patches'].sum()) for q in questions) / len(questions):.1f} "
          "object patches per picture on average")
    for rank in (int(r) for r in args.ranks.split(",")):
        for method in ("probe_object_first", "probe_background_only", "random", "avg_all_heads"):
            accuracy, kept = probe(model, processor, questions, method, rank)
            print(f"{method.removeprefix('probe_'):<18} R={rank:<4} accuracy {accuracy:.3f}, object patches kept {kept:.0%}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
