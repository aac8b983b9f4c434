"""Theoretical prefill FLOPs of the decoder with and without FastV (DESIGN.md section 4), from real shapes, and of
the vision tower and projector from the images' geometry."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .selection import image_starts


@dataclass(frozen=True)
class DecoderShape:
    """The decoder dimensions that set its cost."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    gated_mlp: bool = True  # Llama's SwiGLU has three FFN matrices, a plain two-matrix MLP two

    @classmethod
    def from_text_config(cls, config) -> "DecoderShape":
        """Read the shape of a transformers Llama-style text config."""
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            gated_mlp=True,  # LLaVA's decoders (Llama, Vicuna, Mistral) all use a gated (three-matrix) FFN
        )


def layer_flops(shape: DecoderShape, num_tokens: int) -> int:
    """FLOPs (2 per multiply-add) of one decoder layer on `num_tokens` tokens.

    FastV's 4nd^2 + 2n^2d + 2ndm with the real projections: q and o are d x heads*head_dim, k and v
    d x kv_heads*head_dim (grouped-query attention), QK^T and AV cost n^2 * heads*head_dim each, and the FFN has
    three d x m matrices when gated.
    """
    n, d, m = num_tokens, shape.hidden_size, shape.intermediate_size
    q_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    projections = n * d * (2 * q_width + 2 * kv_width)
    attention = 2 * n * n * q_width
    ffn = (3 if shape.gated_mlp else 2) * n * d * m
    return 2 * (projections + attention + ffn)


def schedule_flops(
    shape: DecoderShape, num_tokens: int, num_image_tokens: int, stages: list[tuple[int, int]]
) -> dict:
    """Decoder prefill FLOPs of one prompt pruned by a schedule, and unpruned.

    stages: (layer, image tokens kept from that layer on), layers ascending; a stage at layer 0 removes tokens
    before the language model. The cost is summed over the segments between stages. Returns `flops`,
    `baseline_flops`, `ratio`, `num_tokens`, `pruned_num_tokens` (after the last stage),
    `image_tokens_per_layer` and the shape used.
    """
    per_layer = [num_image_tokens] * shape.num_layers
    for layer, kept in stages:
        per_layer[layer:] = [kept] * (shape.num_layers - layer)
    tokens = [num_tokens - (num_image_tokens - kept) for kept in per_layer]
    baseline = shape.num_layers * layer_flops(shape, num_tokens)
    flops = sum(layer_flops(shape, n) for n in tokens)
    return {
        "flops": flops,
        "baseline_flops": baseline,
        "ratio": flops / baseline if baseline else 1.0,
        "num_tokens": num_tokens,
        "pruned_num_tokens": tokens[-1] if tokens else num_tokens,
        "image_tokens_per_layer": per_layer,
        "shape": asdict(shape),
    }


def prefill_flops(
    shape: DecoderShape, num_tokens: int, num_image_tokens: int, num_kept: int | None, agg_layer: int | None
) -> dict:
    """Decoder prefill FLOPs of one prompt with FastV (one stage: `num_kept` image tokens from layer `agg_layer`)
    and unpruned; `num_kept`/`agg_layer` None means no pruning (ratio 1). See `schedule_flops`."""
    pruned = num_kept is not None and agg_layer is not None and num_image_tokens > 0
    result = schedule_flops(shape, num_tokens, num_image_tokens, [(agg_layer, num_kept)] if pruned else [])
    del result["image_tokens_per_layer"]
    return result


# -- the vision tower and projector -----------------------------------------------------------------------------


def _encoder_layer_flops(tokens: int, width: int, ffn: int, ffn_matrices: int, attention_lengths: list[int]) -> int:
    """One ViT layer: q, k, v, o projections, QKᵀ and AV over each attention segment, an FFN of `ffn_matrices`
    width x ffn matrices (2 plain, 3 gated)."""
    return 2 * (4 * tokens * width * width + 2 * width * sum(n * n for n in attention_lengths)
                + ffn_matrices * tokens * width * ffn)


def _qwen_windows(height: int, width: int, config) -> list[int]:
    """Qwen2.5-VL's window attention: the patches of each window of an h x w patch grid (windows of
    `window_size` pixels over the merged grid; edge windows are smaller)."""
    merge = config.spatial_merge_size
    side = config.window_size // merge // config.patch_size  # window side in merged units
    rows, cols = height // merge, width // merge
    return [merge * merge * min(side, rows - r) * min(side, cols - c)
            for r in range(0, rows, side) for c in range(0, cols, side)]


def _qwen_image_flops(config, grid: list[int]) -> int:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower of one image with patch grid (t, h, w), mergers included."""
    vision = config.vision_config
    frames, height, width = grid
    tokens = frames * height * width
    model_type = config.model_type
    if model_type == "qwen2_vl":
        dim, ffn, matrices, out = vision.embed_dim, vision.embed_dim * vision.mlp_ratio, 2, vision.hidden_size
    else:
        dim, ffn, out = vision.hidden_size, vision.intermediate_size, vision.out_hidden_size
        matrices = 3 if model_type == "qwen2_5_vl" else 2
    full = [height * width] * frames
    total = 2 * tokens * dim * vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    for layer in range(vision.depth):
        windowed = model_type == "qwen2_5_vl" and layer not in vision.fullatt_block_indexes
        lengths = [n for _ in range(frames) for n in _qwen_windows(height, width, vision)] if windowed else full
        total += _encoder_layer_flops(tokens, dim, ffn, matrices, lengths)
    merged, merged_width = tokens // vision.spatial_merge_size ** 2, dim * vision.spatial_merge_size ** 2
    mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or [])
    return total + mergers * 2 * merged * merged_width * (merged_width + out)


def _vit_crop_flops(config) -> int:
    """A CLIP / SigLIP tower on one crop (every layer runs, and SigLIP's pooling head where the config keeps it) and
    the projector on its features: LLaVA's two-layer MLP on the selected features, Gemma 3's projection of its
    pooled tokens."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    tokens = patches + (1 if vision.model_type == "clip_vision_model" else 0)  # CLIP's [CLS]
    dim = vision.hidden_size
    total = 2 * patches * dim * vision.num_channels * vision.patch_size ** 2
    total += vision.num_hidden_layers * _encoder_layer_flops(tokens, dim, vision.intermediate_size, 2, [tokens])
    if getattr(vision, "vision_use_head", False):  # SigLIP's attention-pooling head: one query over every patch
        total += 2 * (2 * patches * dim * dim + 2 * dim * dim + 2 * patches * dim + 2 * dim * vision.intermediate_size)
    text = config.text_config.hidden_size
    if config.model_type == "gemma3":
        return total + 2 * config.mm_tokens_per_image * dim * text
    features = patches if getattr(config, "vision_feature_select_strategy", "default") == "default" else tokens
    return total + 2 * features * (dim * text + text * text)


def vision_flops_per_row(config, inputs: dict) -> list[int] | None:
    """Vision-tower and projector FLOPs (2 per multiply-add: projections, attention, FFN, patch embedding, mergers)
    of each row of a batch of model inputs, from the images' geometry: LLaVA-1.5 and Gemma 3 one crop per image,
    LLaVA-NeXT / OneVision the base crop plus the anyres tiles of `image_sizes`, Qwen-VL the patch grid of
    `image_grid_thw` (Qwen2.5-VL's windowed layers attend within windows). The same with and without pruning
    inside the language model. None for a text-only batch or a family without a formula."""
    if "input_ids" not in inputs or ("pixel_values" not in inputs):
        return None
    images_per_row = image_starts(inputs["input_ids"] == config.image_token_id).sum(dim=1).tolist()
    model_type = config.model_type
    if model_type.startswith("qwen"):
        per_image = [_qwen_image_flops(config, grid) for grid in inputs["image_grid_thw"].tolist()]
    elif model_type in ("llava", "gemma3"):
        per_image = [_vit_crop_flops(config)] * sum(images_per_row)
    elif model_type in ("llava_next", "llava_onevision"):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crop = config.vision_config.image_size
        per_image = [_vit_crop_flops(config) * image_size_to_num_patches(size, config.image_grid_pinpoints, crop)
                     for size in inputs["image_sizes"].tolist()]
    else:
        return None
    rows, start = [], 0
    for count in images_per_row:
        rows.append(sum(per_image[start : start + count]))
        start += count
    return rows
