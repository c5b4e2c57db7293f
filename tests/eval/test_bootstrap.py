"""The bootstrap behind every interval of rba eval: a hand-computed case, the paired difference
(shared item variance cancels), ratio metrics by weights, and coverage on synthetic data."""
from __future__ import annotations

import numpy as np
import pytest

from rba_core.errors import ConfigError
from rba_core.eval.bootstrap import (
    mean_interval, paired_difference, resample_indices, weighted_means,
)


def test_weighted_means_by_hand():
    values, weights = [1.0, 2.0, 4.0], [1.0, 1.0, 2.0]
    indices = np.array([[0, 0, 1], [1, 2, 2], [2, 2, 2]])
    # Row 1: (1+1+2)/3; row 2: (2 + 4*2 + 4*2)/(1+2+2) = 18/5; row 3: 4.
    np.testing.assert_allclose(weighted_means(values, weights, indices), [4 / 3, 18 / 5, 4.0])
    np.testing.assert_allclose(weighted_means(values, None, indices), [4 / 3, 10 / 3, 4.0])


def test_interval_by_hand_on_two_items():
    # Resamples of [0, 1] have means 0, 1/2 or 1 (probabilities 1/4, 1/2, 1/4): with 4000
    # resamples the 2.5% and 97.5% percentiles are 0 and 1, and the estimate is 1/2.
    interval = mean_interval([0.0, 1.0], resamples=4000, seed=3)
    assert (interval.estimate, interval.low, interval.high) == (0.5, 0.0, 1.0)
    assert mean_interval([2.0, 2.0, 2.0]).to_dict() == {"estimate": 2.0, "low": 2.0, "high": 2.0}


def test_seeded_and_reproducible():
    first, again = (resample_indices(5, resamples=7, seed=1) for _ in range(2))
    assert (first == again).all()
    values = np.random.default_rng(0).normal(size=30)
    assert mean_interval(values, seed=4) == mean_interval(values, seed=4)


def test_paired_difference_cancels_shared_item_variance():
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0, 5, size=40)          # shared by both systems: large
    a = difficulty + 0.3
    b = difficulty.copy()
    paired = paired_difference(a, b)
    assert paired.estimate == pytest.approx(0.3)
    assert paired.low == pytest.approx(0.3) and paired.high == pytest.approx(0.3)
    assert paired.excludes_zero()
    # Unpaired intervals of the two means overlap widely: pairing is what resolves it.
    assert mean_interval(a).low < mean_interval(b).high
    with pytest.raises(ConfigError, match="same items"):
        paired_difference(a, b[:-1])


def test_coverage_on_synthetic_data():
    rng = np.random.default_rng(2)
    trials, hits, paired_hits = 200, 0, 0
    for trial in range(trials):
        x = rng.exponential(1.0, size=60)            # skewed, true mean 1
        hits += mean_interval(x, resamples=500, seed=trial).low <= 1.0 \
            <= mean_interval(x, resamples=500, seed=trial).high
        y = x + rng.normal(0.2, 0.5, size=60)        # true mean difference 0.2
        d = paired_difference(y, x, resamples=500, seed=trial)
        paired_hits += d.low <= 0.2 <= d.high
    # Percentile intervals run a little short on n = 60; 95% nominal.
    assert 0.87 <= hits / trials <= 0.99
    assert 0.87 <= paired_hits / trials <= 0.99


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError):
        mean_interval([])
    with pytest.raises(ConfigError):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ConfigError):
        mean_interval([1.0, 2.0], [0.0, 0.0])
    with pytest.raises(ConfigError):
        mean_interval([1.0, 2.0], level=1.5)
