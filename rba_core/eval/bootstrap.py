"""Bootstrap confidence intervals over evaluation items (numpy, seeded).

Every headline number of ``rba eval`` is a (weighted) mean over items: a share of answers, a
mean score, or a ratio such as IFEval's instruction-level accuracy (instructions followed /
instructions given, i.e. the per-prompt share weighted by the prompt's instruction count).
Items are resampled with replacement; the interval is the percentile interval of the
resampled statistic. Two systems answered the same items, so their difference is bootstrapped
*paired*: each resample draws one set of item indices and applies it to both systems, which
cancels the item-to-item variance they share (an easy question is easy for both).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rba_core.errors import ConfigError

RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """The statistic on the items as given (``estimate``) and its bootstrap interval."""

    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


def _arrays(values: Sequence[float], weights: Sequence[float] | None
            ) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(values, dtype=np.float64)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or w.shape != x.shape:
        raise ConfigError(f"bootstrap: need a non-empty 1-D list of values and one weight per "
                          f"value, got shapes {x.shape} and {w.shape}")
    if not np.isfinite(x).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError("bootstrap: values must be finite and weights >= 0 with a positive sum")
    return x, w


def resample_indices(n: int, *, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[resamples, n]`` item indices drawn with replacement from one seeded generator."""
    if n < 1 or resamples < 1:
        raise ConfigError(f"bootstrap: need n >= 1 items and resamples >= 1, got {n}, {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def weighted_means(values: Sequence[float], weights: Sequence[float] | None,
                   indices: np.ndarray) -> np.ndarray:
    """sum(w x) / sum(w) over each row of ``indices`` (a resample that drew only zero-weight
    items has no defined ratio; it scores the full-sample statistic, which keeps the interval
    honest for the rare prompt without instructions)."""
    x, w = _arrays(values, weights)
    num = (x * w)[indices].sum(axis=1)
    den = w[indices].sum(axis=1)
    full = float((x * w).sum() / w.sum())
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), full)


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ConfigError(f"bootstrap: level must be in (0, 1), got {level!r}")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: Sequence[float], weights: Sequence[float] | None = None, *,
                  resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """The weighted mean of ``values`` and its percentile bootstrap interval."""
    x, w = _arrays(values, weights)
    indices = resample_indices(x.size, resamples=resamples, seed=seed)
    low, high = _percentiles(weighted_means(x, w, indices), level)
    return Interval(float((x * w).sum() / w.sum()), low, high)


def paired_difference(a: Sequence[float], b: Sequence[float],
                      weights: Sequence[float] | None = None, *, resamples: int = RESAMPLES,
                      seed: int = 0, level: float = LEVEL) -> Interval:
    """mean(a) - mean(b) for two systems scored on the same items (item i of ``a`` and of
    ``b`` is the same prompt), with the paired bootstrap interval of that difference."""
    xa, w = _arrays(a, weights)
    xb, _ = _arrays(b, weights)
    if xa.shape != xb.shape:
        raise ConfigError(f"paired bootstrap: the systems scored {xa.size} and {xb.size} items; "
                          "a paired comparison needs the same items for both")
    indices = resample_indices(xa.size, resamples=resamples, seed=seed)
    diffs = weighted_means(xa, w, indices) - weighted_means(xb, w, indices)
    low, high = _percentiles(diffs, level)
    return Interval(float(((xa - xb) * w).sum() / w.sum()), low, high)
