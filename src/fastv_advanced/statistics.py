"""Paired significance of an accuracy difference between two runs on the same questions."""

from __future__ import annotations

from math import comb

import numpy as np


def mcnemar_exact(baseline_correct: list[bool], variant_correct: list[bool]) -> dict:
    """Exact two-sided McNemar test on paired per-question correctness.

    b = questions only the baseline gets right, c = questions only the variant gets right; under the null each
    discordant pair is a fair coin, so p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)]).
    """
    if len(baseline_correct) != len(variant_correct):
        raise ValueError(f"paired test needs equal lengths, got {len(baseline_correct)} and {len(variant_correct)}")
    b = sum(1 for x, y in zip(baseline_correct, variant_correct) if x and not y)
    c = sum(1 for x, y in zip(baseline_correct, variant_correct) if y and not x)
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p_value": 1.0}
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return {"b": b, "c": c, "p_value": min(1.0, 2 * tail)}


def bootstrap_delta_interval(
    baseline_correct: list[bool], variant_correct: list[bool], resamples: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy(variant) - accuracy(baseline), resampling questions in pairs."""
    base = np.asarray(baseline_correct, dtype=float)
    variant = np.asarray(variant_correct, dtype=float)
    if base.shape != variant.shape or base.size == 0:
        raise ValueError(f"paired bootstrap needs two equal, non-empty lists, got {base.size} and {variant.size}")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, base.size, size=(resamples, base.size))
    deltas = (variant[index] - base[index]).mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return float(low), float(high)
