#!/usr/bin/env python
"""Train the embedded tiny LLaVA from scratch on the synthetic ScienceQA-style set (CPU, minutes).

    python scripts/train_tiny_llava.py                      # reproduces models/tiny-llava-scienceqa/ (~30 min)
    python scripts/train_tiny_llava.py --steps 200 --output /tmp/try   # a quick try

The model has LLaVA-1.5's geometry at toy width: a CLIP vision tower at 336 px with 14 px patches (24 x 24 = 576
image tokens, CLS dropped, features of the penultimate layer), the two-layer GELU projector and a small Llama
decoder, with a BPE tokenizer trained on the training questions' words. Every example is built exactly as the
evaluation builds it (`fastv_advanced.prompting.build_inputs(..., single_pred_prompt=True)`: vicuna_v1 prompt,
chunk-wise image tokens, pad-to-square preprocessing); the loss is on the answer only: the letter as the tokenizer
encodes it after `ASSISTANT:` (`▁B`), then EOS.

Curriculum (on by default, `--swap-image-layers 2`): during training, text tokens in decoder layers 0-1 attend to
the image tokens of ANOTHER example of the batch, so what they read there is unrelated to the answer; the model has
to read its own picture in layers 2-3, as the pruning at K=2 assumes. Without it this 4-layer decoder reads the
picture in layer 0 and no pruning after layer 1 changes its answers (docs/embedded_demo.md). The saved model is a
plain LlavaForConditionalGeneration; validation and every measurement run it without the curriculum.

Informative scoring attention (on by default): an auxiliary loss (`--attention-target share
--attention-target-weight 1`) pulls the last prompt position's layer-1 image attention — what FastV at K=2 scores —
onto the shape's patches, and the CLIP tower has one layer (`--vision-layers 1`), so its features are the patch
embeddings and the colour stays in the shape's patches.

Training is deterministic for a given seed, thread count and machine: `torch.manual_seed`, a seeded data order,
and questions regenerated from their own seeds.

Afterwards the model and processor are saved with `save_pretrained` (fp32), `scripts/measure_embedded_model.py`
measures the accuracy table on the test split, and everything goes into `training_info.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fastv_advanced import FastVConfig, apply_fastv, embedded, prompting, synthetic, tiny
from fastv_advanced.run_files import cpu_name
from measure_embedded_model import object_patches

VALIDATION_SEED, VALIDATION_ID_START = 4241, 200001


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(embedded.MODEL_PATH), help="where the model and processor are saved")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    parser.add_argument("--train-seed", type=int, default=synthetic.TRAIN_SEED, help="seed of the training questions")
    parser.add_argument("--num-train", type=int, default=12000, help="training questions (generated in memory)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine decay ends at lr * this")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--vocab-size", type=int, default=640)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--intermediate-size", type=int, default=384)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--vision-hidden-size", type=int, default=64)
    parser.add_argument("--vision-layers", type=int, default=1,
                        help="CLIP layers; the last one is unused (feature layer -2), so 1 makes the features the "
                             "patch embeddings: no mixing among patches before the decoder")
    parser.add_argument("--option-order", default=synthetic.DEFAULT_RECIPE.option_order,
                        choices=["fixed", "sorted", "shuffled"], help="synthetic.Recipe.option_order of the training set")
    parser.add_argument("--grid", default="x".join(map(str, synthetic.DEFAULT_RECIPE.grid)),
                        choices=["x".join(map(str, g)) for g in synthetic.POSITION_NAMES], help="ROWSxCOLUMNS")
    parser.add_argument("--question-types", default=",".join(f"{n}:{w}" for n, w in synthetic.DEFAULT_RECIPE.question_types),
                        help="type:weight pairs, e.g. colour:0.4,shape:0.4,yes_no:0.2")
    parser.add_argument("--size-range", default=None, metavar="LO,HI",
                        help="object size as a fraction of the cell side (synthetic.Recipe.size_range); "
                             "default: the shipped recipe's")
    parser.add_argument("--swap-image-layers", type=int, default=2, metavar="N",
                        help="training curriculum: in decoder layers 0..N-1 text tokens see another example's image "
                             "(see ImageSwappedForText), so the model learns to read its own picture in layers >= N; "
                             "0 trains without it")
    parser.add_argument("--swap-mode", default="picture", choices=ImageSwappedForText.MODES,
                        help="what the swap replaces: the other picture's keys and values (picture) or only its "
                             "values, the weights coming from the text's own picture (values)")
    parser.add_argument("--swap-image-queries", action=argparse.BooleanOptionalAction, default=False,
                        help="in the swapped layers image tokens also read the other picture's image tokens (their "
                             "own position excepted), so the picture's content is not spread across image tokens")
    parser.add_argument("--attention-target", default="share", choices=AttentionTarget.KINDS,
                        help="share: -log(image attention mass on the object); cover: cross-entropy of the image "
                             "attention against a uniform distribution over the object's patches (every object patch "
                             "above the background, as a top-R selection needs)")
    parser.add_argument("--attention-target-weight", type=float, default=1.0, metavar="W",
                        help="auxiliary loss W * -log(share of the last prompt position's image attention on the "
                             "object's patches) in --attention-target-layer (see AttentionTarget); 0: none")
    parser.add_argument("--attention-target-layer", type=int, default=1,
                        help="the decoder layer whose attention FastV at K = layer + 1 scores")
    parser.add_argument("--read-target-layers", default="", metavar="L,...",
                        help="also a `share` attention target, same weight, in these layers (e.g. 2: the layer that "
                             "reads the picture finds the object; without it the reading layers may take the colour "
                             "from wherever it has been spread to, or not find it at all)")
    parser.add_argument("--curriculum", default="",
                        help="simpler pictures first: comma-separated FRACTION:OBJECTS stages, e.g. 0.15:1,0.3:2 trains "
                             "the first 15%% of the steps on pictures with 1 object, up to 30%% with 2, then the recipe")
    parser.add_argument("--position-init", default="sincos", choices=["sincos", "random"],
                        help="initial CLIP patch position embeddings (see init_position_embeddings)")
    parser.add_argument("--num-validation", type=int, default=100, help="held-out questions for progress checks")
    parser.add_argument("--eval-every", type=int, default=200, help="steps between validation checks (0: never)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the timing and, in the last digits, the weights depend on it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-measure", action="store_true", help="do not run the accuracy table afterwards")
    parser.add_argument("--write-train-split", default=None, metavar="DIR",
                        help="also write the training questions and images to DIR (e.g. outputs/synthetic_train)")
    return parser.parse_args(argv)


def recipe_from_args(args) -> synthetic.Recipe:
    """The training set's recipe: the default one (that of the shipped test split) unless overridden."""
    types = tuple((name, float(weight)) for name, weight in (pair.split(":") for pair in args.question_types.split(",")))
    grid = tuple(int(n) for n in args.grid.split("x"))
    recipe = dataclasses.replace(synthetic.DEFAULT_RECIPE, grid=grid, option_order=args.option_order,
                                 question_types=types)
    if args.size_range:
        recipe = dataclasses.replace(recipe, size_range=tuple(float(v) for v in args.size_range.split(",")))
    if recipe.num_cells != synthetic.DEFAULT_RECIPE.num_cells:
        recipe = dataclasses.replace(recipe, min_objects=min(2, recipe.num_cells), max_objects=min(4, recipe.num_cells))
    return recipe


def curriculum_stages(args, recipe: synthetic.Recipe) -> list[dict]:
    """`--curriculum` stages: steps [start, end) train on pictures with a fixed number of objects.

    Stage i draws its questions from seed `train_seed + 100000 * (i + 1)` (the main split keeps `train_seed`), one
    fresh question per example.
    """
    stages, start = [], 0
    for index, part in enumerate(filter(None, args.curriculum.split(","))):
        fraction, objects = part.split(":")
        end = round(float(fraction) * args.steps)
        stage_recipe = dataclasses.replace(recipe, min_objects=int(objects), max_objects=int(objects))
        seed = args.train_seed + 100000 * (index + 1)
        questions = synthetic.generate_split(seed, (end - start) * args.batch_size, synthetic.TRAIN_ID_START, stage_recipe)
        stages.append({"start_step": start, "end_step": end, "objects": int(objects), "seed": seed,
                       "questions": questions})
        start = end
    return stages


class ImageSwappedForText:
    """Training-time curriculum: in decoder layers 0..N-1, what text tokens read from the image is ANOTHER example's.

    While it is enabled, the attention of those layers (SDPA, swapped in for this process only) gives each text
    query the image tokens of the next batch row (`roll(1)`) instead of its own; image tokens still attend to their
    own image. Two modes:

    - `picture`: the text queries get the next row's image keys AND values - they look at another picture;
    - `values`: the text queries' weights come from their OWN picture's keys, but the values they read at those
      image positions are the next row's - the attention can find the object, what it reads is another picture's.

    What text reads from the picture in the first N layers is then unrelated to the answer, so training learns to
    take the answer from layers >= N and to ignore what the early layers read. With `image_queries`, an image token
    in those layers also reads the other picture's image tokens (itself excepted: it still reads its own position),
    so what image tokens gather from each other there is useless too and the picture's content stays in the patches
    that hold it. All rows must hold their image tokens at the same positions (true for LLaVA prompts: the image follows the same system prompt). `remove()`
    restores the attention function it replaced.
    """

    MODES = ("picture", "values")

    def __init__(self, model, image_token_id: int, num_layers: int, mode: str = "picture",
                 image_queries: bool = False):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if mode not in self.MODES:
            raise ValueError(f"mode={mode!r}: choose one of {self.MODES}")
        self.functions = ALL_ATTENTION_FUNCTIONS
        self.sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        self.image_token_id = image_token_id
        self.mode = mode
        self.image_queries = image_queries
        self.targets = {id(layer.self_attn) for layer in model.model.language_model.layers[:num_layers]}
        self.mask: torch.Tensor | None = None
        self.enabled = True
        ALL_ATTENTION_FUNCTIONS["sdpa"] = self._attention

    def set_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """input_ids, attention_mask: [B, S]; builds the [B, 1, S, 2S] mask over (own keys, swapped keys): text
        queries (and, with `image_queries`, image queries but for their own position) take their image columns
        from the second half, everything else from the first."""
        is_image = input_ids == self.image_token_id  # [B, S]
        if not bool((is_image == is_image[:1]).all()):
            raise ValueError("ImageSwappedForText needs the image tokens at the same positions in every row")
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()[None]  # [1, S, S]
        swap = (~is_image)[:, :, None] & is_image[:, None, :]  # [B, S, S]: text query, image key
        if self.image_queries:
            other = ~torch.eye(length, dtype=torch.bool, device=input_ids.device)[None]
            swap = swap | (is_image[:, :, None] & is_image[:, None, :] & other)
        own = causal & attention_mask.bool()[:, None, :] & ~swap
        swapped = causal & swap
        self.mask = torch.cat([own, swapped], dim=-1)[:, None]  # [B, 1, S, 2S]

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        """query [B, H, S, D], key/value [B, Hkv, S, D] (after RoPE)."""
        if not (self.enabled and id(module) in self.targets and self.mask is not None):
            return self.sdpa(module, query, key, value, attention_mask, **kwargs)
        swapped_key = key.roll(1, dims=0) if self.mode == "picture" else key
        key = torch.cat([key, swapped_key], dim=2)
        value = torch.cat([value, value.roll(1, dims=0)], dim=2)
        kwargs.pop("is_causal", None)
        return self.sdpa(module, query, key, value, self.mask, is_causal=False, **kwargs)

    def remove(self) -> None:
        self.functions["sdpa"] = self.sdpa


class AttentionTarget:
    """Auxiliary loss on the attention FastV scores: the last prompt position's attention in one decoder layer,
    averaged over heads, should put its image mass on the object's patches.

    FastV at K pruning after layer K-1 ranks the image tokens by the attention of the last prompt position in layer
    K-1 (softmax over all keys, mean over heads; `selection.last_query_attention` + `avg_all_heads`). This wraps the
    SDPA attention function (whatever is installed, e.g. `ImageSwappedForText`'s) and, in that layer, computes the
    same probabilities from the query and the row's OWN keys it is given, then

    `share`:  loss = mean over rows of -log( sum of the mean-head attention over object patches
                                             / sum of the mean-head attention over all image patches ),
    `cover`:  loss = mean over rows of the cross-entropy of that image attention, normalised over the image, against
              the uniform distribution over the object's patches: -mean over object patches j of log(a_j / sum a);
              it also wants every object patch above the background, which `share` does not (mass on a few object
              patches satisfies it), and a top-R selection keeps patches by rank,

    read from `self.loss` after the forward (`self.object_share`: the share, whichever the loss). Only the split of image mass is targeted, not how much of the
    attention goes to the image. The attention output itself is left to the wrapped function. `remove()` restores it.
    """

    KINDS = ("share", "cover")

    def __init__(self, model, layer: int, kind: str = "share"):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if kind not in self.KINDS:
            raise ValueError(f"kind={kind!r}: choose one of {self.KINDS}")
        self.kind = kind

        self.functions = ALL_ATTENTION_FUNCTIONS
        self.inner = ALL_ATTENTION_FUNCTIONS["sdpa"]
        self.target = id(model.model.language_model.layers[layer].self_attn)
        self.layer = layer
        self.batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.loss: torch.Tensor | None = None
        self.object_share: torch.Tensor | None = None
        self.enabled = True
        ALL_ATTENTION_FUNCTIONS["sdpa"] = self._attention

    def set_batch(self, query_positions: torch.Tensor, is_image: torch.Tensor, object_patches: torch.Tensor) -> None:
        """query_positions: LongTensor[B], each row's last prompt position; is_image: BoolTensor[B, S];
        object_patches: BoolTensor[B, num_image_tokens] in image-token order."""
        if not bool((is_image.sum(dim=1) == object_patches.shape[1]).all()):
            raise ValueError("every row must hold exactly one image's tokens")
        self.batch = (query_positions, is_image, object_patches)
        self.loss = self.object_share = None

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        if self.enabled and id(module) == self.target and self.batch is not None:
            self.loss, self.object_share = self._loss(module, query, key, kwargs.get("scaling"))
        return self.inner(module, query, key, value, attention_mask, **kwargs)

    def _loss(self, module, query, key, scaling) -> tuple[torch.Tensor, torch.Tensor]:
        query_positions, is_image, object_patches = self.batch
        batch, num_heads, length, head_dim = query.shape
        group = num_heads // key.shape[1]
        rows = torch.arange(batch, device=query.device)
        last = query[rows, :, query_positions].float()  # [B, H, D]
        keys = key.float().repeat_interleave(group, dim=1)  # [B, H, S, D]: query head h reads kv head h // group
        scale = scaling if scaling is not None else module.scaling
        logits = torch.einsum("bhd,bhsd->bhs", last, keys) * scale
        future = torch.arange(length, device=query.device)[None, :] > query_positions[:, None]  # [B, S]
        log_probs = logits.masked_fill(future[:, None], float("-inf")).log_softmax(dim=-1)  # [B, H, S]
        # Image columns first (all before the prompt's end, so finite: no NaN gradient from the masked ones).
        log_image = log_probs.transpose(1, 2)[is_image].view(batch, -1, num_heads)  # [B, num_image_tokens, H]
        log_image = log_image.logsumexp(dim=-1) - math.log(num_heads)  # log of the mean over heads
        log_image = log_image - log_image.logsumexp(dim=1, keepdim=True)  # normalised over the image
        weights = object_patches.to(log_image.dtype)
        share = (log_image.exp() * weights).sum(dim=1)
        if self.kind == "share":
            return -(share.clamp_min(1e-12)).log().mean(), share.detach()
        cross_entropy = -(log_image * weights).sum(dim=1) / weights.sum(dim=1)
        return cross_entropy.mean(), share.detach()

    def remove(self) -> None:
        self.functions["sdpa"] = self.inner


def init_position_embeddings(model, scale: float = 0.5) -> None:
    """Start CLIP's patch position embeddings from a 2-D sine-cosine table (as MAE does) instead of N(0, 0.02).

    Half of the channels encode the patch row, half the column, at wavelengths from 2 to 4x the grid side; the CLS
    position stays zero. With random 0.02-scale embeddings the patches hardly know where they are, and a question
    about one region of the picture cannot be learned before the positions are (a long plateau on these CPUs).
    The table is only the starting point: the embeddings are trained with everything else.
    """
    embeddings = model.model.vision_tower.embeddings
    side = int(round(embeddings.num_patches**0.5))
    per_axis = embeddings.embed_dim // 2
    num_freq = per_axis // 2
    wavelengths = 2.0 * (2.0 * side) ** (torch.arange(num_freq, dtype=torch.float32) / max(1, num_freq - 1))
    omega = 2 * math.pi / wavelengths  # [num_freq]
    index = torch.arange(side, dtype=torch.float32)[:, None] * omega[None]  # [side, num_freq]
    axis = torch.cat([index.sin(), index.cos()], dim=1)  # [side, per_axis]
    rows = axis[:, None, :].expand(side, side, per_axis)
    cols = axis[None, :, :].expand(side, side, per_axis)
    table = torch.cat([rows, cols], dim=-1).reshape(side * side, 2 * per_axis)  # row-major, like the patches
    with torch.no_grad():
        weight = embeddings.position_embedding.weight  # [1 + side * side, embed_dim]
        weight.zero_()
        weight[1:, : 2 * per_axis] = scale * table


def answer_ids(tokenizer, letter: str) -> list[int]:
    """The answer tokens after `ASSISTANT:`: the letter as the tokenizer encodes it (`▁B`), then EOS."""
    return tokenizer(letter, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def encode(question: synthetic.SyntheticQuestion, processor, config, image=None) -> tuple[list[int], list[int], torch.Tensor]:
    """(input ids, labels, pixel values [3, H, W]) of one training example: the evaluation's prompt + the answer.
    `image`: the question's rendered picture, if already at hand."""
    text = question.entry["conversations"][0]["value"]
    image = question.render() if image is None else image
    _, inputs = prompting.build_inputs(text, image, processor, config, single_pred_prompt=True)
    prompt_ids = inputs["input_ids"][0].tolist()
    target = answer_ids(processor.tokenizer, question.answer)
    return prompt_ids + target, [-100] * len(prompt_ids) + target, inputs["pixel_values"][0]


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: real tokens keep positions 0..S-1 as in unpadded evaluation."""
    length = max(len(ids) for ids, _, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, lab, _) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    pixel_values = torch.stack([pixels for _, _, pixels in examples])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "pixel_values": pixel_values}


def learning_rate(step: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def validation_examples(questions, processor, config) -> list[tuple[dict, int]]:
    """(model inputs, first answer token id) per question, built once for every validation check."""
    examples = []
    for question in questions:
        text = question.entry["conversations"][0]["value"]
        _, inputs = prompting.build_inputs(text, question.render(), processor, config, single_pred_prompt=True)
        examples.append((inputs, answer_ids(processor.tokenizer, question.answer)[0]))
    return examples


@torch.no_grad()
def first_token_accuracy(model, examples: list[tuple[dict, int]], device) -> float:
    """Share of examples whose answer letter is the argmax after the prompt (teacher-forced, one forward each)."""
    model.eval()
    correct = 0
    for inputs, answer_id in examples:
        logits = model(**{k: v.to(device) for k, v in inputs.items()}, logits_to_keep=1).logits[0, -1]
        correct += int(logits.argmax()) == answer_id
    model.train()
    return correct / len(examples)


def machine_description() -> str:
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    recipe = recipe_from_args(args)
    train = synthetic.generate_split(args.train_seed, args.num_train, synthetic.TRAIN_ID_START, recipe)
    stages = curriculum_stages(args, recipe)
    validation = synthetic.generate_split(VALIDATION_SEED, args.num_validation, VALIDATION_ID_START, recipe)
    if args.write_train_split:
        folder = Path(args.write_train_split)
        synthetic.write_split(train, folder / "train.json", folder / "images")

    tokenizer = tiny.build_tokenizer(args.vocab_size, corpus=synthetic.corpus(train))
    processor = tiny.build_processor(image_size=synthetic.IMAGE_SIZE, patch_size=14, tokenizer=tokenizer)
    config = tiny.build_config(
        tokenizer,
        image_size=synthetic.IMAGE_SIZE,
        patch_size=14,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        vision_hidden_size=args.vision_hidden_size,
        vision_layers=args.vision_layers,
    )
    assert prompting.num_image_tokens(config) == 576, "the embedded model must have LLaVA-1.5's 576 image tokens"
    validation_inputs = validation_examples(validation, processor, config) if args.eval_every else []
    model = tiny.build_model(config, seed=args.seed, qk_scale=1.0)
    if args.position_init == "sincos":
        init_position_embeddings(model)
    model.to(device)
    model.train()
    swap_image = None
    if args.swap_image_layers:
        swap_image = ImageSwappedForText(model, config.image_token_id, args.swap_image_layers, args.swap_mode,
                                         args.swap_image_queries)
    attention_target = None
    if args.attention_target_weight:  # installed after the swap, so it sees each row's own keys
        attention_target = AttentionTarget(model, args.attention_target_layer, args.attention_target)
    read_targets = [AttentionTarget(model, int(layer), "share") for layer in filter(None, args.read_target_layers.split(","))]
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f} M parameters, vocabulary {len(tokenizer)}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    order_generator = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    history = []
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="training", unit="step", dynamic_ncols=True)
    running = running_hits = running_share = running_read_share = None
    try:
        for step in progress:
            stage = next((st for st in stages if step < st["end_step"]), None)
            if stage is not None:  # a curriculum stage: its own questions, in order (each seen once)
                first = (step - stage["start_step"]) * args.batch_size
                examples = stage["questions"][first : first + args.batch_size]
            else:
                batch_indices = []
                while len(batch_indices) < args.batch_size:
                    if not order:
                        order = torch.randperm(len(train), generator=order_generator).tolist()
                    batch_indices.append(order.pop())
                examples = [train[i] for i in batch_indices]
            images = [q.render() for q in examples]
            batch = collate([encode(q, processor, config, image) for q, image in zip(examples, images)],
                            tokenizer.pad_token_id)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            if swap_image is not None:
                swap_image.enabled = True
                swap_image.set_batch(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            targets = [t for t in (attention_target, *read_targets) if t is not None]
            if targets:
                prompt_end = (batch["labels"] != -100).int().argmax(dim=1) - 1  # the last prompt position
                is_image = (batch["input_ids"] == config.image_token_id).to(device)
                painted = torch.stack([object_patches(image) for image in images]).to(device)
                for target in targets:
                    target.enabled = True
                    target.set_batch(prompt_end.to(device), is_image, painted)
            output = model(**{k: v.to(device) for k, v in batch.items()})
            loss = output.loss
            for target in targets:
                loss = loss + args.attention_target_weight * target.loss
            if read_targets:
                read_share = sum(t.object_share.mean().item() for t in read_targets) / len(read_targets)
                running_read_share = (read_share if running_read_share is None
                                      else 0.95 * running_read_share + 0.05 * read_share)
            if attention_target is not None:
                share = attention_target.object_share.mean().item()
                running_share = share if running_share is None else 0.95 * running_share + 0.05 * share
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():  # is the answer letter the argmax where it is predicted (the last prompt position)?
                labels = batch["labels"].to(device)
                first = (labels != -100).int().argmax(dim=1)  # position of the letter
                rows = torch.arange(labels.shape[0], device=device)
                hits = (output.logits[rows, first - 1].argmax(-1) == labels[rows, first]).float().mean().item()
            running = output.loss.item() if running is None else 0.95 * running + 0.05 * output.loss.item()
            running_hits = hits if running_hits is None else 0.95 * running_hits + 0.05 * hits
            postfix = {"loss": f"{running:.3f}", "acc": f"{running_hits:.2f}"}
            if running_share is not None:
                postfix["object_attention"] = f"{running_share:.2f}"
            if running_read_share is not None:
                postfix["read_object_attention"] = f"{running_read_share:.2f}"
            progress.set_postfix(**postfix, lr=f"{learning_rate(step, args):.1e}")
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                for hook in (swap_image, attention_target, *read_targets):
                    if hook is not None:
                        hook.enabled = False  # validation measures the plain model
                accuracy = first_token_accuracy(model, validation_inputs, device)
                pruned = {}
                for name, method, rank in (("rank0", "avg_all_heads", 0), ("quarter_avg_all_heads", "avg_all_heads", 144),
                                           ("quarter_random", "random", 144), ("r64_avg_all_heads", "avg_all_heads", 64),
                                           ("r64_random", "random", 64)):
                    fastv = FastVConfig(agg_layer=2, attention_rank=rank, token_selection_method=method, seed=args.seed)
                    with apply_fastv(model, fastv):
                        pruned[name] = first_token_accuracy(model, validation_inputs, device)
                history.append({"step": step + 1, "loss": round(running, 4), "train_accuracy": round(running_hits, 3),
                                **({} if running_share is None else {"train_object_attention_share": round(running_share, 3)}),
                                **({} if running_read_share is None
                                   else {"train_read_layers_object_attention_share": round(running_read_share, 3)}),
                                "validation_first_token_accuracy": accuracy,
                                **{f"validation_{name}_first_token_accuracy": value for name, value in pruned.items()},
                                "seconds": round(time.perf_counter() - start, 1)})
                tqdm.write(f"step {step + 1}: loss {running:.4f}, train accuracy {running_hits:.3f}, "
                           f"validation accuracy {accuracy:.3f}; at K=2 with every image token dropped "
                           f"{pruned['rank0']:.3f}, 25% kept by avg_all_heads {pruned['quarter_avg_all_heads']:.3f}, "
                           f"by random {pruned['quarter_random']:.3f}; 64 kept by avg_all_heads "
                           f"{pruned['r64_avg_all_heads']:.3f}, by random {pruned['r64_random']:.3f}"
                           + ("" if running_share is None else f"; layer-{args.attention_target_layer} image attention "
                              f"on the object {running_share:.2f}"))
    finally:
        for target in reversed(read_targets):
            target.remove()
        if attention_target is not None:
            attention_target.remove()
        if swap_image is not None:
            swap_image.remove()
    training_seconds = time.perf_counter() - start

    model.eval()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(output)
    processor.save_pretrained(output)
    info = {
        "description": "Tiny LLaVA trained from scratch on the synthetic ScienceQA-style set "
                       "(fastv_advanced.synthetic); see docs/embedded_demo.md",
        "command": "python scripts/train_tiny_llava.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "train_seed": args.train_seed,
        "num_train_questions": args.num_train,
        "recipe": dataclasses.asdict(recipe),
        "recipe_is_default": recipe == synthetic.DEFAULT_RECIPE,
        "curriculum": [{k: v for k, v in st.items() if k != "questions"} for st in stages],
        "swap_image_layers": args.swap_image_layers,
        "swap_mode": args.swap_mode,
        "swap_image_queries": args.swap_image_queries,
        "attention_target": {"kind": args.attention_target, "weight": args.attention_target_weight,
                             "layer": args.attention_target_layer,
                             "read_layers": [int(layer) for layer in filter(None, args.read_target_layers.split(","))]},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "examples_seen": args.steps * args.batch_size,
        "position_init": args.position_init,
        "optimizer": {"name": "AdamW", "lr": args.lr, "warmup_steps": args.warmup_steps, "schedule": "cosine",
                      "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay, "grad_clip": 1.0},
        "training_seconds": round(training_seconds, 1),
        "torch_threads": args.threads,
        "device": args.device,
        "machine": machine_description(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "num_parameters": num_params,
        "saved_dtype": "float32",
        "shapes": {
            "image_size": config.vision_config.image_size, "patch_size": config.vision_config.patch_size,
            "image_tokens": prompting.num_image_tokens(config),
            "vision_hidden_size": args.vision_hidden_size, "vision_layers": args.vision_layers,
            "vision_feature_layer": config.vision_feature_layer,
            "text_hidden_size": args.hidden_size, "text_intermediate_size": args.intermediate_size,
            "text_layers": args.num_layers, "text_heads": args.num_heads, "text_kv_heads": args.num_kv_heads,
            "vocab_size": len(tokenizer),
        },
        "history": history,
    }
    (output / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {output} after {training_seconds:.0f} s of training", flush=True)

    if not args.skip_measure:
        measure = [sys.executable, str(Path(__file__).with_name("measure_embedded_model.py")), "--model-path",
                   str(output), "--threads", str(args.threads)]
        return subprocess.call(measure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
