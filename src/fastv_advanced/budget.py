"""Equal cost: a method's theoretical prefill FLOPs without running the model, and the budget that meets a target.

`planned_flops(method, shape, num_tokens, num_image_tokens)` follows the method's own schedule
(`kept_per_stage`); `solve_budget(...)` finds the value of the method's `budget_parameter` whose FLOPs ratio is
closest to a target (bisection over a monotone budget, integers or reals).
"""

from __future__ import annotations

import dataclasses
import typing

from .flops import DecoderShape, schedule_flops
from .methods import PruningMethod


def planned_flops(method: PruningMethod, shape: DecoderShape, num_tokens: int, num_image_tokens: int) -> dict:
    """`schedule_flops` of the method's planned schedule for one prompt."""
    return schedule_flops(shape, num_tokens, num_image_tokens, method.kept_per_stage(shape.num_layers,
                                                                                     num_image_tokens))


def _ratio(method: PruningMethod, value, shape: DecoderShape, num_tokens: int, num_image_tokens: int) -> float | None:
    try:
        candidate = dataclasses.replace(method, **{method.budget_parameter: value})
        return planned_flops(candidate, shape, num_tokens, num_image_tokens)["ratio"]
    except (ValueError, IndexError):
        return None


def solve_budget(method: PruningMethod, target_ratio: float, shape: DecoderShape, num_tokens: int,
                 num_image_tokens: int, high: float | None = None) -> PruningMethod:
    """`method` with its budget parameter set so that its FLOPs ratio is closest to `target_ratio` (in (0, 1]).

    The budget is searched in [0, high] (default: the image token count; 1 for a ratio-like float budget), assuming
    the cost changes monotonically with it (up or down); a method with `budget_choices` gets the closest of them. ValueError when the method has no budget parameter or no value reaches the target.
    """
    name = method.budget_parameter
    if name is None:
        raise ValueError(f"{method.name} has no budget parameter to solve for")
    if not 0.0 < target_ratio <= 1.0:
        raise ValueError(f"FLOPs target {target_ratio!r} is outside the allowed range (0, 1]")
    choices = getattr(method, "budget_choices", None)
    if choices:
        scored = [(abs(r - target_ratio), c) for c in choices
                  if (r := _ratio(method, c, shape, num_tokens, num_image_tokens)) is not None]
        if not scored:
            raise ValueError(f"no {name} of {method.name} reaches a FLOPs ratio of {target_ratio}")
        return dataclasses.replace(method, **{name: min(scored)[1]})
    kind = typing.get_type_hints(type(method)).get(name)
    integer = kind is int or int in typing.get_args(kind)
    high = (num_image_tokens if integer else 1.0) if high is None else high
    low_value, high_value = (0, int(high)) if integer else (0.0, float(high))
    if _ratio(method, low_value, shape, num_tokens, num_image_tokens) is None:  # e.g. a stride starts at 1
        low_value = 1 if integer else 1e-6
    low_ratio = _ratio(method, low_value, shape, num_tokens, num_image_tokens)
    high_ratio = _ratio(method, high_value, shape, num_tokens, num_image_tokens)
    growing = low_ratio is None or high_ratio is None or high_ratio >= low_ratio  # cost grows with the budget
    for _ in range(60):
        if (integer and high_value - low_value <= 1) or (not integer and high_value - low_value < 1e-6):
            break
        middle = (low_value + high_value) // 2 if integer else (low_value + high_value) / 2
        ratio = _ratio(method, middle, shape, num_tokens, num_image_tokens)
        if ratio is None or (ratio > target_ratio) == growing:
            high_value = middle
        else:
            low_value = middle
    candidates = [(abs(r - target_ratio), v) for v in (low_value, high_value)
                  if (r := _ratio(method, v, shape, num_tokens, num_image_tokens)) is not None]
    if not candidates:
        raise ValueError(f"no {name} of {method.name} reaches a FLOPs ratio of {target_ratio}")
    best = min(candidates)[1]
    return dataclasses.replace(method, **{name: round(best, 6) if not integer else best})
