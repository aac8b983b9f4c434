"""Tiny LLaVA models, tokenizers and processors built offline.

Tests, examples and benchmarks need a `LlavaForConditionalGeneration` with the llava-hf layout (CLIP vision
tower, two-layer projector, Llama decoder) without downloading anything. Everything here is built from configs
and a byte-fallback BPE tokenizer trained in well under a second on a fixed corpus.
"""

from __future__ import annotations

import json
from typing import Iterable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT:",
    "Answer with the option's letter from the given choices directly.",
    "Context: Which of these is the answer? The answer is A. B. C. D. E.",
    "Which shape is red? What colour is the circle? How many squares are there? Is it on the left or the right?",
    "circle square triangle star red green blue yellow purple orange black white top bottom left right centre",
    "Select the best answer. Look at the picture. one two three four five zero",
]


def build_tokenizer(vocab_size: int = 400, corpus: Iterable[str] | None = None) -> LlamaTokenizer:
    """A Llama-style (Metaspace, byte-fallback BPE) tokenizer with `<image>` and `<pad>` added as special tokens.

    corpus: extra texts to train the merges on, after the built-in corpus (e.g. a dataset's questions).
    """
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + byte_tokens,
        show_progress=False,
        initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:?'\n"),
    )
    bpe.train_from_iterator(_CORPUS * 4 + list(corpus or []), trainer=trainer)
    model_state = json.loads(bpe.model.__getstate__())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_state["merges"]]
    tokenizer = LlamaTokenizer(vocab=model_state["vocab"], merges=merges, legacy=False, add_prefix_space=True)
    tokenizer.add_bos_token = True
    tokenizer.update_post_processor()
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"
    return tokenizer


def build_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """CLIP preprocessing at `image_size` (shortest-edge resize, centre crop, CLIP mean/std)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def build_processor(image_size: int = 32, patch_size: int = 4, tokenizer: LlamaTokenizer | None = None):
    """A `LlavaProcessor` whose `<image>` expands to `(image_size // patch_size) ** 2` tokens (CLS dropped)."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    return LlavaProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=None,
    )


def build_config(
    tokenizer: LlamaTokenizer,
    image_size: int = 32,
    patch_size: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
) -> LlavaConfig:
    """A LLaVA-1.5-layout config (feature layer -2, CLS dropped, gelu projector) at toy size."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(
    config: LlavaConfig, seed: int = 0, qk_scale: float = 4.0, attn_implementation: str = "sdpa"
) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA in eval mode.

    Random init gives near-uniform attention, so the text model's `q_proj`/`k_proj` weights are multiplied by
    `qk_scale`: token rankings are then decided by the weights, not by float rounding.
    """
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_scale)
            layer.self_attn.k_proj.weight.mul_(qk_scale)
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "sdpa"})
    return model.eval()


def build_tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", qk_scale: float = 4.0, **config_kwargs):
    """(model, processor) pair: a tiny random LLaVA and the processor that feeds it (`config_kwargs` as in
    `build_config`)."""
    image_size = config_kwargs.get("image_size", 32)
    patch_size = config_kwargs.get("patch_size", 4)
    tokenizer = build_tokenizer()
    processor = build_processor(image_size=image_size, patch_size=patch_size, tokenizer=tokenizer)
    config = build_config(tokenizer, **config_kwargs)
    return build_model(config, seed=seed, qk_scale=qk_scale, attn_implementation=attn_implementation), processor


def save_tiny_llava(path, seed: int = 0, **config_kwargs) -> None:
    """Write a tiny random LLaVA and its processor to `path` in the llava-hf (transformers) format."""
    model, processor = build_tiny_llava(seed=seed, **config_kwargs)
    model.save_pretrained(path)
    processor.save_pretrained(path)
