"""Theoretical prefill FLOPs of the decoder with and without FastV (DESIGN.md section 4), from real shapes."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
