"""FastV Advanced in a few lines: prune a (tiny, offline) LLaVA with each strategy and show the kept tokens.

    python example_fastv_advanced.py

With a real model, replace the tiny one by
    model = LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf", dtype=torch.float16)
    processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")
"""

import numpy as np
import torch
from PIL import Image

from fastv_advanced import FastVConfig, apply_fastv, available_strategies
from fastv_advanced.prompting import build_inputs
from fastv_advanced.tiny import build_tiny_llava


def kept_grid(kept: list[int], side: int) -> str:
    """The image-token grid, '#' for kept tokens and '.' for dropped ones."""
    kept_set = set(kept)
    return "\n".join(
        " ".join("#" if row * side + col in kept_set else "." for col in range(side)) for row in range(side)
    )


def main() -> None:
    model, processor = build_tiny_llava(seed=0, qk_scale=8.0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8))
    prompt, inputs = build_inputs("Which shape is red?\nA. circle\nB. square", image, processor, model.config)
    num_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    side = int(num_image**0.5)
    rank = num_image // 4
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens, {num_image} of them image tokens; keeping {rank}\n")
    for method in available_strategies():
        config = FastVConfig(agg_layer=2, attention_rank=rank, token_selection_method=method, weighted_alpha=0.7)
        with apply_fastv(model, config) as fastv, torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        selection = fastv.last_selection
        head = "" if selection.head_index is None else f", head {int(selection.head_index[0])}"
        print(f"{method}{head}: kept {selection.kept_image_indices[0].tolist()}")
        print(kept_grid(selection.kept_image_indices[0].tolist(), side))
        print(f"generated ids: {output[0, inputs['input_ids'].shape[1]:].tolist()}\n")


if __name__ == "__main__":
    main()
