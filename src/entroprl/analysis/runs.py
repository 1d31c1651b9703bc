"""The numbers of `entroprl analyze`: training stages, the entropy-performance law and its
forecast (algorithms.md §9), the covariance against the measured entropy change (algorithms.md §2,
the paper's Fig. 8), the covariance groups (algorithms.md §3), and two statistics of the rollout
samples behind PPL and position shaping (algorithms.md §7). Figures and the HTML report are in
`entroprl.analysis.report`.

A section whose inputs a run lacks is not an error: `analyze` records a one-line reason for it in
`RunAnalysis.omitted` and carries on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from entroprl.analysis.foreign import (
    KeyMap,
    MetricsTable,
    find_metric,
    map_keys,
    mapped_series,
    read_log,
)
from entroprl.analysis.law import (
    Forecast,
    ForecastInterval,
    LawCriteria,
    LawFit,
    LawIntervals,
    StageSplit,
    Verdict,
    centered_mean,
    detect_stages,
    fit_law,
    forecast,
    forecast_error_interval,
    judge_law,
    law_intervals,
)
from entroprl.analysis.stats import t_band
from entroprl.errors import InputError
from entroprl.train.rundir import read_text

COV_GROUPS = ("top_0.02%", "top_0.2%", "top_2%", "top_20%", "top_50%", "all")
SECTIONS = ("stages", "law", "forecast", "dynamics", "covariance", "position_entropy", "perplexity")
_ROLLOUT_KEYS = ("log_prob", "entropy", "advantage")


@dataclass(frozen=True, eq=False)
class Run:
    """One training run: its per-step metrics, the mapped series, and its rollout samples.

    `series` holds "entropy", "accuracy" and "reward" aligned with `table.steps` (NaN where a
    step did not log them). `samples` are the rollout records, each with its "step" added;
    `samples_missing` says why there are none.
    """

    name: str
    path: Path
    table: MetricsTable
    keys: KeyMap
    series: dict[str, np.ndarray]
    samples: list[dict[str, Any]]
    samples_missing: str | None

    @property
    def steps(self) -> np.ndarray:
        return self.table.steps


def read_rollouts(folder: str | Path) -> list[dict[str, Any]]:
    """The rollout samples of `RUN/rollouts/step_NNNNNN.jsonl`, each with its "step" added.

    Raises ValueError naming the file and line of a record that is not JSON, lacks one of
    "log_prob", "entropy", "advantage", or whose per-token lists are empty or of unequal length.
    """
    samples = []
    for file in sorted(Path(folder).glob("step_*.jsonl")):
        try:
            step = int(file.stem.removeprefix("step_"))
        except ValueError:
            raise InputError(f"{file}: name is not step_<number>.jsonl") from None
        for number, line in enumerate(read_text(file).splitlines(), 1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise InputError(f"{where}: not a JSON object") from None
            if not isinstance(record, dict) or any(k not in record for k in _ROLLOUT_KEYS):
                raise InputError(f"{where}: a rollout record needs {', '.join(_ROLLOUT_KEYS)}")
            lengths = {len(record[k]) for k in _ROLLOUT_KEYS}
            if len(lengths) != 1 or 0 in lengths:
                raise InputError(
                    f"{where}: log_prob, entropy and advantage must be non-empty and of one length"
                )
            samples.append({**record, "step": step})
    return samples


def load_run(
    path: str | Path,
    *,
    entropy_key: str | None = None,
    accuracy_key: str | None = None,
    name: str | None = None,
    require: bool = True,
) -> Run:
    """Read a run in any format of `entroprl.analysis.foreign` and map its metric names.

    Raises ValueError when the log is empty, malformed or foreign, or (with `require`, see
    `foreign.map_keys`) nothing in it can be mapped.
    """
    path = Path(path)
    table = read_log(path)
    keys = map_keys(table, entropy_key=entropy_key, accuracy_key=accuracy_key, require=require)
    samples: list[dict[str, Any]] = []
    missing = None
    if table.format != "entroprl":
        missing = f"a {table.format} log holds no rollout samples"
    else:
        folder = table.source.parent / "rollouts"
        try:
            samples = read_rollouts(folder)
        except ValueError as e:
            missing = str(e)
        else:
            if not samples:
                missing = f"no rollout samples in {folder} (trainer.rollout_samples = 0?)"
    return Run(
        name=name or (path.name if path.is_dir() else path.stem),
        path=path,
        table=table,
        keys=keys,
        series=mapped_series(table, keys),
        samples=samples,
        samples_missing=missing,
    )


def _floats(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in np.asarray(values, float).tolist()]


def pearson(x, y) -> float:
    """Pearson correlation ``sum(dx*dy) / sqrt(sum(dx^2) * sum(dy^2))``, d = deviation from mean.

    Raises ValueError on fewer than 3 pairs (2 points always give +-1), different lengths,
    NaN or inf, or a constant x or y (the correlation is then undefined).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise InputError(f"x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    if x.size < 3:
        raise InputError(f"a correlation needs at least 3 pairs, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError("x and y must be finite")
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx == 0 or syy == 0:
        raise InputError(f"{'x' if sxx == 0 else 'y'} is constant: the correlation is undefined")
    return float(dx @ dy) / math.sqrt(sxx * syy)


def last_present(steps: np.ndarray, values: np.ndarray) -> dict[str, float | int] | None:
    """The last logged value of a series and its step; None when it holds none."""
    present = np.flatnonzero(~np.isnan(values))
    if present.size == 0:
        return None
    i = int(present[-1])
    return {"step": int(steps[i]), "value": float(values[i])}


def law_grid(
    steps: np.ndarray, entropy: np.ndarray, accuracy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Entropy and accuracy on every integer step from the first to the last logged entropy.

    Returns (grid, H, R, interpolated): `H` is the entropy interpolated linearly in the step
    between logged values (logs often evaluate at steps where they did not log the entropy), `R`
    the accuracy at the steps that logged it and NaN elsewhere, and `interpolated` the number of
    accuracy points whose entropy was interpolated. Position i of the arrays is step grid[i], so
    the forecast's "first 15% of the run" counts steps, whatever the logging interval.
    Raises ValueError when the run logs fewer than 2 entropy values.
    """
    has_h = ~np.isnan(entropy)
    if has_h.sum() < 2:
        raise InputError(f"{int(has_h.sum())} entropy values logged: the law needs at least 2")
    logged = steps[has_h]
    grid = np.arange(logged[0], logged[-1] + 1)
    h = np.interp(grid, logged, entropy[has_h])
    r = np.full(grid.size, np.nan)
    inside = (steps >= logged[0]) & (steps <= logged[-1]) & ~np.isnan(accuracy)
    r[steps[inside] - logged[0]] = accuracy[inside]
    interpolated = int((inside & ~has_h).sum())
    return grid, h, r, interpolated


@dataclass(frozen=True, eq=False)
class SeedBand:
    """A series of several runs (seeds of one method) at the steps where every run logged it: the
    mean over runs and, from 2 runs on, the 95% t interval of that mean (`stats.t_band`); `low`
    and `high` are None for one run."""

    steps: np.ndarray
    mean: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None
    runs: int


def seed_band(steps: list[np.ndarray], values: list[np.ndarray]) -> SeedBand:
    """`SeedBand` of runs whose run i logged `values[i]` (NaN: not logged) at its sorted, unique
    `steps[i]`. Raises ValueError on no run, or no step at which every run logged a value."""
    if not values:
        raise InputError("a band needs at least one run")
    logged = [s[~np.isnan(v)] for s, v in zip(steps, values, strict=True)]
    common = logged[0]
    for more in logged[1:]:
        common = np.intersect1d(common, more)
    if common.size == 0:
        raise InputError(f"no step at which all {len(values)} runs logged a value")
    stacked = np.stack([v[np.searchsorted(s, common)] for s, v in zip(steps, values, strict=True)])
    if len(values) == 1:
        return SeedBand(steps=common, mean=stacked[0], low=None, high=None, runs=1)
    band = t_band(stacked)
    return SeedBand(steps=common, mean=band.mean, low=band.low, high=band.high, runs=band.n)


def _check_smooth(window: int) -> None:
    if not isinstance(window, int | np.integer) or isinstance(window, bool):
        raise InputError(f"smooth must be an integer, got {window!r}")
    if window < 1 or window % 2 == 0:
        raise InputError(f"smooth must be an odd integer >= 1 (a centered window), got {window}")


def smooth_performance(values: np.ndarray, window: int) -> np.ndarray:
    """The logged values of a performance series replaced by their `window`-point centered moving
    average (over logged values, NaN steps skipped and kept NaN; the window shrinks symmetrically
    at the ends). A per-step training reward is a noisy estimate on one batch: averaging
    neighbours before the law is fitted trades a little lag-free blur for much less noise.
    `window` 1 returns the values unchanged. Raises ValueError unless `window` is an odd integer
    >= 1 (centered)."""
    _check_smooth(window)
    present = ~np.isnan(values)
    out = values.astype(np.float64, copy=True)
    if window > 1 and present.any():
        out[present] = centered_mean(values[present], window)
    return out


LATE_START_INTERVALS = 2
"""A log whose first step is more than this many logging intervals from step 0 is flagged."""
PRINTED_DECIMALS = 4
COARSE_LEVELS = 100
"""A series whose values all have at most PRINTED_DECIMALS decimals, and which spans fewer than
COARSE_LEVELS steps of its last decimal, is flagged as quantised by its printing."""


def printed_decimals(values: np.ndarray) -> int | None:
    """The fewest decimals, 0 to 6, that write every value (to float32 precision, as TensorBoard
    stores them); None when none do or there is no value."""
    present = values[~np.isnan(values)]
    if present.size == 0:
        return None
    for decimals in range(7):
        scaled = present * 10.0**decimals
        # float32 holds 24 bits: about 6e-8 of the value
        if np.all(np.abs(scaled - np.round(scaled)) <= 1e-6 + 2e-7 * np.abs(scaled)):
            return decimals
    return None


def _late_start(steps: np.ndarray) -> str | None:
    interval = int(np.median(np.diff(steps))) if steps.size > 1 else 1
    first = int(steps[0])
    if first <= LATE_START_INTERVALS * max(interval, 1):
        return None
    return (
        f"the log starts at step {first}, far from step 0 (it logs every {interval} step"
        f"{'s' if interval != 1 else ''}): the start of training, where the entropy falls "
        "fastest, is not in it (a resumed run, or a cut log?); stages and the forecast's first "
        f"part count from step {first}"
    )


def _quantised(label: str, key: str, values: np.ndarray) -> str | None:
    decimals = printed_decimals(values)
    present = values[~np.isnan(values)]
    if decimals is None or decimals > PRINTED_DECIMALS or np.ptp(present) == 0:
        return None
    step = 10.0**-decimals
    span = float(np.ptp(present))
    if span / step >= COARSE_LEVELS:
        return None
    return (
        f"{label} ({key}) is quantised to {decimals} decimals (printed rounded, or too few "
        f"evaluation problems): {np.unique(present).size} distinct values from "
        f"{present.min():.{decimals}f} to {present.max():.{decimals}f}, one step of the last "
        f"decimal being {step / span:.0%} of that range"
    )


def log_flags(run: Run) -> list[str]:
    """Warnings about the log itself: a start far from step 0 (more than LATE_START_INTERVALS
    logging intervals, the median spacing of its steps), and an entropy or accuracy quantised by
    printing (`PRINTED_DECIMALS`, `COARSE_LEVELS`)."""
    flags = [_late_start(run.steps)]
    keys = {"entropy": run.keys.entropy, "accuracy": ", ".join(run.keys.accuracy)}
    flags += [_quantised(name, keys[name], run.series[name]) for name in keys]
    return [f for f in flags if f is not None]


@dataclass(frozen=True, eq=False)
class Dynamics:
    """Per-step covariance prediction `x` against the measured entropy change `y` (algorithms.md
    §2)."""

    x_key: str
    y_key: str
    steps: np.ndarray
    x: np.ndarray
    y: np.ndarray
    r: float
    slope: float
    intercept: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "x": self.x_key,
            "y": self.y_key,
            "pearson_r": self.r,
            "slope": self.slope,
            "intercept": self.intercept,
            "n": int(self.x.size),
        }


def dynamics_correlation(table: MetricsTable) -> Dynamics:
    """The covariance-predicted entropy change against the measured one, per step (Fig. 8 analogue).

    x = "dynamics/predicted_entropy_change" (= -cov/all), or -"cov/all" when only that is logged;
    y = "dynamics/entropy_change"; each under a logger's prefix too (`foreign.find_metric`).
    Returns the Pearson correlation and the least-squares line ``y = slope*x + intercept`` over the
    steps that logged both. Raises ValueError when either is missing or the correlation is
    undefined (see `pearson`).
    """
    cols = table.columns
    y_key = find_metric(table, "dynamics/entropy_change")
    if y_key is None:
        raise InputError(
            "no dynamics/entropy_change in the log (entroprl's trainer.entropy_change_every)"
        )
    predicted = find_metric(table, "dynamics/predicted_entropy_change")
    cov_all = find_metric(table, "cov/all")
    if predicted is not None:
        x_key, x_all = predicted, cols[predicted]
    elif cov_all is not None:
        x_key, x_all = f"-{cov_all}", -cols[cov_all]
    else:
        raise InputError("no dynamics/predicted_entropy_change or cov/all in the log")
    both = ~(np.isnan(x_all) | np.isnan(cols[y_key]))
    x, y = x_all[both], cols[y_key][both]
    try:
        r = pearson(x, y)
    except ValueError as e:
        raise InputError(f"{x_key} against {y_key}: {e}") from None
    dx = x - x.mean()
    slope = float(dx @ (y - y.mean())) / float(dx @ dx)
    return Dynamics(
        x_key=x_key,
        y_key=y_key,
        steps=table.steps[both],
        x=x,
        y=y,
        r=r,
        slope=slope,
        intercept=float(y.mean() - slope * x.mean()),
    )


def covariance_table(table: MetricsTable) -> list[dict[str, Any]]:
    """Per covariance group ("cov/top_0.02%" ... "cov/all", also under a logger's prefix, see
    `foreign.find_metric`): mean over the logged steps, first and last value, and the number of
    steps. Raises ValueError when no group is logged or a logged value is infinite."""
    rows = []
    for group in COV_GROUPS:
        key = find_metric(table, f"cov/{group}")
        if key is None:
            continue
        values = table.columns[key]
        present = values[~np.isnan(values)]
        if not np.isfinite(present).all():
            raise InputError(f"{key} contains inf")
        rows.append(
            {
                "group": group,
                "mean": float(present.mean()),
                "first": float(present[0]),
                "last": float(present[-1]),
                "n": int(present.size),
            }
        )
    if not rows:
        raise InputError("no cov/<group> metrics in the log")
    return rows


def _token_arrays(samples: list[dict[str, Any]], key: str) -> np.ndarray:
    values = np.concatenate([np.asarray(s[key], dtype=np.float64) for s in samples])
    if not np.isfinite(values).all():
        raise InputError(f"rollout samples: {key} contains NaN or inf")
    return values


def _lengths(samples: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([len(s[key]) for s in samples], dtype=np.int64)


@dataclass(frozen=True, eq=False)
class PositionProfile:
    """Token-weighted mean entropy per bin of relative position; NaN for an empty bin."""

    edges: np.ndarray
    mean: np.ndarray
    tokens: np.ndarray
    responses: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": _floats(self.mean),
            "tokens": self.tokens.tolist(),
            "responses": self.responses,
        }


def position_entropy(samples: list[dict[str, Any]], *, bins: int = 10) -> PositionProfile:
    """Token entropy against relative position in the response, as a binned mean (algorithms.md §7).

    A token at index t of a response of L tokens has relative position ``p = t / L`` (algorithms.md
    §7's ``(c_t - 1)/L``), in [0, 1); it falls in bin ``floor(p * bins)`` of equal-width bins, and
    each bin holds the mean entropy of its tokens (every token of every response weighs the same).
    Raises ValueError on no samples or bins < 1.
    """
    if bins < 1:
        raise InputError(f"bins must be at least 1, got {bins}")
    if not samples:
        raise InputError("no rollout samples")
    lengths = _lengths(samples, "entropy")
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    index = np.arange(lengths.sum()) - starts
    position = index / np.repeat(lengths, lengths)
    # (L-1)/L * bins can round up to `bins` for very long responses; it belongs in the last bin.
    which = np.minimum(np.floor(position * bins).astype(np.int64), bins - 1)
    tokens = np.bincount(which, minlength=bins)
    sums = np.bincount(which, weights=_token_arrays(samples, "entropy"), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(tokens > 0, sums / tokens, np.nan)
    return PositionProfile(
        edges=np.linspace(0.0, 1.0, bins + 1), mean=mean, tokens=tokens, responses=len(samples)
    )


@dataclass(frozen=True, eq=False)
class PerplexitySplit:
    """Response perplexities of the samples with positive and with negative advantage."""

    positive: np.ndarray
    negative: np.ndarray
    zero: int

    def to_dict(self) -> dict[str, Any]:
        def stats(ppl: np.ndarray) -> dict[str, float | int]:
            q1, median, q3 = np.quantile(ppl, [0.25, 0.5, 0.75])
            return {
                "n": int(ppl.size),
                "mean": float(ppl.mean()),
                "median": float(median),
                "q1": float(q1),
                "q3": float(q3),
                "mean_log_ppl": float(np.log(ppl).mean()),
            }

        return {
            "positive": stats(self.positive),
            "negative": stats(self.negative),
            "zero_advantage": self.zero,
        }


def perplexity_split(samples: list[dict[str, Any]]) -> PerplexitySplit:
    """Response perplexity ``exp(-mean_t log_prob)`` for positive vs. negative samples
    (algorithms.md §7).

    A sample is positive when the mean advantage over its tokens is > 0 and negative when < 0
    (shaping keeps the sign of a response's advantage on all its tokens); samples with mean
    advantage 0 are counted in `zero` and left out. Raises ValueError when either side is empty.
    """
    if not samples:
        raise InputError("no rollout samples")
    lengths = _lengths(samples, "log_prob")
    starts = np.cumsum(lengths) - lengths
    mean_logp = np.add.reduceat(_token_arrays(samples, "log_prob"), starts) / lengths
    mean_adv = np.add.reduceat(_token_arrays(samples, "advantage"), starts) / lengths
    ppl = np.exp(-mean_logp)
    positive, negative = ppl[mean_adv > 0], ppl[mean_adv < 0]
    for side, values in (("positive", positive), ("negative", negative)):
        if values.size == 0:
            raise InputError(f"no rollout sample has a {side} advantage")
    return PerplexitySplit(positive=positive, negative=negative, zero=int((mean_adv == 0).sum()))


@dataclass(eq=False)
class RunAnalysis:
    """Everything `entroprl analyze` computes for one run; None for an omitted section, whose
    reason is in `omitted`."""

    run: Run
    fit_fraction: float
    smooth: int = 1
    criteria: LawCriteria = field(default_factory=LawCriteria)
    omitted: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    stages: StageSplit | None = None
    stage_steps: np.ndarray | None = None
    plateau_step: int | None = None
    law: LawFit | None = None
    law_intervals: LawIntervals | None = None
    law_verdict: Verdict | None = None
    law_steps: np.ndarray | None = None
    law_entropy: np.ndarray | None = None
    law_accuracy: np.ndarray | None = None
    interpolated: int = 0
    forecast: Forecast | None = None
    forecast_first_step: int = 0
    forecast_error: ForecastInterval | None = None
    forecast_verdict: Verdict | None = None
    dynamics: Dynamics | None = None
    covariance: list[dict[str, Any]] | None = None
    positions: dict[str, PositionProfile] | None = None
    perplexity: PerplexitySplit | None = None

    def final(self) -> dict[str, Any]:
        return {k: last_present(self.run.steps, v) for k, v in self.run.series.items()}

    def to_dict(self) -> dict[str, Any]:
        run = self.run
        out: dict[str, Any] = {
            "run": {
                "name": run.name,
                "path": str(run.path),
                "format": run.table.format,
                "reader": run.table.reader,
                "reader_notes": list(run.table.notes),
                "keys": run.keys.to_dict(),
                "first_step": int(run.steps[0]),
                "last_step": int(run.steps[-1]),
                "logged_steps": int(run.steps.size),
            },
            "final": self.final(),
            "flags": list(self.flags),
        }
        if self.stages is not None:
            out["stages"] = {
                "plateau_start_step": self.plateau_step,
                "criterion": self.stages.criterion,
            }
        if self.law is not None:
            out["law"] = {
                **self.law_verdict.to_dict(),
                **self.law_intervals.to_dict(),
                "entropy_interpolated": self.interpolated,
                "smooth": self.smooth,
            }
        if self.forecast is not None:
            f, first = self.forecast, self.forecast_first_step
            out["forecast"] = {
                **self.forecast_verdict.to_dict(),
                "fit_fraction": self.fit_fraction,
                "fit_steps": [first, first + f.n_fit - 1],
                "fit": f.fit.to_dict(),
                "rmse": f.rmse,
                "final_error": f.final_error,
                "final_error_interval": self.forecast_error.error.to_dict(),
                "steps": (f.steps_rest + first).tolist(),
                "predicted": _floats(f.predicted),
                "actual": _floats(f.actual),
            }
        if self.dynamics is not None:
            out["dynamics"] = self.dynamics.to_dict()
        if self.covariance is not None:
            out["covariance_table"] = self.covariance
        if self.positions is not None:
            first = next(iter(self.positions.values()))
            out["position_entropy"] = {
                "edges": first.edges.tolist(),
                **{k: v.to_dict() for k, v in self.positions.items()},
            }
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity.to_dict()
        out["omitted"] = dict(self.omitted)
        return out


def _stages(result: RunAnalysis) -> None:
    run = result.run
    entropy = run.series["entropy"]
    if run.keys.entropy is None:
        raise InputError("no entropy metric in the log (name one with --entropy-key)")
    present = ~np.isnan(entropy)
    split = detect_stages(entropy[present])
    result.stages, result.stage_steps = split, run.steps[present]
    if split.plateau_start is not None:
        result.plateau_step = int(result.stage_steps[split.plateau_start])


def law_arrays(result: RunAnalysis) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """`law_grid` of the run's entropy and its performance smoothed by `result.smooth`."""
    run = result.run
    accuracy = smooth_performance(run.series["accuracy"], result.smooth)
    return law_grid(run.steps, run.series["entropy"], accuracy)


def _law(result: RunAnalysis) -> None:
    run = result.run
    if run.keys.entropy is None:
        raise InputError("no entropy metric in the log (name one with --entropy-key)")
    if not run.keys.accuracy:
        raise InputError("no validation accuracy in the log (name one with --accuracy-key)")
    grid, h, r, interpolated = law_arrays(result)
    result.law = fit_law(h, r)
    result.law_intervals = law_intervals([(h, r)])
    result.law_verdict = judge_law(result.law_intervals, result.criteria)
    usable = ~np.isnan(r)
    result.law_steps, result.law_entropy, result.law_accuracy = grid[usable], h[usable], r[usable]
    result.interpolated = interpolated


def _forecast(result: RunAnalysis) -> None:
    if result.law is None:
        raise InputError(f"needs the law: {result.omitted['law']}")
    grid, h, r, _ = law_arrays(result)
    result.forecast = forecast(h, r, fit_fraction=result.fit_fraction)
    result.forecast_error = forecast_error_interval([(h, r)], fit_fraction=result.fit_fraction)
    result.forecast_verdict = judge_law(result.forecast_error.law, result.criteria)
    result.forecast_first_step = int(grid[0])


def _positions(result: RunAnalysis) -> None:
    samples = result.run.samples
    if not samples:
        raise InputError(result.run.samples_missing or "no rollout samples")
    profiles = {"all": position_entropy(samples)}
    if result.plateau_step is not None:
        rising = [s for s in samples if s["step"] < result.plateau_step]
        plateau = [s for s in samples if s["step"] >= result.plateau_step]
        if rising and plateau:
            profiles |= {"rising": position_entropy(rising), "plateau": position_entropy(plateau)}
    result.positions = profiles


def _perplexity(result: RunAnalysis) -> None:
    if not result.run.samples:
        raise InputError(result.run.samples_missing or "no rollout samples")
    result.perplexity = perplexity_split(result.run.samples)


def _dynamics(result: RunAnalysis) -> None:
    result.dynamics = dynamics_correlation(result.run.table)


def _covariance(result: RunAnalysis) -> None:
    result.covariance = covariance_table(result.run.table)


_SECTION_STEPS = {
    "stages": _stages,
    "law": _law,
    "forecast": _forecast,
    "dynamics": _dynamics,
    "covariance": _covariance,
    "position_entropy": _positions,
    "perplexity": _perplexity,
}


def analyze(
    run: Run,
    *,
    fit_fraction: float = 0.15,
    smooth: int = 1,
    criteria: LawCriteria | None = None,
) -> RunAnalysis:
    """All sections of the analysis of `run`; a section that cannot be computed from what the run
    logged is left None with its one-line reason in `omitted`.

    stages            `law.detect_stages` on the logged entropy values (defaults of algorithms.md
    §9's
                      Choice); the plateau start is reported as a step.
    law               `law.fit_law` on every step with an accuracy (smoothed by a `smooth`-point
                      centered moving average, `smooth_performance`; 1: as logged), its entropy
                      from `law_grid`; `law.law_intervals` bootstraps a, b and the ceiling over
                      the points, and `law.judge_law` says whether it holds by `criteria`.
    forecast          `law.forecast` on the same arrays with `fit_fraction` of the steps,
                      `law.forecast_error_interval` the final error's bootstrap interval, and
                      `law.judge_law` of the law fitted on the first part.

    `flags` holds `log_flags`: warnings about the log itself.
    dynamics          `dynamics_correlation`; covariance: `covariance_table`.
    position_entropy  `position_entropy` of all samples, and of the rising and the plateau stage
                      separately when the plateau was found and both stages have samples.
    perplexity        `perplexity_split`.

    Raises ValueError when `fit_fraction` is not in (0, 1) or `smooth` not an odd integer >= 1
    (a wrong option, not a lack of data).
    """
    if not 0 < fit_fraction < 1:
        raise InputError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    _check_smooth(smooth)
    result = RunAnalysis(
        run=run,
        fit_fraction=fit_fraction,
        smooth=smooth,
        criteria=criteria or LawCriteria(),
        flags=log_flags(run),
    )
    for section in SECTIONS:
        try:
            _SECTION_STEPS[section](result)
        except ValueError as e:
            result.omitted[section] = str(e)
    return result
