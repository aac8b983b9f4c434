"""Tiny random checkpoints of the other VLM families, built offline: LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL, Qwen3-VL and Gemma 3, each a transformers model with its own processor class (`processors.py`) and a
chat template, so that the evaluation CLI, the sweep and the suite run on them as on a downloaded checkpoint.

The image geometry follows each family's real layout at toy width, chosen so that the guide's numbers make sense:
a 336 x 336 picture becomes 576 image tokens for Qwen2-VL / Qwen2.5-VL (resized to 672 x 672, 14 px patches merged
2 x 2), Qwen3-VL (768 x 768, 16 px patches) and Gemma 3 (96 px, 4 px patches, no pooling), and 1,176 for the anyres
families (a 576-token base image, one 576-token tile and 24 row-end newlines). The weights are random: the answers
are noise, the shapes, prompts and pruning are real.

`build_tiny_family(model_type)` -> (model, processor); `save_tiny_family(model_type, path)` writes both.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ImageProcessorPil,
    LlamaConfig,
    MistralConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    SiglipVisionConfig,
)

from .processors import processor_class
from .tiny import build_tokenizer

TINY_FAMILIES = ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3")

_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_PINPOINTS = [[336, 336], [336, 672], [672, 336]]
_QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def _chat_template(user: str, image: str, end_of_turn: str, assistant: str) -> str:
    """A single-role chat template: `user`, the message's parts (`image` for an image part, the text for a text
    part), `end_of_turn`; then `assistant` when a generation prompt is asked for."""
    return (
        "{% for message in messages %}" + user
        + "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image
        + "{% else %}{{ part['text'] }}{% endif %}{% endfor %}" + end_of_turn
        + "{% endfor %}{% if add_generation_prompt %}" + assistant + "{% endif %}"
    )


_TEMPLATES = {  # the shape of each family's own template, written here
    "llava_next": _chat_template("USER: ", "<image>\n", " ", "ASSISTANT:"),
    "llava_onevision": _chat_template("<|im_start|>user\n", "<image>\n", "<|im_end|>\n", "<|im_start|>assistant\n"),
    "qwen": _chat_template("<|im_start|>user\n", "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>\n",
                           "<|im_start|>assistant\n"),
    "gemma3": _chat_template("<start_of_turn>user\n", "<start_of_image>", "<end_of_turn>\n",
                             "<start_of_turn>model\n"),
}


def _tokenizer(model_type: str):
    tokenizer = build_tokenizer()
    if model_type.startswith("qwen"):
        tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIAL})
    elif model_type == "llava_onevision":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>", "<|im_start|>", "<|im_end|>"]})
    elif model_type == "gemma3":
        tokenizer.add_special_tokens({"additional_special_tokens": [
            "<start_of_image>", "<image_soft_token>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>"]})
        tokenizer._set_model_specific_special_tokens(special_tokens={  # what Gemma3Processor reads
            "boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"})
    return tokenizer


def _text_config(tokenizer, **extra) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, **extra)


def _vision(kind: type, **extra):
    return kind(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, **extra)


def _config_and_processor(model_type: str, decoder: str | None = None):
    if decoder is not None and model_type != "llava_next":
        raise ValueError(f"only llava_next takes a decoder choice, not {model_type}")
    tokenizer = _tokenizer(model_type)
    token = tokenizer.convert_tokens_to_ids
    template = _TEMPLATES["qwen" if model_type.startswith("qwen") else model_type]
    cls = processor_class(model_type)
    if model_type == "llava_next":
        if decoder not in (None, "llama", "mistral"):
            raise ValueError(f"LLaVA-NeXT decoder {decoder!r}: choose llama (Vicuna) or mistral")
        text = (MistralConfig(**_text_config(tokenizer), sliding_window=4096) if decoder == "mistral"
                else LlamaConfig(**_text_config(tokenizer)))
        config = LlavaNextConfig(
            vision_config=_vision(CLIPVisionConfig, image_size=336, patch_size=14, projection_dim=32),
            text_config=text, image_grid_pinpoints=_PINPOINTS,
            image_token_id=token("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-2)
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=_PINPOINTS,
            image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
        processor = cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                        vision_feature_select_strategy="default", chat_template=template,
                        num_additional_image_tokens=1)
    elif model_type == "llava_onevision":
        config = LlavaOnevisionConfig(
            vision_config=_vision(SiglipVisionConfig, image_size=336, patch_size=14),
            text_config=dict(model_type="qwen2", **_text_config(tokenizer)), image_grid_pinpoints=_PINPOINTS,
            image_token_id=token("<image>"), video_token_id=token("<video>"), vision_aspect_ratio="anyres_max_9",
            vision_feature_select_strategy="full", vision_feature_layer=-1)
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": 336, "width": 336},
                                                          image_grid_pinpoints=_PINPOINTS)
        processor = cls(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=576,
                        vision_feature_select_strategy="full", chat_template=template)
    elif model_type.startswith("qwen"):
        patch = 16 if model_type == "qwen3_vl" else 14
        side = 48 * patch  # 48 x 48 patches, merged 2 x 2: 576 image tokens
        ids = dict(image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
                   vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"))
        rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                      out_hidden_size=64, temporal_patch_size=2, spatial_merge_size=2)
        if model_type == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=patch,
                          temporal_patch_size=2, spatial_merge_size=2)
            config = Qwen2VLConfig(text_config=_text_config(tokenizer, rope_parameters=rope), vision_config=vision,
                                   **ids)
        elif model_type == "qwen2_5_vl":
            vision.update(window_size=112, fullatt_block_indexes=[1])
            config = Qwen2_5_VLConfig(text_config=_text_config(tokenizer, rope_parameters=rope),
                                      vision_config=vision, **ids)
        else:
            vision.update(num_position_embeddings=48 * 48, deepstack_visual_indexes=[0])
            rope["mrope_interleaved"] = True
            config = Qwen3VLConfig(text_config=_text_config(tokenizer, rope_parameters=rope), vision_config=vision,
                                   **ids)
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=patch, merge_size=2, temporal_patch_size=2, image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
            size={"shortest_edge": side * side, "longest_edge": side * side})
        processor = cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    elif model_type == "gemma3":
        layer_types = ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]
        config = Gemma3Config(
            text_config=_text_config(tokenizer, query_pre_attn_scalar=16, layer_types=layer_types,
                                     sliding_window=2048),
            vision_config=_vision(SiglipVisionConfig, image_size=96, patch_size=4, vision_use_head=False),
            mm_tokens_per_image=576, boi_token_index=token("<start_of_image>"),
            eoi_token_index=token("<end_of_image>"), image_token_index=token("<image_soft_token>"))
        image_processor = Gemma3ImageProcessorPil(size={"height": 96, "width": 96}, image_mean=[0.5] * 3,
                                                  image_std=[0.5] * 3)
        processor = cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                        image_seq_length=576)
    else:
        raise ValueError(f"no tiny model for {model_type!r}; choose one of {', '.join(TINY_FAMILIES)}")
    return config, processor


def build_tiny_family(model_type: str, seed: int = 0, qk_scale: float = 4.0, decoder: str | None = None):
    """(model, processor): a tiny random model of `model_type` (one of `TINY_FAMILIES`) in eval mode with SDPA, and
    its processor. The decoder's `q_proj`/`k_proj` are scaled by `qk_scale` (sharper attention than random init,
    so token rankings are not float-rounding ties). `decoder` "mistral" gives LLaVA-NeXT a Mistral decoder (as
    llava-v1.6-mistral-7b) instead of the Llama (Vicuna) one."""
    config, processor = _config_and_processor(model_type, decoder)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_scale)
            layer.self_attn.k_proj.weight.mul_(qk_scale)
        if model_type == "gemma3":  # zero-initialised: every image would look the same
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "sdpa"})
    return model.eval(), processor


def save_tiny_family(model_type: str, path, seed: int = 0) -> None:
    """Write a tiny random `model_type` checkpoint and its processor to `path` (transformers format)."""
    model, processor = build_tiny_family(model_type, seed=seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
