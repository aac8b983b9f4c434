"""Prompts, token ids and image preprocessing: LLaVA-1.5's as the original evaluation builds them, and the other
families' through their processor's chat template.

- Conversation templates: `vicuna_v1` (= `llava_v1`, the LLaVA-1.5 protocol) and `plain`.
- Token ids are built chunk-wise like the original `tokenizer_image_token`: the prompt is split at `<image>`,
  each chunk tokenized on its own (BOS only on the first), and the image token inserted between them, expanded to
  the model's number of image tokens.
- Images are padded to a square with the CLIP mean colour (`image_aspect_ratio="pad"`) before the processor's
  resize and centre crop, or centre-cropped directly (`"crop"`).
- The other families (LLaVA-NeXT, OneVision, Qwen-VL, Gemma 3): the user turn is the image, then the question
  (its `<image>` removed) and, with `single_pred_prompt`, the answer instruction on its own line, rendered by the
  processor's chat template with the generation prompt — lmms-eval's `scienceqa_img` prompt — and tokenized with the
  image by the processor, which expands the image tokens for the image's size.
- `prompts_for(model, processor, run_config)` picks the builder (`GuidePrompts` or `ChatPrompts`) the run loop uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class ConversationTemplate:
    """A single-turn conversation: `system + sep + user_role + ": " + message + sep + assistant_role + ":"`."""

    name: str
    system: str
    user_role: str
    assistant_role: str
    sep: str

    def render(self, message: str) -> str:
        """The prompt for one user message, ending where the assistant's answer starts."""
        if not self.user_role:
            return f"{self.system}{message}{self.sep}"
        return f"{self.system}{self.sep}{self.user_role}: {message}{self.sep}{self.assistant_role}:"


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

CONVERSATION_TEMPLATES = {
    "vicuna_v1": ConversationTemplate("vicuna_v1", _VICUNA_SYSTEM, "USER", "ASSISTANT", " "),
    "llava_v1": ConversationTemplate("llava_v1", _VICUNA_SYSTEM, "USER", "ASSISTANT", " "),
    "plain": ConversationTemplate("plain", "", "", "", "\n"),
}


def get_template(conv_mode: str) -> ConversationTemplate:
    """The template registered as `conv_mode`; ValueError listing the known ones otherwise."""
    if conv_mode not in CONVERSATION_TEMPLATES:
        raise ValueError(f"--conv-mode {conv_mode!r} is not supported; choose one of {sorted(CONVERSATION_TEMPLATES)}")
    return CONVERSATION_TEMPLATES[conv_mode]


def build_prompt(question: str, has_image: bool, single_pred_prompt: bool, conv_mode: str = "vicuna_v1") -> str:
    """The full prompt for a ScienceQA question (without its `<image>` line, which is added when `has_image`)."""
    question = question.replace(IMAGE_PLACEHOLDER, "").strip()
    if has_image:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    if single_pred_prompt:
        question = f"{question}\n{SINGLE_PRED_PROMPT}"
    return get_template(conv_mode).render(question)


def tokenize_with_image(prompt: str, tokenizer, image_token_id: int, num_image_tokens: int) -> list[int]:
    """Token ids of `prompt` with each `<image>` replaced by `num_image_tokens` copies of `image_token_id`.

    Chunks around `<image>` are tokenized separately (BOS only on the first chunk), as the original LLaVA does. Each
    chunk gets the ids the original slow sentencepiece tokenizer gave it, `sp.encode(chunk)`, which adds the dummy
    prefix `▁` to every non-empty chunk: a chunk starting with a newline begins `▁ <0x0A>`, one starting with a
    space begins `▁▁`. transformers 5.x's Llama tokenizer (Metaspace, prepend_scheme="first") adds no prefix when
    the text already starts with a space or `▁` (" x" gives the ids of "x"); for such a tokenizer those chunks get
    the `▁` prepended here.
    """
    chunks = prompt.split(IMAGE_PLACEHOLDER)
    leading_space = (" ", "▁")
    skips_prefix = False
    if any(chunk.startswith(leading_space) for chunk in chunks):
        plain = tokenizer("x", add_special_tokens=False).input_ids
        spaced = tokenizer(" x", add_special_tokens=False).input_ids
        skips_prefix = bool(plain) and plain == spaced and tokenizer.convert_ids_to_tokens(plain)[0].startswith("▁")
    ids: list[int] = []
    for index, chunk in enumerate(chunks):
        text = "▁" + chunk if skips_prefix and chunk.startswith(leading_space) else chunk
        chunk_ids = tokenizer(text, add_special_tokens=True).input_ids if chunk or index == 0 else []
        if index > 0:
            if chunk_ids and chunk_ids[0] == tokenizer.bos_token_id:
                chunk_ids = chunk_ids[1:]
            ids.extend([image_token_id] * num_image_tokens)
        ids.extend(chunk_ids)
    return ids


def num_image_tokens(model_config) -> int:
    """Image tokens one image becomes in a LLaVA-1.5 decoder input: patches, plus CLS with the `full` strategy."""
    vision = model_config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if model_config.vision_feature_select_strategy == "full" else 0)


def fixed_image_tokens(model_config) -> int | None:
    """Image tokens per image when every image gets the same number (LLaVA-1.5, Gemma 3), None where the count
    depends on the image's size (LLaVA-NeXT / OneVision anyres, Qwen-VL dynamic resolution)."""
    if model_config.model_type == "llava":
        return num_image_tokens(model_config)
    if model_config.model_type == "gemma3":
        return int(model_config.mm_tokens_per_image)
    return None


def chat_prompt(question: str, has_image: bool, single_pred_prompt: bool, processor) -> str:
    """The prompt of a ScienceQA question for a chat-template family (lmms-eval's `scienceqa_img`): one user turn
    with the image first, then the question text and the answer instruction, and the assistant's generation
    prompt."""
    text = question.replace(IMAGE_PLACEHOLDER, "").strip()
    if single_pred_prompt:
        text = f"{text}\n{SINGLE_PRED_PROMPT}"
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


class GuidePrompts:
    """LLaVA-1.5 prompts as the guide's protocol builds them (`run_config`'s single_pred_prompt, conv_mode and
    image_aspect_ratio): a question's token ids are known without its image."""

    needs_image = False

    def __init__(self, processor, model_config, run_config):
        self.processor, self.model_config, self.run_config = processor, model_config, run_config

    def token_ids(self, question: str, image: Image.Image | None, has_image: bool) -> tuple[str, list[int]]:
        """(prompt, token ids with the image tokens expanded); `image` is not needed (it may be None)."""
        config = self.run_config
        return prompt_token_ids(question, has_image, self.processor, self.model_config, config.single_pred_prompt,
                                config.conv_mode)

    def encode(self, question: str, image: Image.Image | None, has_image: bool) -> tuple[str, list[int], dict]:
        """(prompt, token ids, one-row model inputs) of one question with its image."""
        prompt, ids = self.token_ids(question, image, has_image)
        inputs, _ = self.batch([(prompt, ids)], [image])
        return prompt, ids, inputs

    def batch(self, rows: list[tuple[str, list[int]]], images: list) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The left-padded model inputs of `rows` ((prompt, ids) each) with their images, and each row's padding."""
        inputs = [model_inputs(ids, image, self.processor, self.run_config.image_aspect_ratio)
                  for (_, ids), image in zip(rows, images)]
        return batch_inputs(inputs, pad_token_id_of(self.processor.tokenizer))


class ChatPrompts:
    """Chat-template prompts tokenized by the family's processor; the image decides how many image tokens there are
    (anyres tiles, dynamic resolution), so a question's token ids need its image."""

    needs_image = True

    def __init__(self, processor, run_config):
        self.processor, self.run_config = processor, run_config

    def token_ids(self, question: str, image: Image.Image | None, has_image: bool) -> tuple[str, list[int]]:
        """(prompt, token ids with the image tokens expanded for `image`'s size)."""
        prompt, ids, _ = self.encode(question, image, has_image)
        return prompt, ids

    def encode(self, question: str, image: Image.Image | None, has_image: bool) -> tuple[str, list[int], dict]:
        """(prompt, token ids, one-row model inputs) of one question with its image: the processor runs once."""
        prompt = chat_prompt(question, has_image, self.run_config.single_pred_prompt, self.processor)
        inputs, _ = self.batch([(prompt, [])], [image])
        return prompt, inputs["input_ids"][0].tolist(), inputs

    def batch(self, rows: list[tuple[str, list[int]]], images: list) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The processor's left-padded inputs of the prompts of `rows` with `images` (all None: text only)."""
        with_image = [image is not None for image in images]
        if any(with_image) and not all(with_image):
            raise ValueError("a batch must hold only questions with an image or only text-only questions")
        prompts = [prompt for prompt, _ in rows]
        pictures = [[image.convert("RGB")] for image in images] if all(with_image) else None  # one per prompt
        inputs = dict(self.processor(text=prompts, images=pictures, padding=True, padding_side="left",
                                     return_tensors="pt"))
        pads = (inputs["attention_mask"] == 0).sum(dim=1).tolist()
        return inputs, [int(pad) for pad in pads]


def prompts_for(model_config, processor, run_config) -> GuidePrompts | ChatPrompts:
    """The prompt builder of a run: the guide's LLaVA-1.5 protocol for `llava`, the chat template otherwise."""
    if model_config.model_type == "llava":
        return GuidePrompts(processor, model_config, run_config)
    return ChatPrompts(processor, run_config)


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad an image to a square, centred, with `background` (LLaVA-1.5's `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def preprocess_image(image: Image.Image, image_processor, image_aspect_ratio: str = "pad") -> torch.Tensor:
    """Pixel values [1, 3, H, W] for one image; `pad` pads to a square with the processor's mean colour first."""
    image = image.convert("RGB")
    if image_aspect_ratio == "pad":
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        image = expand_to_square(image, background)
    elif image_aspect_ratio != "crop":
        raise ValueError(f"--image-aspect-ratio {image_aspect_ratio!r} is not supported; choose 'pad' or 'crop'")
    return image_processor(images=image, return_tensors="pt")["pixel_values"]


def build_inputs(
    question: str,
    image: Image.Image | None,
    processor,
    model_config,
    single_pred_prompt: bool = True,
    conv_mode: str = "vicuna_v1",
    image_aspect_ratio: str = "pad",
) -> tuple[str, dict[str, torch.Tensor]]:
    """(prompt, model inputs) for one question: `input_ids` [1, S], `attention_mask` [1, S] and, with an image,
    `pixel_values` [1, 3, H, W]."""
    prompt, ids = prompt_token_ids(question, image is not None, processor, model_config, single_pred_prompt, conv_mode)
    return prompt, model_inputs(ids, image, processor, image_aspect_ratio)


def model_inputs(ids: list[int], image: Image.Image | None, processor, image_aspect_ratio: str = "pad") -> dict:
    """A tokenized prompt (`prompt_token_ids`) and its image as model inputs: `input_ids` [1, S], `attention_mask`
    [1, S] and, with an image, `pixel_values` [1, 3, H, W]."""
    input_ids = torch.tensor([ids], dtype=torch.long)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if image is not None:
        inputs["pixel_values"] = preprocess_image(image, processor.image_processor, image_aspect_ratio)
    return inputs


def prompt_token_ids(
    question: str, has_image: bool, processor, model_config, single_pred_prompt: bool = True,
    conv_mode: str = "vicuna_v1",
) -> tuple[str, list[int]]:
    """(prompt, token ids) of one question, image tokens expanded: what `build_inputs` feeds the model, known
    before the image is read (a batched run groups questions by it)."""
    prompt = build_prompt(question, has_image, single_pred_prompt, conv_mode)
    ids = tokenize_with_image(prompt, processor.tokenizer, model_config.image_token_id, num_image_tokens(model_config))
    return prompt, ids


def pad_token_id_of(tokenizer) -> int:
    """The id left padding uses: the tokenizer's pad token, else its EOS, else 0 (padded positions are masked out,
    so the id only has to exist in the vocabulary)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def batch_inputs(rows: list[dict[str, torch.Tensor]], pad_token_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Several questions' `build_inputs` dicts as one left-padded batch, and each row's padding length.

    `input_ids` [B, S] (S = the longest prompt; shorter rows get `pad_token_id` on the left), `attention_mask`
    [B, S] (0 on the padding) and, when the rows have images, `pixel_values` [B, 3, H, W] stacked in row order.
    Every row must have an image or none must (text-only batches run without pixel values).
    """
    with_image = ["pixel_values" in row for row in rows]
    if any(with_image) and not all(with_image):
        raise ValueError("a batch must hold only questions with an image or only text-only questions")
    lengths = [int(row["input_ids"].shape[1]) for row in rows]
    longest = max(lengths)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, (row, length) in enumerate(zip(rows, lengths)):
        input_ids[index, longest - length:] = row["input_ids"][0]
        attention_mask[index, longest - length:] = row["attention_mask"][0]
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if all(with_image):
        inputs["pixel_values"] = torch.cat([row["pixel_values"] for row in rows])
    return inputs, [longest - length for length in lengths]
