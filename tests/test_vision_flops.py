"""The vision tower's and projector's FLOPs per row (`flops.vision_flops_per_row`) against PyTorch's own count:
`torch.utils.flop_counter.FlopCounterMode` over the modules that encode the images (the tower, the projector), with
eager attention so the attention products are counted as matmuls. Each row of a batch is counted alone, so the
formula's split of a batch into rows is checked too: pictures of different sizes (anyres tiles, Qwen-VL's patch
grids and Qwen2.5-VL's windows), two images in one prompt (Gemma 3), a text-only batch.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

from fastv_advanced.flops import vision_flops_per_row
from fastv_advanced.tiny import build_tiny_llava
from fastv_advanced.tiny_families import TINY_FAMILIES, build_tiny_family

IMAGE_MODULES = (".model.vision_tower", ".model.visual", ".model.multi_modal_projector")


def counted_image_flops(model, inputs: dict) -> int:
    """FLOPs PyTorch counts inside the image-encoding modules during one forward pass."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith(IMAGE_MODULES))


def picture(size: tuple[int, int], colour: str) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((10, 12, size[0] - 20, size[1] - 8), fill=colour)
    return image


def chat_batch(processor, pictures_per_row: list[list[Image.Image]]) -> dict:
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(pictures) + [{"type": "text", "text": "Which one?"}]}],
        add_generation_prompt=True, tokenize=False) for pictures in pictures_per_row]
    return dict(processor(text=prompts, images=pictures_per_row, padding=True, padding_side="left",
                          return_tensors="pt"))


def eager(model):
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_formula_matches_counted_flops_per_row(family):
    model, processor = build_tiny_family(family)
    model = eager(model)
    small, wide = picture((336, 200), "red"), picture((672, 300), "blue")
    rows = [[small, wide], [wide]] if family == "gemma3" else [[wide], [small]]
    formula = vision_flops_per_row(model.config, chat_batch(processor, rows))
    counted = [counted_image_flops(model, chat_batch(processor, [pictures])) for pictures in rows]
    assert formula == counted
    assert formula[0] > formula[1] > 0


def test_llava_1_5_crop():
    model, processor = build_tiny_llava()
    model = eager(model)
    inputs = dict(processor(text=["<image>\nWhich one?"], images=[picture((40, 30), "red")], return_tensors="pt"))
    assert vision_flops_per_row(model.config, inputs) == [counted_image_flops(model, inputs)]


def test_text_only_batch_has_no_vision_cost():
    model, processor = build_tiny_family("qwen2_5_vl")
    inputs = dict(processor(text=["No picture here."], return_tensors="pt"))
    assert vision_flops_per_row(model.config, inputs) is None
