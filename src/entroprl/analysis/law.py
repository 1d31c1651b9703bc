"""The entropy-performance law, its forecast, and the training stages of an entropy curve
(algorithms.md §9).

Inputs are per-step series given as array-likes: position i is the i-th logged step, and every
index returned (``steps_rest``, ``plateau_start``) is a position in those arrays. The work is numpy
float64: these functions analyse a training log, they are not part of the training graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from entroprl.analysis.stats import Interval, percentile_interval
from entroprl.errors import InputError

_MAX_EXP = math.log(np.finfo(np.float64).max)


def _series(name: str, values) -> np.ndarray:
    """`values` as a 1-D float64 array; NaN is allowed (a missing value), inf is not."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise InputError(f"{name} must be a 1-D sequence of per-step values, got shape {arr.shape}")
    inf = np.flatnonzero(np.isinf(arr))
    if inf.size:
        raise InputError(f"{name} contains inf (first at index {int(inf[0])})")
    return arr


def _paired(entropy, performance) -> tuple[np.ndarray, np.ndarray]:
    h, r = _series("entropy", entropy), _series("performance", performance)
    if h.shape != r.shape:
        raise InputError(
            f"entropy has {h.size} values and performance {r.size}: they must be paired per step"
        )
    return h, r


def _json_floats(values: np.ndarray) -> list[float | None]:
    """Plain floats for JSON, with None where the value is NaN (strict JSON has no NaN)."""
    return [None if math.isnan(v) else float(v) for v in values.tolist()]


@dataclass(frozen=True)
class LawFit:
    """A fit of ``R = -a*exp(H) + b`` (algorithms.md §9); ``ceiling = b - a`` is the predicted R at
    H = 0."""

    a: float
    b: float
    r2: float
    rmse: float
    n: int
    ceiling: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ceiling", self.b - self.a)

    def predict(self, entropy) -> np.ndarray:
        """``-a*exp(H) + b`` elementwise (NaN entropy gives NaN)."""
        return np.asarray(-self.a * np.exp(np.asarray(entropy, dtype=np.float64)) + self.b)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "a": float(self.a),
            "b": float(self.b),
            "r2": float(self.r2),
            "rmse": float(self.rmse),
            "ceiling": float(self.ceiling),
            "n": int(self.n),
        }


def _fit(h: np.ndarray, r: np.ndarray) -> LawFit:
    """Closed-form least squares of r on x = exp(h); the points are already free of NaN."""
    n = h.size
    if n < 2:
        raise InputError(
            f"the law needs at least 2 points with both entropy and performance present, got {n}"
        )
    if h.max() > _MAX_EXP:
        raise InputError(f"exp(entropy) overflows: entropy must be in nats (below {_MAX_EXP:.0f})")
    x = np.exp(h)
    if np.ptp(x) == 0:
        raise InputError(
            "entropy is constant over the usable points: the law's slope a is undetermined"
        )
    dx = x - x.mean()
    # Shifting by the first value makes a constant performance exactly zero here, so that case
    # fits with a = 0, zero residuals and r2 = 1 instead of rounding noise.
    y = r - r[0]
    dy = y - y.mean()
    slope = float(dx @ dy) / float(dx @ dx)
    resid = dy - slope * dx
    ss_res = float(resid @ resid)
    ss_tot = float(dy @ dy)
    r2 = 1.0 if ss_tot == 0 else 1.0 - ss_res / ss_tot
    b = float(r[0]) + float(y.mean()) - slope * float(x.mean())
    return LawFit(a=-slope, b=b, r2=r2, rmse=math.sqrt(ss_res / n), n=n)


def fit_law(entropy, performance) -> LawFit:
    """Fit the entropy-performance law ``R = -a*exp(H) + b`` by ordinary least squares
    (algorithms.md §9).

    With ``x = exp(H)`` the law is linear, so with means over the n usable points

        a = -sum((x - mean(x)) * (R - mean(R))) / sum((x - mean(x))^2),  b = mean(R) + a*mean(x)
        RMSE = sqrt(mean(res^2)),  R^2 = 1 - sum(res^2) / sum((R - mean(R))^2),
        res = R - (-a*x + b),  ceiling = b - a  (the predicted R at H = 0).

    `entropy` is the batch policy entropy of algorithms.md §1 in nats, `performance` the validation
    accuracy on a 0-1 scale, paired per step. Pairs where either value is NaN are dropped (accuracy
    is usually evaluated only every few steps); `n` counts the pairs used. When the usable
    performance is constant, the fit is exact (a = 0, b = that value, RMSE = 0) and R^2 is defined
    as 1.

    Raises ValueError on inf, on inputs of different lengths or not 1-D, on fewer than 2 usable
    pairs, and on an entropy that is constant over the usable pairs (a is then undetermined).
    """
    h, r = _paired(entropy, performance)
    usable = ~(np.isnan(h) | np.isnan(r))
    return _fit(h[usable], r[usable])


@dataclass(frozen=True, eq=False)
class Forecast:
    """A law fitted on the first `n_fit` steps, and its predictions for the later usable steps."""

    fit: LawFit
    n_fit: int
    steps_rest: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    rmse: float
    final_error: float

    def to_dict(self) -> dict:
        return {
            "fit": self.fit.to_dict(),
            "n_fit": int(self.n_fit),
            "steps_rest": [int(s) for s in self.steps_rest.tolist()],
            "predicted": _json_floats(self.predicted),
            "actual": _json_floats(self.actual),
            "rmse": float(self.rmse),
            "final_error": float(self.final_error),
        }


def _forecast_split(
    h: np.ndarray, r: np.ndarray, fit_fraction: float, min_points: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """`n_fit`, and the positions of the usable pairs in the fit part and after it (`forecast`)."""
    if not 0 < fit_fraction < 1:
        raise InputError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    if min_points < 2:
        raise InputError(f"min_points must be at least 2 (a line needs 2 points), got {min_points}")
    steps = h.size
    # The tolerance keeps products such as 0.55 * 100 = 55.00000000000001 from rounding up a step.
    n_fit = math.ceil(fit_fraction * steps - 1e-9)
    usable = ~(np.isnan(h) | np.isnan(r))
    head = np.flatnonzero(usable[:n_fit])
    if head.size < min_points:
        raise InputError(
            f"the first {n_fit} of {steps} steps (fit_fraction={fit_fraction}) hold {head.size} "
            f"usable points (entropy and performance both present); min_points={min_points} are "
            "needed"
        )
    rest = np.flatnonzero(usable[n_fit:]) + n_fit
    if rest.size == 0:
        raise InputError(f"no usable point after the first {n_fit} steps: nothing to forecast")
    return n_fit, head, rest


def forecast(entropy, performance, *, fit_fraction: float = 0.15, min_points: int = 3) -> Forecast:
    """Fit the law on the start of a run and predict the performance of the rest (algorithms.md §9).

    The fit part is the first ``n_fit = ceil(fit_fraction * T)`` steps of the T-step run (counting
    every step, evaluated or not: 0.15 of the paper's 236 steps gives its 36), and the law is fitted
    on the usable pairs (both values not NaN) inside it, of which there must be at least
    `min_points`. For every usable step i >= n_fit (`steps_rest`), ``predicted = -a*exp(H_i) + b``
    and ``actual = R_i``; ``rmse = sqrt(mean((predicted - actual)^2))`` over them and
    ``final_error = predicted - actual`` at the last of them, on the scale of `performance` (x100
    for the paper's points).

    Raises ValueError when `fit_fraction` is not in (0, 1), `min_points` < 2, the fit part holds
    fewer than `min_points` usable pairs, no usable pair follows it, or as `fit_law` does.
    """
    h, r = _paired(entropy, performance)
    n_fit, head, rest = _forecast_split(h, r, fit_fraction, min_points)
    fit = _fit(h[head], r[head])
    predicted = fit.predict(h[rest])
    actual = r[rest]
    err = predicted - actual
    return Forecast(
        fit=fit,
        n_fit=n_fit,
        steps_rest=rest,
        predicted=predicted,
        actual=actual,
        rmse=math.sqrt(float(np.mean(err**2))),
        final_error=float(err[-1]),
    )


def _fit_rows(h: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_fit`'s a and b for every row of two (rows, n) arrays at once; NaN for a row whose entropy
    is constant (a resample that drew one point only)."""
    x = np.exp(h)
    dx = x - x.mean(axis=1, keepdims=True)
    dy = r - r.mean(axis=1, keepdims=True)
    # The spread, not sum(dx^2) == 0, finds constant rows: the mean of equal values can round.
    flat = np.ptp(x, axis=1) == 0
    sxx = np.where(flat, 1.0, (dx * dx).sum(axis=1))
    a = np.where(flat, np.nan, -(dx * dy).sum(axis=1) / sxx)
    return a, r.mean(axis=1) + a * x.mean(axis=1)


def _resample_fits(
    h: np.ndarray, r: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if resamples < 1:
        raise InputError(f"resamples must be at least 1, got {resamples}")
    idx = rng.integers(0, h.size, size=(resamples, h.size))
    return _fit_rows(h[idx], r[idx])


def _usable_pairs(runs) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = [_paired(h, r) for h, r in runs]
    if not pairs:
        raise InputError("the law needs at least one run")
    return pairs


@dataclass(frozen=True, eq=False)
class LawIntervals:
    """The law fitted on the points of one or more runs pooled, with bootstrap intervals.

    `a`, `b` and `ceiling` are percentile intervals over `resamples` fits to the pooled points
    drawn with replacement; `a_samples` and `b_samples` are those fits (NaN where a resample's
    entropy was constant), for bands (`band`). `entropy_low` and `entropy_high` bound the entropy
    of the points fitted."""

    fit: LawFit
    runs: int
    a: Interval
    b: Interval
    ceiling: Interval
    a_samples: np.ndarray
    b_samples: np.ndarray
    entropy_low: float
    entropy_high: float

    def band(self, entropy, confidence: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise percentile band of the bootstrap laws' predictions at each `entropy`."""
        c = self.a.confidence if confidence is None else confidence
        keep = ~np.isnan(self.a_samples)
        h = np.asarray(entropy, dtype=np.float64)
        pred = -self.a_samples[keep, None] * np.exp(h)[None, :] + self.b_samples[keep, None]
        low, high = np.quantile(pred, [(1 - c) / 2, (1 + c) / 2], axis=0)
        return low, high

    def to_dict(self) -> dict:
        return {
            **self.fit.to_dict(),
            "runs": self.runs,
            "resamples": int(self.a_samples.size),
            "interval": {k: getattr(self, k).to_dict() for k in ("a", "b", "ceiling")},
            "entropy_range": [self.entropy_low, self.entropy_high],
        }


def _intervals(
    h: np.ndarray, r: np.ndarray, runs: int, resamples: int, confidence: float, seed: int
) -> LawIntervals:
    """`LawIntervals` of the usable points (h, r), already free of NaN."""
    fit = _fit(h, r)
    a, b = _resample_fits(h, r, resamples, np.random.default_rng(seed))
    return LawIntervals(
        fit=fit,
        runs=runs,
        a=percentile_interval(a, fit.a, confidence),
        b=percentile_interval(b, fit.b, confidence),
        ceiling=percentile_interval(b - a, fit.ceiling, confidence),
        a_samples=a,
        b_samples=b,
        entropy_low=float(h.min()),
        entropy_high=float(h.max()),
    )


def law_intervals(
    runs, *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> LawIntervals:
    """`fit_law` on the usable pairs of all `runs` together, with bootstrap intervals over points.

    `runs` is a sequence of (entropy, performance) pairs of per-step arrays, one per run (seeds of
    one method); pairs with a NaN are dropped as in `fit_law`. Each of `resamples` fits draws as
    many pooled points as there are, with replacement (a generator seeded by `seed`); the interval
    of a, b and ceiling = b - a is the (1 - c)/2 and (1 + c)/2 quantile of those fits. Points of
    one run are treated as independent, which a smoothed performance series is not: there the
    intervals are too narrow.

    Raises ValueError on no runs, `resamples` < 1, `confidence` outside (0, 1), and as `fit_law`
    does on the pooled points.
    """
    pairs = _usable_pairs(runs)
    h = np.concatenate([h for h, _ in pairs])
    r = np.concatenate([r for _, r in pairs])
    usable = ~(np.isnan(h) | np.isnan(r))
    return _intervals(h[usable], r[usable], len(pairs), resamples, confidence, seed)


@dataclass(frozen=True, eq=False)
class ForecastInterval:
    """The law fitted on the pooled fit parts of runs (with its bootstrap), and the forecast's
    final error with its interval."""

    law: LawIntervals
    error: Interval


def forecast_error_interval(
    runs,
    *,
    fit_fraction: float = 0.15,
    min_points: int = 3,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ForecastInterval:
    """The forecast of `forecast` pooled over runs: the law fitted on the fit parts (the first
    `fit_fraction` of each run's steps) of all `runs` together, and its error at each run's last
    usable step, ``mean over runs of (predicted - actual)``, with a bootstrap interval over the
    pooled fit-part points (so it carries the fit's uncertainty, not the last points' noise).

    `law` of the result is `law_intervals` of the pooled fit-part points, from the same resamples.
    Raises ValueError as `forecast` does for any run, and as `law_intervals` does.
    """
    pairs = _usable_pairs(runs)
    heads, ends = [], []
    for h, r in pairs:
        _, head, rest = _forecast_split(h, r, fit_fraction, min_points)
        heads.append((h[head], r[head]))
        ends.append((h[rest[-1]], r[rest[-1]]))
    hh = np.concatenate([h for h, _ in heads])
    rr = np.concatenate([r for _, r in heads])
    end_h, end_r = np.array(ends).T
    law = _intervals(hh, rr, len(pairs), resamples, confidence, seed)
    a, b = law.a_samples, law.b_samples
    errors = (-a[:, None] * np.exp(end_h)[None, :] + b[:, None] - end_r[None, :]).mean(axis=1)
    estimate = float(np.mean(law.fit.predict(end_h) - end_r))
    return ForecastInterval(law=law, error=percentile_interval(errors, estimate, confidence))


MIN_POINTS = 8
"""Fewest points (both entropy and performance present) for the law or a forecast to be taken as
describing a run (algorithms.md §9.5)."""
MIN_ENTROPY_RANGE = 0.1
"""Least span, in nats, of the entropy over the points fitted (algorithms.md §9.5)."""


@dataclass(frozen=True)
class LawCriteria:
    """When a fit of the law is taken to describe a run (algorithms.md §9.5)."""

    min_points: int = MIN_POINTS
    min_entropy_range: float = MIN_ENTROPY_RANGE

    def __post_init__(self) -> None:
        if isinstance(self.min_points, bool) or not isinstance(self.min_points, int):
            raise InputError(f"min_points must be an integer, got {self.min_points!r}")
        if self.min_points < 4:
            raise InputError(
                f"min_points must be at least 4 (on 3 points the bootstrap interval is "
                f"unreliable), got {self.min_points}"
            )
        if not (math.isfinite(self.min_entropy_range) and self.min_entropy_range >= 0):
            raise InputError(
                f"min_entropy_range must be a finite number >= 0 (nats), got "
                f"{self.min_entropy_range!r}"
            )


@dataclass(frozen=True)
class Verdict:
    """Whether a fit of the law describes its points, and in words why not (`judge_law`)."""

    valid: bool
    reasons: tuple[str, ...]
    n: int
    entropy_range: float
    a: Interval
    r2: float
    criteria: LawCriteria

    def summary(self) -> str:
        """The numbers the verdict rests on, in one line."""
        return (
            f"a = {self.a.estimate:.3g}, {self.a.confidence:.0%} interval [{self.a.low:.3g}, "
            f"{self.a.high:.3g}]; {self.n} points (at least {self.criteria.min_points}); "
            f"entropy range {self.entropy_range:.3g} nats (at least "
            f"{self.criteria.min_entropy_range:g}); R² {self.r2:.2f}"
        )

    def to_dict(self) -> dict:
        return {
            "valid": self.valid,
            "reasons": list(self.reasons),
            "checks": {
                "n": self.n,
                "min_points": self.criteria.min_points,
                "entropy_span": self.entropy_range,
                "min_entropy_range": self.criteria.min_entropy_range,
                "a_interval": [self.a.low, self.a.high],
                "r2": self.r2,
            },
        }


def judge_law(law: LawIntervals, criteria: LawCriteria | None = None) -> Verdict:
    """Whether the fit `law` describes its points (algorithms.md §9.5): all of

        n >= criteria.min_points                      enough points
        max(H) - min(H) >= criteria.min_entropy_range  the entropy moved (nats)
        a > 0                                         accuracy falls as entropy rises
        low end of a's bootstrap interval > 0         ... beyond the points' noise

    Each failed condition gives a reason in words; R² is reported, not judged.
    """
    criteria = criteria or LawCriteria()
    fit, a = law.fit, law.a
    spread = law.entropy_high - law.entropy_low
    reasons = []
    if fit.n < criteria.min_points:
        reasons.append(
            f"too few points: {fit.n} with both entropy and accuracy, at least "
            f"{criteria.min_points} are needed"
        )
    if spread < criteria.min_entropy_range:
        reasons.append(
            f"no entropy range: the entropy spans {spread:.3g} nats ({law.entropy_low:.3g} to "
            f"{law.entropy_high:.3g}) over the points, under the {criteria.min_entropy_range:g} "
            "needed to tell accuracy as a function of it"
        )
    if fit.a <= 0:
        reasons.append(
            f"wrong sign: a = {fit.a:.3g}, accuracy does not fall as entropy rises (the law has "
            "a > 0)"
        )
    if a.low <= 0 <= a.high:
        reasons.append(
            f"flat noise: the {a.confidence:.0%} interval of a, [{a.low:.3g}, {a.high:.3g}], "
            f"holds 0: accuracy does not change with entropy beyond its noise (R² {fit.r2:.2f})"
        )
    return Verdict(
        valid=not reasons,
        reasons=tuple(reasons),
        n=fit.n,
        entropy_range=spread,
        a=a,
        r2=fit.r2,
        criteria=criteria,
    )


@dataclass(frozen=True, eq=False)
class StageSplit:
    """Where the rising stage of an entropy curve ends; `smoothed` and `slope` are per step."""

    plateau_start: int | None
    smoothed: np.ndarray
    slope: np.ndarray
    criterion: str

    def to_dict(self) -> dict:
        return {
            "plateau_start": None if self.plateau_start is None else int(self.plateau_start),
            "smoothed": _json_floats(self.smoothed),
            "slope": _json_floats(self.slope),
            "criterion": self.criterion,
        }


def _check_window(name: str, value: int, least: int) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < least or value % 2 == 0:
        raise InputError(f"{name} must be an odd integer >= {least} (centered window), got {value}")


def centered_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average whose half-width shrinks symmetrically near the ends."""
    n = y.size
    i = np.arange(n)
    k = np.minimum(window // 2, np.minimum(i, n - 1 - i))
    cs = np.concatenate([[0.0], np.cumsum(y)])
    return (cs[i + k + 1] - cs[i - k]) / (2 * k + 1)


def _windowed_slope(y: np.ndarray, window: int) -> np.ndarray:
    """Least-squares slope over `window` steps centered on each step, shifted inward at the ends."""
    n = y.size
    half = window // 2
    t = np.arange(window, dtype=np.float64) - half
    slopes = sliding_window_view(y, window) @ t / float(t @ t)
    return slopes[np.clip(np.arange(n) - half, 0, n - window)]


def detect_stages(
    entropy, *, smooth_window: int = 5, slope_window: int = 5, fraction: float = 0.1
) -> StageSplit:
    """Find where the rising stage of an entropy curve ends and its plateau starts (algorithms.md
    §9.3).

    1. Missing values: NaN inside the curve is filled by linear interpolation in the step index;
       NaN before the first or after the last value is left out (`smoothed` and `slope` are NaN
       there and the plateau cannot start there).
    2. Smoothing: ``S_i = mean(H_{i-k..i+k})`` with ``k = min(smooth_window // 2, i, n - 1 - i)``,
       a centered moving average whose window shrinks symmetrically at the ends (so a linear curve
       stays exactly linear and the ends are not pulled toward the inside).
    3. Slope: ``D_i`` is the least-squares slope (entropy per step) of S over the `slope_window`
       steps centered on i; within half a window of either end, the first or last full window.
    4. Criterion: with ``thr = fraction * max_i |D_i|`` and p the first step where |D| is largest,
       the plateau starts at the first step s >= p such that ``|D_j| <= thr`` for the whole window
       of `slope_window` steps j = s .. s + slope_window - 1 (the window must fit in the curve).
       Starting at the steepest step keeps a flat warm-up before the drop from counting as the
       plateau. A flat curve (max |D| = 0) is a plateau from its first step; a curve whose slope
       never falls to ``thr`` for a whole window gives ``plateau_start = None``.

    `criterion` states these parameters and the threshold in one line, for reports.

    Raises ValueError on inf, an all-NaN curve, a curve (between its first and last value) shorter
    than ``max(smooth_window, slope_window)``, an even or too small window (smooth_window >= 1,
    slope_window >= 3, both odd), or `fraction` outside (0, 1).
    """
    h = _series("entropy", entropy)
    _check_window("smooth_window", smooth_window, 1)
    _check_window("slope_window", slope_window, 3)
    if not 0 < fraction < 1:
        raise InputError(f"fraction must be in (0, 1), got {fraction}")
    present = np.flatnonzero(~np.isnan(h))
    if present.size == 0:
        raise InputError("entropy holds no value (all NaN)")
    lo, hi = int(present[0]), int(present[-1]) + 1
    need = max(smooth_window, slope_window)
    if hi - lo < need:
        raise InputError(
            f"entropy curve has {hi - lo} steps, fewer than max(smooth_window, slope_window) = "
            f"{need}: too short to find stages"
        )
    core = h[lo:hi]
    steps = np.arange(core.size)
    gaps = np.isnan(core)
    core = np.where(gaps, np.interp(steps, steps[~gaps], core[~gaps]), core)
    # Centering on the first value makes a constant curve exactly zero, so its slopes are exactly
    # zero rather than rounding noise that the relative threshold would then amplify.
    base = core[0]
    smooth = centered_mean(core - base, smooth_window)
    slope = _windowed_slope(smooth, slope_window)
    magnitude = np.abs(slope)
    peak = int(np.argmax(magnitude))
    threshold = fraction * float(magnitude[peak])
    calm_windows = sliding_window_view(magnitude <= threshold, slope_window).all(axis=1)
    starts = np.flatnonzero(calm_windows[peak:])
    plateau_start = None if starts.size == 0 else lo + peak + int(starts[0])

    smoothed_full = np.full(h.size, np.nan)
    smoothed_full[lo:hi] = smooth + base
    slope_full = np.full(h.size, np.nan)
    slope_full[lo:hi] = slope
    criterion = (
        f"plateau starts at the first step from the steepest one (step {lo + peak}) on that begins "
        f"{slope_window} consecutive steps with |slope| <= {fraction:g} x max|slope| = "
        f"{threshold:.4g}/step; slope = least-squares slope over {slope_window} centered steps of "
        f"the entropy smoothed by a {smooth_window}-step centered moving average"
    )
    return StageSplit(
        plateau_start=plateau_start, smoothed=smoothed_full, slope=slope_full, criterion=criterion
    )


def detect_plateau_online(entropy, *, window: int = 15, fraction: float = 0.1) -> int | None:
    """The plateau start of a run still in progress, once the curve so far confirms it; else None.

    `detect_stages(entropy, smooth_window=window, slope_window=window, fraction=fraction)` run on
    the steps logged so far, with one more condition: every slope of the calm window must come
    from complete windows, i.e. the calm window ends at least ``2 * (window // 2)`` steps before the
    last logged step. Near the end of a curve that is still being written the moving average and
    the slope window are cut short, so noise there can pass for a flat stretch while the entropy
    is still falling; waiting until the window is settled avoids that. A trainer calls this once
    per step and keeps the first answer that is not None (a plateau, once found, stays found).

    Measured on seeded exponential decays ``H(t) = 0.3 + 0.7 exp(-t/tau) + noise`` (tau 10-40
    steps, noise sd 0.05 and 0.1, 200 steps; tests/test_law.py): with the default window of 15 it
    first answers when the true slope has fallen to about a tenth of its peak, never while it is
    above a fifth of it, where the plain 5-step `detect_stages` of each prefix answered at up to
    0.69 of the peak and then flapped between plateau and no plateau.

    Returns the index of the plateau's first step in `entropy`, or None while there are fewer than
    ``2 * window`` values or no settled calm window. Raises ValueError as `detect_stages` does for a
    bad `window` (odd, >= 3) or `fraction`.
    """
    _check_window("window", window, 3)
    h = _series("entropy", entropy)
    if np.count_nonzero(~np.isnan(h)) < 2 * window:
        return None
    split = detect_stages(h, smooth_window=window, slope_window=window, fraction=fraction)
    start = split.plateau_start
    settled = start is not None and start + window - 1 <= h.size - 1 - 2 * (window // 2)
    return start if settled else None


def entropy_at_ceiling_fraction(a: float, b: float, fraction: float) -> float:
    """The entropy at which the law ``R = -a*exp(H) + b`` predicts `fraction` of its ceiling
    ``b - a`` (algorithms.md §4.9): solving ``-a*exp(H) + b = fraction * (b - a)``,

        H = log((b - fraction * (b - a)) / a)

    which is > 0 for a > 0, b > a (a positive ceiling reached as H falls to 0) and fraction in
    (0, 1): a fraction closer to 1 gives a lower entropy. Raises ValueError, naming the value,
    outside that domain.
    """
    for name, value in (("a", a), ("b", b), ("fraction", fraction)):
        if not math.isfinite(value):
            raise InputError(f"{name} must be finite, got {value}")
    if a <= 0:
        raise InputError(f"a must be > 0 (performance rising as entropy falls), got {a}")
    if b <= a:
        raise InputError(f"b must exceed a (a positive ceiling b - a), got a={a}, b={b}")
    if not 0 < fraction < 1:
        raise InputError(f"fraction must be in (0, 1), got {fraction}")
    return math.log((b - fraction * (b - a)) / a)
