"""Processors of the VLM families beyond LLaVA-1.5, for images only and without torchvision.

transformers 5.x builds the processors of LLaVA-OneVision and Qwen2-VL / Qwen2.5-VL / Qwen3-VL with a video
processor, and the video processors need torchvision; without it even an image-only call fails while the processor
is constructed. This tool evaluates images only, so those families get their processor class minus the video
processor (`IMAGE_ONLY_PROCESSORS`): the same prompt expansion, chat template and image preprocessing (the PIL backend, as
the LLaVA-1.5 path uses), and no torchvision import. LLaVA-NeXT and Gemma 3 have no video processor and load as
they are.

`load_processor(path, model_type)` loads the processor of a checkpoint folder (or cached hub id) that way.
"""

from __future__ import annotations

import transformers

# model_type -> the transformers processor class of that family
PROCESSOR_CLASSES = {
    "llava": "LlavaProcessor",
    "llava_next": "LlavaNextProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "gemma3": "Gemma3Processor",
}


def _qwen_without_video(base: type) -> type:
    """`base` (a Qwen-VL processor class) with no `video_processor` in its constructor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__,
                                         "__doc__": f"{base.__name__} for images only (no video processor)."})


class LlavaOnevisionProcessor(transformers.LlavaOnevisionProcessor):
    """transformers' LlavaOnevisionProcessor for images only (no video processor)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens, vision_feature_select_strategy,
                         chat_template, image_token, video_token, vision_aspect_ratio, **kwargs)


# transformers reads a processor's parts from its constructor's signature (and the saved settings it accepts from
# the constructor's argument names), so these classes neither load nor check a video processor; the rest (token
# expansion, chat template, `__call__` on images) is the family's own class.
IMAGE_ONLY_PROCESSORS = {
    "llava_onevision": LlavaOnevisionProcessor,
    "qwen2_vl": _qwen_without_video(transformers.Qwen2VLProcessor),
    "qwen2_5_vl": _qwen_without_video(transformers.Qwen2_5_VLProcessor),
    "qwen3_vl": _qwen_without_video(transformers.Qwen3VLProcessor),
}


def processor_class(model_type: str) -> type:
    """The processor class this tool uses for `model_type` (the family's own, minus a video processor if it has
    one); ValueError for an unknown model type."""
    if model_type not in PROCESSOR_CLASSES:
        raise ValueError(f"no processor is known for model_type {model_type!r}; supported: {sorted(PROCESSOR_CLASSES)}")
    return IMAGE_ONLY_PROCESSORS.get(model_type) or getattr(transformers, PROCESSOR_CLASSES[model_type])


def load_processor(path: str, model_type: str, local_files_only: bool = True):
    """The processor of the checkpoint at `path` (a folder, or a hub id in the local cache) for `model_type`, with
    the PIL image backend; the chat template is taken from the tokenizer when the processor has none."""
    processor = processor_class(model_type).from_pretrained(path, local_files_only=local_files_only, backend="pil")
    if getattr(processor, "chat_template", None) is None:
        processor.chat_template = getattr(processor.tokenizer, "chat_template", None)
    return processor
