"""FastVConfig: where to prune, how many image tokens to keep, and which strategy chooses them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .strategies import get_strategy


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class FastVConfig:
    """FastV settings, named as in the user's guide.

    agg_layer: K. Layers 0..K-1 see every token; the layer K-1 attention chooses the image tokens that layers
        K..L-1 keep. Must satisfy 1 <= K < number of decoder layers (checked when applied to a model).
    attention_rank: R, the number of image tokens kept. Give this or `keep_ratio`; with neither, half are kept.
    keep_ratio: fraction of the image tokens kept (R = round(ratio * n_image)), instead of `attention_rank`.
    token_selection_method: a registered strategy name or `package.module:function`.
    weighted_alpha: alpha of `weighted_combination`, in [0, 1].
    sys_length, image_token_length: the guide's expected image start and image token count. Optional: the span
        is detected from the image token ids; when these disagree with it, a warning names both values.
    seed: seeds the generator handed to strategies that take one (the `random` control).
    """

    agg_layer: int = 2
    attention_rank: int | None = None
    keep_ratio: float | None = None
    token_selection_method: str = "avg_all_heads"
    weighted_alpha: float = 0.5
    sys_length: int | None = None
    image_token_length: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.agg_layer) or self.agg_layer < 1:
            raise ValueError(
                f"agg_layer={self.agg_layer!r} is invalid: it must be an integer >= 1 (layer K-1 must exist to score "
                "the image tokens) and below the number of decoder layers"
            )
        if self.attention_rank is not None and self.keep_ratio is not None:
            raise ValueError(
                f"give attention_rank ({self.attention_rank}) or keep_ratio ({self.keep_ratio}), not both"
            )
        if self.attention_rank is not None and (not _is_int(self.attention_rank) or self.attention_rank < 0):
            raise ValueError(
                f"attention_rank={self.attention_rank!r} is invalid: it must be an integer in [0, number of image tokens]"
            )
        if self.keep_ratio is not None and not (0.0 <= self.keep_ratio <= 1.0):
            raise ValueError(f"keep_ratio={self.keep_ratio!r} is outside the allowed range [0, 1]")
        if not (0.0 <= self.weighted_alpha <= 1.0) or math.isnan(self.weighted_alpha):
            raise ValueError(f"weighted_alpha={self.weighted_alpha!r} is outside the allowed range [0, 1]")
        for name in ("sys_length", "image_token_length"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name}={value!r} is invalid: it must be a non-negative integer")
        get_strategy(self.token_selection_method)

    def num_kept(self, num_image_tokens: int) -> int:
        """R for an input with `num_image_tokens` image tokens; ValueError when the rank exceeds them."""
        if self.attention_rank is not None:
            if self.attention_rank > num_image_tokens:
                raise ValueError(
                    f"attention_rank={self.attention_rank} is larger than the {num_image_tokens} image tokens of the "
                    f"input; allowed range is [0, {num_image_tokens}]"
                )
            return self.attention_rank
        ratio = 0.5 if self.keep_ratio is None else self.keep_ratio
        return int(round(ratio * num_image_tokens))

    def to_dict(self) -> dict:
        """Plain dict of the fields (for result files)."""
        return asdict(self)
