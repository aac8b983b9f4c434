"""Token-selection strategies: layer K-1 attention of the last prompt position -> one score per image token.

A strategy is a function

    score(attention: FloatTensor[batch, heads, n_image], config: FastVConfig) -> FloatTensor[batch, n_image]

or it returns `(scores[batch, n_image], head_index[batch])` when it picks a head. Higher scores are kept.
Register one with `@register_strategy("name")`, or name it as `package.module:function` in the configuration.
A strategy that needs randomness accepts a `generator` keyword argument (a seeded `torch.Generator`).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from .references import import_reference

StrategyFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]

_REGISTRY: dict[str, StrategyFn] = {}


def register_strategy(name: str) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator that registers a strategy function under `name` (overwriting an earlier one of that name)."""

    def decorator(fn: StrategyFn) -> StrategyFn:
        _REGISTRY[name] = fn
        return fn

    return decorator


def available_strategies() -> list[str]:
    """Names of the registered strategies, sorted."""
    return sorted(_REGISTRY)


def get_strategy(name: str) -> StrategyFn:
    """The strategy registered as `name`, or the function `name` points to as `package.module:function`."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return import_reference(name, f"token_selection_method {name!r}", callable, "function")
    raise ValueError(
        f"token_selection_method {name!r} is not a registered strategy; registered: "
        f"{', '.join(available_strategies())} (or give 'package.module:function')"
    )


def run_strategy(
    fn: StrategyFn, attention: torch.Tensor, config, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Call a strategy and normalise its result to `(scores[batch, n_image], head_index[batch] or None)`."""
    if "generator" in inspect.signature(fn).parameters:
        result = fn(attention, config, generator=generator)
    else:
        result = fn(attention, config)
    scores, head_index = result if isinstance(result, tuple) else (result, None)
    batch, _, n_image = attention.shape
    if scores.shape != (batch, n_image):
        raise ValueError(
            f"strategy {config.token_selection_method!r} returned scores of shape {tuple(scores.shape)}, "
            f"expected [batch, n_image] = {[batch, n_image]}"
        )
    return scores, head_index


def dominant_head(attention: torch.Tensor) -> torch.Tensor:
    """Per batch row, the head with the largest total attention to the image: LongTensor[batch]."""
    return attention.sum(dim=-1).argmax(dim=-1)


@register_strategy("avg_all_heads")
def avg_all_heads(attention: torch.Tensor, config) -> torch.Tensor:
    """Original FastV: mean over heads. [batch, heads, n_image] -> [batch, n_image]."""
    return attention.mean(dim=1)


@register_strategy("max_head")
def max_head(attention: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The row of the head h* = argmax_h sum_j A[h, j]. [batch, heads, n_image] -> [batch, n_image], [batch]."""
    head = dominant_head(attention)
    rows = torch.arange(attention.shape[0], device=attention.device)
    return attention[rows, head], head


@register_strategy("weighted_combination")
def weighted_combination(attention: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha * A[h*] + (1 - alpha) * mean of the other heads (alpha * A[h*] with a single head).

    [batch, heads, n_image] -> [batch, n_image], [batch]. alpha = 1/heads reproduces `avg_all_heads`.
    """
    alpha = config.weighted_alpha
    head = dominant_head(attention)
    rows = torch.arange(attention.shape[0], device=attention.device)
    best = attention[rows, head]
    num_heads = attention.shape[1]
    if num_heads == 1:
        return alpha * best, head
    others_mean = (attention.sum(dim=1) - best) / (num_heads - 1)
    return alpha * best + (1.0 - alpha) * others_mean, head


@register_strategy("random")
def random_tokens(attention: torch.Tensor, config, generator: torch.Generator | None = None) -> torch.Tensor:
    """Control: uniform random scores from the seeded generator. [batch, heads, n_image] -> [batch, n_image]."""
    batch, _, n_image = attention.shape
    return torch.rand(batch, n_image, generator=generator).to(attention.device)
