"""Intervals for results repeated over seeds: Student-t intervals of a mean and of a paired
difference, and percentile intervals of bootstrap samples.

The demo runs every method with a few seeds; a mean without its interval cannot tell a real
difference between methods from the spread of the seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from entroprl.errors import InputError


@dataclass(frozen=True)
class Interval:
    """An estimate and its two-sided `confidence` interval ``[low, high]``: for a t interval the
    mean of `n` values, for a bootstrap the estimate from all the data and `n` resamples."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float) -> bool:
        """Whether `value` lies outside the interval (a null the data rule out)."""
        return not self.low <= value <= self.high

    def to_dict(self) -> dict[str, float | int]:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "half_width": self.half_width,
            "n": self.n,
            "confidence": self.confidence,
        }


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")


def t_interval(values, confidence: float = 0.95) -> Interval:
    """Mean of `values` and its Student-t interval ``mean ± t_{(1+c)/2, n-1} * sd / sqrt(n)``.

    `sd` is the sample standard deviation (n - 1 in the denominator). Raises ValueError on fewer
    than 2 values (no spread to estimate), NaN or inf, or `confidence` outside (0, 1).
    """
    _check_confidence(confidence)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise InputError(f"an interval needs at least 2 values in a 1-D sequence, got {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("values must be finite")
    mean = float(x.mean())
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1)) * float(x.std(ddof=1))
    half /= math.sqrt(x.size)
    return Interval(
        estimate=mean, low=mean - half, high=mean + half, n=x.size, confidence=confidence
    )


def paired_interval(values, baseline, confidence: float = 0.95) -> Interval:
    """The t interval of the per-pair differences ``values[i] - baseline[i]``.

    Pairs share a seed, so what the seed does to both cancels in the difference, and the interval
    is narrower than the two means' intervals side by side. Raises ValueError on sequences of
    different lengths, and as `t_interval` does.
    """
    a, b = np.asarray(values, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape:
        raise InputError(f"paired values need one length each, got {a.shape} and {b.shape}")
    return t_interval(a - b, confidence)


def percentile_interval(samples, estimate: float, confidence: float = 0.95) -> Interval:
    """The percentile interval of bootstrap `samples` around the `estimate` from all the data.

    ``low`` and ``high`` are the ``(1 - c)/2`` and ``(1 + c)/2`` quantiles of the samples; `n`
    counts the samples. Raises ValueError on no finite sample or `confidence` outside (0, 1).
    """
    _check_confidence(confidence)
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise InputError("no finite bootstrap sample")
    low, high = np.quantile(s, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(
        estimate=float(estimate), low=float(low), high=float(high), n=s.size, confidence=confidence
    )


@dataclass(frozen=True, eq=False)
class Band:
    """Per point, the mean of `n` values and the two-sided `confidence` t interval of that mean."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: int
    confidence: float


def t_band(values, confidence: float = 0.95) -> Band:
    """`t_interval` of every column of a (runs, points) array at once: ``mean ± t_{(1+c)/2, n-1}
    * sd / sqrt(n)`` with the sample sd of each column. Raises ValueError on fewer than 2 rows, NaN
    or inf, or `confidence` outside (0, 1)."""
    _check_confidence(confidence)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"a band needs a (runs >= 2, points) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("values must be finite")
    mean = x.mean(axis=0)
    half = float(stats.t.ppf((1 + confidence) / 2, x.shape[0] - 1)) * x.std(axis=0, ddof=1)
    half /= math.sqrt(x.shape[0])
    return Band(mean=mean, low=mean - half, high=mean + half, n=x.shape[0], confidence=confidence)
