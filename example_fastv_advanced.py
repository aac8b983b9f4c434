"""FastV Advanced in a few lines: prune a LLaVA with each strategy, show the image tokens it keeps and its answer.

    python example_fastv_advanced.py                     # a tiny LLaVA with random weights, built in memory
    FASTV_EMBEDDED=1 python example_fastv_advanced.py    # the embedded trained toy model and its first question

With a real model, load it the same way: `load_model("path/to/llava-1.5-7b-hf")` (a local folder, transformers or
original format), and pass your own question and PIL image to `build_inputs`.
"""

import sys

import numpy as np
import torch
from PIL import Image

from fastv_advanced import FastVConfig, apply_fastv, available_strategies
from fastv_advanced import embedded
from fastv_advanced.answers import parse_answer
from fastv_advanced.cli.pipes import exit_quietly_on_broken_pipe
from fastv_advanced.model_loading import load_model
from fastv_advanced.prompting import build_inputs
from fastv_advanced.scienceqa import load_image, load_questions
from fastv_advanced.tiny import build_tiny_llava

RANDOM_QUESTION = "Which shape is red?\nA. circle\nB. square"


def kept_grid(kept: list[int], side: int) -> str:
    """The image-token grid as the picture's patches (row by row), '#' for kept tokens and '.' for dropped ones."""
    kept_set = set(kept)
    return "\n".join("".join("#" if row * side + col in kept_set else "." for col in range(side))
                     for row in range(side))


def embedded_setup():
    """(model, processor, question text, image, correct letter, description): the embedded model's first question."""
    loaded = load_model(str(embedded.MODEL_PATH), device="cpu", dtype="float32")
    question = load_questions(embedded.QUESTION_FILE).questions[0]
    image = load_image(embedded.IMAGE_FOLDER, question)
    description = (f"{embedded.ENV_VAR}=1: the embedded toy model {embedded.MODEL_PATH} on question {question.id} "
                   f"of {embedded.QUESTION_FILE} (image {question.image})")
    return loaded.model, loaded.processor, question.text, image, question.label, description


def random_setup():
    """(model, processor, question text, image, None, description): a random-weight tiny LLaVA and a noise image."""
    model, processor = build_tiny_llava(seed=0, qk_scale=8.0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8))
    description = (f"a tiny LLaVA with random weights, built in memory: its answers are noise "
                   f"({embedded.ENV_VAR}=1 runs the trained embedded model instead)")
    return model, processor, RANDOM_QUESTION, image, None, description


def answer(model, processor, inputs: dict, config: FastVConfig | None):
    """(decoded answer, the selection or None): greedy generation, pruned with `config` unless it is None."""
    with torch.no_grad():
        if config is None:
            output, selection = model.generate(**inputs, max_new_tokens=8, do_sample=False), None
        else:
            with apply_fastv(model, config) as fastv:
                output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            selection = fastv.last_selection
    text = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return text, selection


def verdict(text: str, label: str | None) -> str:
    """`answer 'A' -> A, correct` (or wrong, or no verdict without a known answer)."""
    if label is None:
        return f"answer {text!r}"
    prediction = parse_answer(text)
    return f"answer {text!r} -> {prediction}, {'correct' if prediction == label else f'wrong (correct: {label})'}"


def main() -> None:
    model, processor, question, image, label, description = (
        embedded_setup() if embedded.embedded_enabled() else random_setup())
    print(description)
    _, inputs = build_inputs(question, image, processor, model.config)
    num_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    side, rank = int(num_image**0.5), num_image // 2
    print("question: " + " ".join(question.replace("<image>", "").split()))
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens, {num_image} of them image tokens ({side}x{side} patches); "
          f"FastV keeps {rank} after layer 2\n")
    print(f"no pruning: {verdict(answer(model, processor, inputs, None)[0], label)}\n")
    for method in available_strategies():
        config = FastVConfig(agg_layer=2, attention_rank=rank, token_selection_method=method, weighted_alpha=0.7)
        text, selection = answer(model, processor, inputs, config)
        head = "" if selection.head_index is None else f", head {int(selection.head_index[0])}"
        print(f"{method}{head}: kept {selection.num_kept} of {selection.num_image_tokens} image tokens; "
              f"{verdict(text, label)}")
        print(kept_grid(selection.kept_image_indices[0].tolist(), side) + "\n")


if __name__ == "__main__":
    sys.exit(exit_quietly_on_broken_pipe(main))
