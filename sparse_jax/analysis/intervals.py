"""Confidence intervals of a mean score: Wilson's for 0/1 scores, the percentile bootstrap otherwise.

One owner for the resampling every analysis uses (the preservation test, the chance screen, the
findings' paired comparisons) and for the Wilson interval of an accuracy.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
"""Two-sided confidence of every interval the analyses report."""
NUM_BOOTSTRAP = 2000
"""Resamples of every bootstrap interval."""


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``(0, 1)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 1.0
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval always contains p; the clamps keep float rounding (3e-18 above 0 at p = 0) from moving it off.
    return min(max(centre - half, 0.0), p), max(min(centre + half, 1.0), p)


def resample_indices(n: int, num_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """``[num_bootstrap, n]`` sample indices, each row ``n`` draws with replacement: the one way every
    bootstrap here resamples."""
    return rng.integers(0, n, size=(num_bootstrap, n))


def resampled_means(values: np.ndarray, num_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """``[num_bootstrap]`` means of ``values [n]`` resampled with replacement."""
    return values[resample_indices(values.size, num_bootstrap, rng)].mean(axis=1)


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The two-sided ``confidence`` percentile interval of bootstrap ``samples [n]``."""
    tail = (1 - confidence) / 2
    return float(np.quantile(samples, tail)), float(np.quantile(samples, 1 - tail))


def bootstrap_interval(values: np.ndarray, confidence: float = CONFIDENCE, num_bootstrap: int = NUM_BOOTSTRAP,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values [n]`` (``(nan, nan)`` when empty)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return math.nan, math.nan
    return percentile_interval(resampled_means(values, num_bootstrap, np.random.default_rng(seed)), confidence)
