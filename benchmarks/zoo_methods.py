"""The method zoo at the papers' budgets, mapped onto the benchmark's model: which methods and presets run, and the
rule that turns a preset written for LLaVA-1.5 (32 decoder layers, 576 image tokens) into settings for a model
with L layers and n image tokens.

Layer rule (the package's `PruningMethod.scaled_to` / `methods.base.scale_stage_layers`): a preset's schedule is read as its *stage layers*, the first decoder layer that
sees each pruned sequence (FastV `agg_layer`, DART `layer`, PyramidDrop `layers`, SparseVLM `layers` + 1, since
SparseVLM rates at layer l and prunes before l + 1). Each stage layer s of the 32-layer schedule becomes
max(1, floor(s * L / 32 + 1/2)) (round half up, at least 1: layer 0 would prune before the language model, a
different kind of method); a layer not above the previous one is moved to the previous + 1, and the list is
then pulled down from its end so that the last stage is at most L - 1 (ValueError when the stages do not fit).
L = 32 leaves every preset as it is. On the scaled preset (L = 8): FastV and DART K = 2 -> 1; PyramidDrop
(2, 8, 16) -> (1, 2, 4); SparseVLM rating layers (2, 6, 15), stages (3, 7, 16) -> stages (1, 2, 4), rating layers
(0, 1, 3).

Count rule (`map_counts`): the kept-token counts of a preset are kept as they are when the image has 576 tokens
(every preset that builds LLaVA-1.5's image, the scaled and llava7b ones included); for another image size
(the tiny preset's 64 tokens) each count is scaled by n / 576 and rounded (FastV `attention_rank`, DART
`max_num_truncation`, VisionZip `dominant` (at least 1) and `contextual`, SparseVLM's keep table, given as `keep`).
Ratios (PyramidDrop λ, DivPrune `ratio`) and grid steps (uniform `stride`, pool `size`) need no change.
"""

from __future__ import annotations

import dataclasses
import math

from fastv_advanced import build_method, get_method_class
from fastv_advanced.methods.base import scale_stage_layers as map_stage_layers  # noqa: F401  (the rule, tested here)

PAPER_LAYERS, PAPER_IMAGE_TOKENS = 32, 576
ZOO_METHODS = ("fastv", "pdrop", "sparsevlm", "dart", "visionzip", "divprune", "uniform", "pool")

COUNT_FIELDS = {"fastv": ("attention_rank",), "dart": ("max_num_truncation",), "visionzip": ("dominant", "contextual")}
MIN_COUNT = {("visionzip", "dominant"): 1}
LAYER_RULE = ("each stage layer s of a 32-layer preset (the first layer that sees the pruned sequence; SparseVLM: "
              "rating layer + 1) becomes max(1, round_half_up(s * L / 32)), then ascending and distinct (a layer not "
              "above the previous one moves to previous + 1), the last at most L - 1; kept-token counts as in the "
              "preset at 576 image tokens, else scaled by n / 576")


def map_counts(name: str, params: dict, num_image: int, paper_image: int = PAPER_IMAGE_TOKENS) -> dict:
    """The preset's kept-token counts scaled by num_image / paper_image (unchanged at 576 image tokens)."""
    if num_image == paper_image:
        return dict(params)
    scale = num_image / paper_image
    out = dict(params)
    for field in COUNT_FIELDS.get(name, ()):
        if out.get(field) is not None:
            out[field] = max(MIN_COUNT.get((name, field), 0), math.floor(out[field] * scale + 0.5))
    if name == "sparsevlm" and out.get("keep") is None:
        table = build_method("sparsevlm", out).keep_table()
        out["keep"] = tuple(math.floor(k * scale + 0.5) for k in table)
    return out


def map_layers(name: str, params: dict, num_layers: int) -> dict:
    """The preset's layer settings at the same relative depth of a model of `num_layers` layers (the package's
    `PruningMethod.scaled_to`; unchanged at 32)."""
    if not get_method_class(name).layer_parameters:
        return dict(params)
    scaled = build_method(name, params).scaled_to(num_layers)
    return {**params, **{field: getattr(scaled, field) for field in type(scaled).layer_parameters}}


def preset_names(name: str) -> list[str]:
    """The method's presets, largest budget first ("192", "128", "64"; uniform / pool: "144", "64")."""
    return sorted(get_method_class(name).presets, key=int, reverse=True)


def zoo_params(name: str, preset: str, num_layers: int, num_image: int) -> dict:
    """The parameters `name` runs with at `preset` on a model of `num_layers` layers and `num_image` image tokens."""
    params = dict(get_method_class(name).presets[preset])
    return map_layers(name, map_counts(name, params, num_image), num_layers)


def zoo_method(name: str, preset: str, num_layers: int, num_image: int):
    return build_method(name, zoo_params(name, preset, num_layers, num_image))


def changed_settings(name: str, preset: str, num_layers: int, num_image: int) -> dict:
    """What the mapping changed: field -> (paper preset's value, value run here); the preset's fields only, plus
    `keep` when a SparseVLM keep table was scaled."""
    paper = build_method(name, get_method_class(name).presets[preset])
    here = zoo_method(name, preset, num_layers, num_image)
    return {f.name: (getattr(paper, f.name), getattr(here, f.name)) for f in dataclasses.fields(paper)
            if f.init and getattr(paper, f.name) != getattr(here, f.name)}


def zoo_grid(methods=None) -> list[tuple[str, str]]:
    """(method, preset) pairs in table order."""
    return [(m, p) for m in (methods or ZOO_METHODS) for p in preset_names(m)]
