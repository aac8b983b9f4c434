"""Paired statistics against values computed by hand."""

import numpy as np
import pytest

from fastv_advanced.statistics import bootstrap_delta_interval, mcnemar_exact


def test_mcnemar_by_hand():
    # 3 questions only the baseline gets right, 1 only the variant: p = 2 * (C(4,0) + C(4,1)) / 2^4 = 10/16
    baseline = [True, True, True, False, True, False]
    variant = [False, False, False, True, True, False]
    result = mcnemar_exact(baseline, variant)
    assert (result["b"], result["c"]) == (3, 1)
    assert result["p_value"] == pytest.approx(0.625)


def test_mcnemar_strong_difference_and_no_discordance():
    assert mcnemar_exact([True] * 10, [False] * 10)["p_value"] == pytest.approx(2 / 2**10)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0


def test_mcnemar_rejects_unpaired():
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar_exact([True], [True, False])


def test_bootstrap_interval_contains_the_difference_and_narrows_with_n():
    rng = np.random.default_rng(1)
    base = rng.random(400) < 0.7
    variant = base.copy()
    variant[:40] = ~variant[:40]
    delta = variant.mean() - base.mean()
    low, high = bootstrap_delta_interval(base.tolist(), variant.tolist(), seed=0)
    assert low <= delta <= high
    small_low, small_high = bootstrap_delta_interval(base[:50].tolist(), variant[:50].tolist(), seed=0)
    assert (high - low) < (small_high - small_low)
    assert bootstrap_delta_interval(base.tolist(), base.tolist()) == (0.0, 0.0)
