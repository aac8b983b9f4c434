"""The configurations a benchmark run compares: a mode (baseline, drop, mask, eager FastV), and for pruned modes
the layer K and the rank R, or (mode "zoo", `--zoo`) a pruning method at one of its papers' presets; and the
context that runs a model in one of them."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from fastv_advanced import FastVConfig, apply_fastv, apply_pruning
from fastv_baselines import EagerFastV, MaskModeFastV
from zoo_methods import zoo_method

PRUNED_MODES = ("drop", "mask", "eager_fastv")
ALL_MODES = ("baseline", "eager_baseline") + PRUNED_MODES


@dataclass(frozen=True)
class Config:
    mode: str
    k: int | None = None
    rank: int | None = None
    method: str | None = None  # mode "zoo": a registered method run at one of its presets (zoo_methods.py)
    preset: str | None = None

    @property
    def key(self) -> str:
        if self.mode == "zoo":
            return f"zoo/{self.method}/{self.preset}"
        return self.mode if self.k is None else f"{self.mode}/K{self.k}/R{self.rank}"

    @property
    def pruned(self) -> bool:
        return self.k is not None or self.mode == "zoo"

    @classmethod
    def from_key(cls, key: str) -> "Config":
        """The inverse of `key`: "baseline", "drop/K2/R288" or "zoo/pdrop/64"."""
        mode, *rest = key.split("/")
        if mode == "zoo":
            return cls(mode, method=rest[0], preset=rest[1])
        return cls(mode, int(rest[0][1:]), int(rest[1][1:])) if rest else cls(mode)


def text_attention(mode: str) -> str:
    return "eager" if mode.startswith("eager") else "sdpa"


def mode_context(model, config: Config):
    """Switch the text model's attention for the mode and enter its pruning context."""
    impl = text_attention(config.mode)
    if model.config.text_config._attn_implementation != impl:
        model.set_attn_implementation({"text_config": impl})
    if config.mode == "zoo":
        layers = len(model.model.language_model.layers)
        vision = model.config.vision_config
        n_image = (vision.image_size // vision.patch_size) ** 2
        return apply_pruning(model, zoo_method(config.method, config.preset, layers, n_image))
    if config.k is None:
        return contextlib.nullcontext(None)
    fastv = FastVConfig(agg_layer=config.k, attention_rank=config.rank)
    if config.mode == "drop":
        return apply_fastv(model, fastv)
    if config.mode == "mask":
        return MaskModeFastV(model, fastv)
    if config.mode == "eager_fastv":
        return EagerFastV(model, fastv)
    raise ValueError(config.mode)
