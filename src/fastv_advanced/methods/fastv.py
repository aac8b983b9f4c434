"""FastV (Chen et al., 2024, https://arxiv.org/abs/2403.06764) with pluggable selection rules.

Layers 0..K-1 see every token; the layer K-1 attention of the last prompt position scores the image tokens; the R
best are kept, with their original positions, for layers K..L-1. The selection rule (`token_selection_method`)
turns the attention [batch, heads, n] into scores: `avg_all_heads` (the paper), `max_head`,
`weighted_combination` (alpha), `random`, or any registered / `package.module:function` rule
(`fastv_advanced.strategies`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import ClassVar

from ..strategies import get_strategy, run_strategy
from . import register_method
from .base import Choice, PruningMethod, Stage, StageInputs, check_range, is_int

GUIDE_ATTENTION_RANK, GUIDE_AGG_LAYER = 288, 2
DEFAULT_ALPHA = 0.5  # --fast-v-weighted-alpha's default: what a run of another rule records
RULE_ORDER = ("max_head", "avg_all_heads", "weighted_combination", "random")  # the guide's order
RULES_WITHOUT_ALPHA = ("max_head", "avg_all_heads", "random")
FILE_PREFIX_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@register_method
@dataclass
class FastVConfig(PruningMethod):
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

    name: ClassVar[str] = "fastv"
    display_name: ClassVar[str] = "FastV"
    budget_parameter: ClassVar[str] = "attention_rank"
    table_order: ClassVar[int] = 0
    comparison_reference: ClassVar[bool] = True
    layer_parameters: ClassVar[dict[str, int]] = {"agg_layer": 0}
    not_in_results: ClassVar[tuple[str, ...]] = ("sys_length", "image_token_length")
    presets: ClassVar[dict[str, dict]] = {str(n): {"agg_layer": 2, "attention_rank": n} for n in (192, 128, 64)}

    agg_layer: int = 2
    attention_rank: int | None = None
    keep_ratio: float | None = None
    token_selection_method: str = "avg_all_heads"
    weighted_alpha: float = 0.5
    sys_length: int | None = None
    image_token_length: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_int(self.agg_layer) or self.agg_layer < 1:
            raise ValueError(
                f"agg_layer={self.agg_layer!r} is invalid: it must be an integer >= 1 (layer K-1 must exist to score "
                "the image tokens) and below the number of decoder layers"
            )
        if self.attention_rank is not None and self.keep_ratio is not None:
            raise ValueError(
                f"give attention_rank ({self.attention_rank}) or keep_ratio ({self.keep_ratio}), not both"
            )
        if self.attention_rank is not None and (not is_int(self.attention_rank) or self.attention_rank < 0):
            raise ValueError(
                f"attention_rank={self.attention_rank!r} is invalid: it must be an integer in [0, number of image tokens]"
            )
        if self.keep_ratio is not None and not (0.0 <= self.keep_ratio <= 1.0):
            raise ValueError(f"keep_ratio={self.keep_ratio!r} is outside the allowed range [0, 1]")
        check_range("weighted_alpha", self.weighted_alpha, 0.0, 1.0)
        for name in ("sys_length", "image_token_length"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 0):
                raise ValueError(f"{name}={value!r} is invalid: it must be a non-negative integer")
        get_strategy(self.token_selection_method)

    # -- the method ----------------------------------------------------------------------------------------------

    def stages(self, num_layers: int) -> list[Stage]:
        if not 1 <= self.agg_layer < num_layers:
            raise ValueError(
                f"agg_layer={self.agg_layer} is outside the allowed range [1, {num_layers - 1}] for this model "
                f"with {num_layers} decoder layers"
            )
        return [Stage(layer=self.agg_layer, attention_layer=self.agg_layer - 1)]

    def choose(self, stage_index: int, inputs: StageInputs) -> Choice:
        strategy = get_strategy(self.token_selection_method)
        scores, head_index = run_strategy(strategy, inputs.attention, self, inputs.generator)
        return Choice(scores, self.num_kept(inputs.num_image_tokens), head_index)

    def kept_per_stage(self, num_layers: int, num_image_tokens: int) -> list[tuple[int, int]]:
        return [(self.agg_layer, self.num_kept(num_image_tokens))]

    def num_kept(self, num_image_tokens: int) -> int:
        """R for an input with `num_image_tokens` image tokens; ValueError when the rank exceeds them."""
        if self.attention_rank is not None:
            if self.attention_rank > num_image_tokens:
                raise ValueError(
                    f"attention_rank={self.attention_rank} is larger than the {num_image_tokens} image tokens of the "
                    f"input; allowed range is [0, {num_image_tokens}]"
                )
            return self.attention_rank
        return int(round(self._ratio() * num_image_tokens))

    def _ratio(self) -> float:
        return 0.5 if self.keep_ratio is None else float(self.keep_ratio)

    def to_dict(self) -> dict:
        """Plain dict of the fields (for result files)."""
        return asdict(self)

    # -- how results name and order it ---------------------------------------------------------------------------

    def result_parameters(self) -> dict:
        """The fields that change results: the guide's span check only warns, and alpha only matters to
        `weighted_combination` (and to rules outside the package, which may read it)."""
        params = super().result_parameters()
        if self.token_selection_method in RULES_WITHOUT_ALPHA:
            del params["weighted_alpha"]
        return params

    def _rule_name(self) -> str:
        if self.token_selection_method == "weighted_combination":
            return f"weighted α={self.weighted_alpha:g}"
        return self.token_selection_method

    def _is_guide_budget(self) -> bool:
        return self.attention_rank == GUIDE_ATTENTION_RANK and self.agg_layer == GUIDE_AGG_LAYER

    def label(self) -> str:
        """The guide's names: `FastV - max_head`, `FastV - weighted α=0.3`, plus `(R=144, K=2)` off the guide's
        R=288, K=2."""
        if self._is_guide_budget():
            return f"FastV - {self._rule_name()}"
        budget = f"R={self.attention_rank}" if self.attention_rank is not None else f"ratio={self._ratio():g}"
        return f"FastV - {self._rule_name()} ({budget}, K={self.agg_layer})"

    def short_label(self) -> str:
        """`max_head`, `weighted α=0.3`, `avg_all_heads R=144 K=1`."""
        return self.label().removeprefix("FastV - ").replace(" (", " ").replace(", ", " ").rstrip(")")

    def run_label(self) -> str:
        """`FastV max_head (R=288, K=2)`."""
        rule = self.token_selection_method
        if rule == "weighted_combination":
            rule += f" alpha={self.weighted_alpha!r}"
        budget = f"R={self.attention_rank}" if self.attention_rank is not None else f"ratio={self._ratio()!r}"
        return f"FastV {rule} ({budget}, K={self.agg_layer})"

    def file_stem(self) -> str:
        """`fastv_{rule}`, `..._weighted_combination_alpha0.7`; `_rank{R}_k{K}` when R != 288 or K != 2
        (`_ratio{r}_k{K}` for a keep ratio). A `package.module:function` rule has its `:` replaced by `-`."""
        stem = f"fastv_{FILE_PREFIX_SAFE.sub('-', self.token_selection_method)}"
        if self.token_selection_method == "weighted_combination":
            stem += f"_alpha{float(self.weighted_alpha)!r}"
        if self.attention_rank is None:
            stem += f"_ratio{self._ratio()!r}_k{self.agg_layer}"
        elif not self._is_guide_budget():
            stem += f"_rank{self.attention_rank}_k{self.agg_layer}"
        return stem

    def sort_key(self) -> tuple:
        rule = self.token_selection_method
        position = RULE_ORDER.index(rule) if rule in RULE_ORDER else len(RULE_ORDER)
        inf = float("inf")
        return (
            position, rule, -1.0 if rule in RULES_WITHOUT_ALPHA else float(self.weighted_alpha),
            inf if self.attention_rank is None else self.attention_rank,
            inf if self.keep_ratio is None else self.keep_ratio, self.agg_layer,
        )

    def group(self) -> str:
        return self.token_selection_method

    def result_fields(self) -> dict:
        """The guide's `fast_v_*` fields."""
        return {"use_fast_v": True, **{f"fast_v_{key}": value for key, value in self.to_dict().items() if key != "seed"}}

    def check_image_span(self, image_starts: list[int], num_image_tokens: int) -> str | None:
        """The guide's `sys_length` / `image_token_length` against the detected span (they only warn)."""
        mismatches = []
        if self.sys_length is not None and any(start != self.sys_length for start in image_starts):
            mismatches.append(f"sys_length={self.sys_length} but the image starts at {image_starts[0]}")
        if self.image_token_length is not None and self.image_token_length != num_image_tokens:
            mismatches.append(f"image_token_length={self.image_token_length} but the input has {num_image_tokens}")
        if not mismatches:
            return None
        return "FastV: " + "; ".join(mismatches) + ". Using the detected image span."

    def run_section(self) -> dict:
        """`{"fastv": every field}`, as headers recorded FastV before other methods existed."""
        return {"fastv": self.to_dict()}

    def fingerprint_section(self) -> dict:
        """`{"fastv": result parameters}`: the fingerprints of files written before other methods existed."""
        return {"fastv": self.result_parameters()}

    @classmethod
    def from_run_section(cls, run: dict) -> "FastVConfig | None":
        return cls(**run["fastv"]) if run.get("fastv") else None

    @classmethod
    def from_legacy_result(cls, section: dict) -> "FastVConfig | None":
        """A result file of the guide's format (`use_fast_v` and `fast_v_*` fields only)."""
        if not section.get("use_fast_v") or "pruning_method" in section:
            return None
        fields = {k: section.get(f"fast_v_{k}") for k in
                  ("agg_layer", "attention_rank", "keep_ratio", "token_selection_method", "weighted_alpha",
                   "sys_length", "image_token_length")}
        fields = {k: v for k, v in fields.items() if v is not None}
        return cls(**fields, seed=section.get("seed", 0))


FastV = FastVConfig


def uses_alpha(rule: str) -> bool:
    """Whether the selection rule `rule` reads `weighted_alpha`."""
    return rule == "weighted_combination"


def alphas_of(rule: str, alphas: tuple[float, ...]) -> tuple[float, ...]:
    """The alphas a grid gives `rule`: all of them for weighted_combination, the default for the others."""
    return alphas if uses_alpha(rule) else (DEFAULT_ALPHA,)
