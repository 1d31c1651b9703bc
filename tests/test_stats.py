"""Intervals over seeds (issue 15), checked against scipy's t-tests and hand calculations, never
against the functions under test."""

import math

import numpy as np
import pytest
from scipy import stats

from entroprl.analysis.stats import paired_interval, percentile_interval, t_band, t_interval


def test_t_interval_hand_example():
    # mean 2, sd 1, t_{0.975, 2} = 4.302652729749464 (printed tables), half = t / sqrt(3)
    ci = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729749464 / math.sqrt(3)
    assert ci.estimate == 2.0
    assert ci.low == pytest.approx(2 - half, rel=1e-12)
    assert ci.high == pytest.approx(2 + half, rel=1e-12)
    assert ci.half_width == pytest.approx(half, rel=1e-12)
    assert ci.n == 3 and ci.confidence == 0.95
    assert ci.excludes(-0.5) and not ci.excludes(0.0)


@pytest.mark.parametrize("n", [2, 3, 5, 12])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_t_interval_matches_scipy_one_sample_test(n, confidence):
    x = np.random.default_rng(n).normal(0.3, 0.1, n)
    low, high = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    ci = t_interval(x, confidence)
    assert (ci.low, ci.high) == pytest.approx((low, high), rel=1e-10)


def test_paired_interval_matches_scipy_related_test():
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 1.0, 4)  # large, shared by both members of a pair
    base = 0.2 + seed_effect
    other = base + 0.05 + rng.normal(0, 0.01, 4)
    low, high = stats.ttest_rel(other, base).confidence_interval(0.95)
    ci = paired_interval(other, base)
    assert (ci.low, ci.high) == pytest.approx((low, high), rel=1e-10)
    # pairing removes the seed effect: the difference is resolved, the means' intervals overlap
    assert ci.excludes(0.0)
    assert t_interval(other).low < t_interval(base).high


def test_percentile_interval_is_numpy_quantiles_ignoring_nan():
    samples = np.concatenate([np.arange(1000.0), [np.nan]])
    ci = percentile_interval(samples, 500.0, 0.9)
    assert (ci.low, ci.high) == pytest.approx((0.05 * 999, 0.95 * 999), rel=1e-12)
    assert ci.estimate == 500.0 and ci.n == 1000


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: t_interval([1.0]), "at least 2 values"),
        (lambda: t_interval([1.0, float("nan")]), "finite"),
        (lambda: t_interval([1.0, 2.0], 1.0), "confidence"),
        (lambda: paired_interval([1.0, 2.0], [1.0]), "one length"),
        (lambda: percentile_interval([np.nan], 0.0), "no finite"),
    ],
)
def test_bad_inputs_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_t_band_is_the_scipy_interval_of_every_column():
    x = np.random.default_rng(4).normal(size=(3, 7))
    band = t_band(x, 0.9)
    for j in range(7):
        low, high = stats.ttest_1samp(x[:, j], 0.0).confidence_interval(0.9)
        assert band.mean[j] == pytest.approx(x[:, j].mean(), abs=1e-12)
        assert (band.low[j], band.high[j]) == (pytest.approx(low), pytest.approx(high))
    assert band.n == 3
    with pytest.raises(ValueError, match="runs >= 2"):
        t_band(x[:1])
    with pytest.raises(ValueError, match="finite"):
        t_band(np.array([[1.0, np.nan], [2.0, 3.0]]))
