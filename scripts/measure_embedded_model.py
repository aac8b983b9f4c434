#!/usr/bin/env python
"""Measure the embedded tiny LLaVA on the shipped synthetic test split: baseline, every image token dropped, and
each token-selection strategy at 50%, 25% and 64 of the 576 image tokens kept (the budgets of the published
comparisons: 288, 144, 64), with the share of the picture's object patches that each configuration keeps.

    python scripts/measure_embedded_model.py                 # prints the table, records it in training_info.json
    python scripts/measure_embedded_model.py --no-record     # only prints

The model and processor are loaded from disk (`AutoProcessor`, `LlavaForConditionalGeneration.from_pretrained`),
questions and images are read from the question file and image folder, prompts are built by
`fastv_advanced.prompting.build_inputs(..., single_pred_prompt=True)`, answers come from greedy decoding and are read
by LLaVA's ScienceQA parser (`fastv_advanced.answers.parse_answer`: exact letter, letter + ". ", "The answer is X.",
else FAILED). Pruning is `fastv_advanced.apply_fastv(model, FastVConfig(agg_layer=2, attention_rank=R, ...))`;
the `random` control's generator is reseeded with the question's index before each question.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from fastv_advanced import FastVConfig, apply_fastv, embedded, prompting, scienceqa
from fastv_advanced.answers import parse_answer

STRATEGIES = (
    ("avg_all_heads", {}),
    ("max_head", {}),
    ("weighted_combination", {"weighted_alpha": 0.5}),
    ("random", {}),
)
MAX_NEW_TOKENS = 32


def load_model(model_path, device: str = "cpu") -> tuple[LlavaForConditionalGeneration, object]:
    processor = AutoProcessor.from_pretrained(model_path)
    model = LlavaForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    return model, processor


def object_patches(image, patch_size: int = 14) -> torch.Tensor:
    """BoolTensor[num_patches]: the patches (row-major, as the image tokens are ordered) holding any non-white pixel.

    The synthetic pictures are drawn at the model's input size on a white background, so the processor neither
    pads nor resizes them and patch (row, column) covers pixels [14 row, 14 row + 14) x [14 column, 14 column + 14).
    """
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())  # [H, W, 3]
    painted = (pixels != 255).any(dim=-1)  # [H, W]
    rows, cols = painted.shape[0] // patch_size, painted.shape[1] // patch_size
    return painted.reshape(rows, patch_size, cols, patch_size).any(dim=3).any(dim=1).flatten()


def load_questions(question_file, image_folder, limit: int | None = None) -> tuple[list[dict], str]:
    """([{id, text, label, image (PIL RGB), object_patches}] in file order, the question file's sha256).

    Read by the evaluation's loaders (`fastv_advanced.scienceqa`), which name the file and entry of anything
    malformed; `object_patches` is computed once here for every configuration measured later."""
    question_set = scienceqa.load_questions(question_file)
    questions = []
    for question in question_set.questions[:limit]:
        if question.error:
            raise scienceqa.DataError(question.error)
        image = scienceqa.load_image(image_folder, question)
        questions.append({"id": question.id, "text": question.text, "label": question.label, "image": image,
                          "object_patches": object_patches(image)})
    return questions, question_set.sha256


@torch.no_grad()
def answer(model, processor, question: dict) -> str:
    """The model's greedy output for one question (special tokens removed, stripped)."""
    _, inputs = prompting.build_inputs(question["text"], question["image"], processor, model.config,
                                       single_pred_prompt=True)
    inputs = {name: value.to(model.device) for name, value in inputs.items()}
    output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                            pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def evaluate(model, processor, questions: list[dict], fastv: FastVConfig | None = None) -> tuple[list[bool], list[float]]:
    """Per question, whether the parsed answer equals the label (FAILED counts as wrong), and the share of the
    object's patches among the image tokens kept (1.0 without pruning)."""
    pruner = apply_fastv(model, fastv) if fastv is not None else None
    try:
        correct, object_kept = [], []
        for index, question in enumerate(questions):
            if pruner is not None:
                pruner.reseed(fastv.seed + index)
            correct.append(parse_answer(answer(model, processor, question)) == question["label"])
            if pruner is None:
                object_kept.append(1.0)
            else:
                painted = question["object_patches"]
                kept = pruner.last_selection.kept_image_indices[0].cpu()
                object_kept.append(float(painted[kept].sum()) / max(1, int(painted.sum())))
        return correct, object_kept
    finally:
        if pruner is not None:
            pruner.remove()


def run_table(model, processor, questions: list[dict], slice_size: int, agg_layer: int = 2) -> dict:
    """Every measured configuration: accuracy, counts, time, and the correct count on the first `slice_size`."""
    num_image = prompting.num_image_tokens(model.config)
    configs = [("baseline", None), ("rank 0 (all image tokens dropped)", FastVConfig(agg_layer=agg_layer,
                                                                                    attention_rank=0))]
    for rank in (num_image // 2, num_image // 4, min(64, num_image)):
        for name, extra in STRATEGIES:
            configs.append((f"{name} R={rank}", FastVConfig(agg_layer=agg_layer, attention_rank=rank,
                                                           token_selection_method=name, **extra)))
    rows = []
    for label, fastv in configs:
        start = time.perf_counter()
        correct, object_kept = evaluate(model, processor, questions, fastv)
        rows.append({
            "configuration": label,
            "strategy": None if fastv is None else fastv.token_selection_method,
            "attention_rank": num_image if fastv is None else fastv.attention_rank,
            "kept_fraction": 1.0 if fastv is None else fastv.attention_rank / num_image,
            "weighted_alpha": fastv.weighted_alpha if fastv is not None and fastv.token_selection_method ==
            "weighted_combination" else None,
            "correct": sum(correct),
            "total": len(correct),
            "accuracy": round(sum(correct) / len(correct), 4),
            f"correct_first_{slice_size}": sum(correct[:slice_size]),
            "object_patches_kept": round(sum(object_kept) / len(object_kept), 4),
            "seconds": round(time.perf_counter() - start, 1),
        })
        print(f"{label:<40} {rows[-1]['accuracy']:.4f}  ({rows[-1]['correct']}/{rows[-1]['total']}), "
              f"object patches kept {rows[-1]['object_patches_kept']:.0%}", flush=True)
    return {"agg_layer": agg_layer, "rows": rows}


def chance(questions: list[dict]) -> float:
    """Expected accuracy of a uniform guess among each question's options."""
    counts = [sum(1 for line in q["text"].split("\n") if line[:3] in {f"{c}. " for c in "ABCDE"}) for q in questions]
    return sum(1 / n for n in counts) / len(counts)


def format_table(result: dict) -> str:
    lines = [f"{'configuration':<40} {'kept':>6} {'accuracy':>9} {'correct':>9} {'object patches kept':>20}",
             "-" * 89]
    for row in result["rows"]:
        lines.append(f"{row['configuration']:<40} {row['kept_fraction']:>6.0%} {row['accuracy']:>9.4f} "
                     f"{row['correct']:>4}/{row['total']:<4} {row['object_patches_kept']:>20.0%}")
    lines.append(f"chance (mean 1/options): {result['chance_accuracy']:.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=str(embedded.MODEL_PATH))
    parser.add_argument("--question-file", default=str(embedded.QUESTION_FILE))
    parser.add_argument("--image-folder", default=str(embedded.IMAGE_FOLDER))
    parser.add_argument("--num-samples", type=int, default=None, help="first N questions (default: all)")
    parser.add_argument("--slice-size", type=int, default=30, help="also record the correct count of the first N")
    parser.add_argument("--agg-layer", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-record", action="store_true", help="do not write into <model-path>/training_info.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model_path, args.device)
    questions, question_file_sha256 = load_questions(args.question_file, args.image_folder, args.num_samples)
    start = time.perf_counter()
    result = run_table(model, processor, questions, args.slice_size, args.agg_layer)
    result.update({
        "question_file": str(Path(args.question_file).resolve().relative_to(embedded.REPO_ROOT))
        if Path(args.question_file).resolve().is_relative_to(embedded.REPO_ROOT) else args.question_file,
        "question_file_sha256": question_file_sha256,
        "num_questions": len(questions),
        "slice_size": args.slice_size,
        "chance_accuracy": round(chance(questions), 4),
        "decoding": f"greedy, max_new_tokens={MAX_NEW_TOKENS}, LLaVA ScienceQA answer parser",
        "seconds": round(time.perf_counter() - start, 1),
        "torch_threads": args.threads,
        "device": args.device,
    })
    print(format_table(result))
    if not args.no_record:
        info_path = Path(args.model_path) / "training_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        info["accuracy"] = result
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        print(f"recorded in {info_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
