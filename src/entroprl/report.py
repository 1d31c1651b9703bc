"""`entroprl analyze` and `entroprl compare`: figures (matplotlib, Agg) and one self-contained HTML
report, with every PNG embedded as a base64 data URI so that it opens offline.

    analyze RUN  ->  OUT/report.html, OUT/*.png, OUT/analysis.json   (OUT: RUN/analysis by default)
    compare RUNS ->  OUT/report.html, OUT/compare.png, OUT/comparison.json

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly, so the global pyplot
state and the user's backend are left alone.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from entroprl.analysis import RunAnalysis, analyze, law_arrays, load_run
from entroprl.law import forecast_error_interval, law_intervals
from entroprl.rundir import atomic_write_text, make_dir
from entroprl.stats import Interval

_TITLES = {
    "stages": "Training stages",
    "law": "Entropy-performance law",
    "forecast": "Forecast from the start of the run",
    "dynamics": "Covariance against the measured entropy change",
    "covariance": "Covariance groups",
    "position_entropy": "Token entropy against position in the response",
    "perplexity": "Response perplexity, positive vs. negative samples",
}

_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em;
       border-bottom: 1px solid #ccc; }
img { max-width: 100%; display: block; margin: 0.8em 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
.omitted { color: #8a5a00; background: #fff7e6; padding: 0.4em 0.7em;
           border-left: 3px solid #e0a030; }
.note { color: #555; font-size: 0.92em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _present(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(values)
    return steps[keep], values[keep]


# -- figures of one run ------------------------------------------------------------------------


def _curves_figure(result: RunAnalysis, path: Path) -> Path:
    run = result.run
    labels = {
        "entropy": f"entropy ({run.keys.entropy})",
        "accuracy": "validation accuracy",
        "reward": f"reward ({run.keys.reward})",
    }
    shown = [k for k in ("entropy", "accuracy", "reward") if not np.isnan(run.series[k]).all()]
    fig = Figure(figsize=(10, 2.6 * len(shown) + 0.6), layout="constrained")
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, shown, strict=True):
        steps, values = _present(run.steps, run.series[key])
        marker = "o" if key == "accuracy" else None
        ax.plot(steps, values, marker=marker, ms=3, lw=1.2, color="C0", label=key)
        if key == "entropy" and result.stages is not None:
            ax.plot(
                result.stage_steps,
                result.stages.smoothed,
                color="C1",
                lw=1,
                alpha=0.8,
                label="smoothed",
            )
            ax.legend(loc="upper right", fontsize=8)
        if result.plateau_step is not None:
            ax.axvline(result.plateau_step, color="C3", ls="--", lw=1)
        ax.set_ylabel(labels[key], fontsize=9)
        ax.grid(alpha=0.3)
    if result.plateau_step is not None:
        axes[0].set_title(f"rising stage | plateau from step {result.plateau_step}", fontsize=10)
    axes[-1].set_xlabel("step")
    return _save(fig, path)


def _law_figure(result: RunAnalysis, path: Path) -> Path:
    law, f = result.law, result.forecast
    fig = Figure(figsize=(12, 4.6) if f else (6.5, 4.6), layout="constrained")
    axes = fig.subplots(1, 2 if f else 1, squeeze=False)[0]
    ax = axes[0]
    h, r, steps = result.law_entropy, result.law_accuracy, result.law_steps
    if f is not None:
        last_fit = result.forecast_first_step + f.n_fit - 1
        head = steps <= last_fit
        ax.scatter(h[head], r[head], s=18, color="C1", label="first part (forecast fit)", zorder=3)
        ax.scatter(h[~head], r[~head], s=18, color="C0", label="rest of the run", zorder=3)
    else:
        ax.scatter(h, r, s=18, color="C0", label="evaluations", zorder=3)
    grid = np.linspace(0.0, max(float(h.max()), 1e-3) * 1.05, 200)
    ax.plot(
        grid,
        law.predict(grid),
        color="k",
        lw=1.4,
        label=f"fit: R = -{law.a:.3g} exp(H) + {law.b:.3g}  (R² {law.r2:.3f})",
    )
    if f is not None:
        ax.plot(
            grid,
            f.fit.predict(grid),
            color="C1",
            ls="--",
            lw=1.2,
            label=f"fit on the first {result.fit_fraction:.0%}",
        )
    ax.axhline(law.ceiling, color="C3", ls=":", lw=1.2)
    ax.plot(
        [0.0],
        [law.ceiling],
        marker="*",
        ms=12,
        color="C3",
        ls="none",
        label=f"predicted ceiling (H = 0): {law.ceiling:.3f}",
    )
    ax.set_xlabel("entropy H")
    ax.set_ylabel("validation accuracy R")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    if f is not None:
        ax = axes[1]
        first = result.forecast_first_step
        ax.plot(steps, r, "o", ms=4, color="C0", label="measured")
        ax.plot(
            f.steps_rest + first,
            f.predicted,
            "-",
            color="C1",
            lw=1.5,
            label="forecast from the law fitted on the first part",
        )
        ax.axvspan(first, first + f.n_fit - 1, color="C1", alpha=0.12, label="fit part")
        ax.set_title(
            f"forecast RMSE {f.rmse:.4f}, final-step error {f.final_error:+.4f}", fontsize=10
        )
        ax.set_xlabel("step")
        ax.set_ylabel("validation accuracy R")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _dynamics_figure(result: RunAnalysis, path: Path) -> Path:
    d = result.dynamics
    fig = Figure(figsize=(6.8, 4.8), layout="constrained")
    ax = fig.subplots()
    points = ax.scatter(d.x, d.y, c=d.steps, cmap="viridis", s=20)
    fig.colorbar(points, ax=ax, label="step")
    line = np.linspace(float(d.x.min()), float(d.x.max()), 2)
    ax.plot(
        line,
        d.slope * line + d.intercept,
        color="C3",
        lw=1.2,
        label=f"least squares: slope {d.slope:.3g}",
    )
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel(f"predicted entropy change ({d.x_key})")
    ax.set_ylabel(f"measured entropy change ({d.y_key})")
    ax.set_title(f"Pearson r = {d.r:.3f} over {d.x.size} steps", fontsize=10)
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _position_figure(result: RunAnalysis, path: Path) -> Path:
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (name, profile) in enumerate(result.positions.items()):
        centers = (profile.edges[:-1] + profile.edges[1:]) / 2
        ax.plot(
            centers,
            profile.mean,
            marker="o",
            ms=4,
            color=f"C{i}",
            label=f"{name} ({profile.responses} responses)",
        )
    ax.set_xlabel("relative position in the response")
    ax.set_ylabel("mean token entropy")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _perplexity_figure(result: RunAnalysis, path: Path) -> Path:
    p = result.perplexity
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.boxplot([p.positive, p.negative], showmeans=True)
    ax.set_xticks(
        [1, 2],
        [
            f"positive advantage\n(n={p.positive.size})",
            f"negative advantage\n(n={p.negative.size})",
        ],
    )
    ax.set_ylabel("response perplexity exp(-mean log p)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


# -- one run -----------------------------------------------------------------------------------


def _smooth_note(smooth: int) -> str:
    if smooth == 1:
        return "Performance as logged (no smoothing; --smooth N averages N neighbouring values)."
    return (
        f"Performance smoothed by a {smooth}-point centered moving average (--smooth {smooth}) "
        "before fitting; neighbouring points then share noise, so the bootstrap intervals, which "
        "treat points as independent, are too narrow."
    )


def _bounds(interval: Interval | None) -> list[float | None]:
    return [None, None] if interval is None else [interval.low, interval.high]


def _section_html(result: RunAnalysis, section: str, out: Path) -> str:
    title = f"<h2>{_TITLES[section]}</h2>"
    if section in result.omitted:
        reason = html.escape(result.omitted[section])
        return f'{title}<p class="omitted">Omitted: {reason}</p>'
    if section == "stages":
        step = result.plateau_step
        found = (
            f"The plateau starts at step <b>{step}</b>."
            if step is not None
            else "The entropy has not reached its plateau."
        )
        criterion = html.escape(result.stages.criterion)
        return f'{title}<p>{found}</p><p class="note">Criterion: {criterion}.</p>'
    if section == "law":
        law, ci = result.law, result.law_intervals
        text = (
            f"<p>R = -a&middot;exp(H) + b fitted on {law.n} evaluations; predicted ceiling "
            f"b - a = <b>{law.ceiling:.4f}</b> (accuracy at entropy 0), 95% bootstrap interval "
            f"[{ci.ceiling.low:.4f}, {ci.ceiling.high:.4f}] ({ci.a_samples.size} resamples of the "
            f'points).</p><p class="note">{html.escape(_smooth_note(result.smooth))}</p>'
        )
        if result.interpolated:
            text += (
                f'<p class="note">{result.interpolated} evaluations fell on steps without a '
                "logged entropy; their entropy is interpolated between the neighbouring "
                "logged steps.</p>"
            )
        img = _img(_law_figure(result, out / "law.png"), "accuracy against entropy")
        rows = [
            [k, law.to_dict()[k], *_bounds(getattr(ci, k, None))]
            for k in ("a", "b", "ceiling", "r2", "rmse", "n")
        ]
        return title + text + img + _table(["", "value", "95% low", "95% high"], rows)
    if section == "forecast":
        f, first = result.forecast, result.forecast_first_step
        return (
            f"{title}<p>Law fitted on steps {first}-{first + f.n_fit - 1} (the first "
            f"{result.fit_fraction:.0%} of the run, {f.fit.n} evaluations: a = "
            f"{f.fit.a:.4g}, b = {f.fit.b:.4g}) and applied to the entropy of the "
            f"{f.steps_rest.size} later evaluations: RMSE <b>{f.rmse:.4f}</b>, error at the "
            f"last one (step {int(f.steps_rest[-1]) + first}) <b>{f.final_error:+.4f}</b> "
            f"(predicted - measured; 95% bootstrap interval over the fit points "
            f"[{result.forecast_error.low:+.4f}, {result.forecast_error.high:+.4f}]). The right "
            "panel of the figure above draws it.</p>"
        )
    if section == "dynamics":
        d = result.dynamics
        img = _img(_dynamics_figure(result, out / "dynamics.png"), "covariance vs entropy change")
        return (
            f"{title}<p>Per step, the first-order entropy change predicted by the token "
            f"covariance (x = <code>{html.escape(d.x_key)}</code>) against the entropy "
            f"change measured on the same rollouts after the update (y = "
            f"<code>{html.escape(d.y_key)}</code>). Pearson correlation <b>{d.r:.3f}</b> over "
            f"{d.x.size} steps.</p>{img}"
        )
    if section == "covariance":
        rows = [[r["group"], r["mean"], r["first"], r["last"], r["n"]] for r in result.covariance]
        return (
            f"{title}<p>Mean token covariance cov = (log p - mean)(A - mean) of the tokens "
            "with the largest covariance in each group (top x% of the valid tokens).</p>"
            + _table(["group", "mean over steps", "first step", "last step", "steps"], rows)
        )
    if section == "position_entropy":
        img = _img(_position_figure(result, out / "position_entropy.png"), "entropy vs position")
        return (
            f"{title}<p>Mean entropy of the sampled tokens in ten equal bins of relative "
            f"position t/L, from the saved rollout samples.</p>{img}"
        )
    p = result.perplexity.to_dict()
    img = _img(_perplexity_figure(result, out / "perplexity.png"), "perplexity box plot")
    rows = [
        [side, p[side]["n"], p[side]["mean"], p[side]["median"], p[side]["q1"], p[side]["q3"]]
        for side in ("positive", "negative")
    ]
    return (
        f"{title}<p>Per response exp(-mean token log-prob) under the rollout policy, split by "
        f"the sign of its advantage ({p['zero_advantage']} responses with advantage 0 left "
        f"out).</p>{img}" + _table(["advantage", "n", "mean", "median", "q1", "q3"], rows)
    )


def _source_html(result: RunAnalysis) -> str:
    run, keys = result.run, result.run.keys
    rows = [
        ["format", run.table.format],
        ["source", str(run.table.source)],
        ["entropy", keys.entropy],
        ["accuracy", ", ".join(keys.accuracy) or None],
        ["reward", keys.reward],
        ["steps", f"{int(run.steps[0])}-{int(run.steps[-1])} ({run.steps.size} logged)"],
    ]
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in keys.notes)
    final = result.final()
    finals = [[k, v["step"] if v else None, v["value"] if v else None] for k, v in final.items()]
    return (
        _table(["run", run.name], rows)
        + notes
        + "<h2>Final values</h2>"
        + _table(["metric", "step", "value"], finals)
    )


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def _default_out(run: Path) -> Path:
    return run / "analysis" if run.is_dir() else run.parent / f"{run.stem}_analysis"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def analyze_run(
    run: str | Path,
    out: str | Path | None = None,
    *,
    fit_fraction: float = 0.15,
    smooth: int = 1,
    entropy_key: str | None = None,
    accuracy_key: str | None = None,
) -> Path:
    """Analyse one run (any format of `entroprl.foreign`) and write its report; returns the path
    of report.html. `out` defaults to RUN/analysis (RUN_STEM_analysis beside a log file);
    `smooth` is the window of `analysis.smooth_performance` (1: the performance as logged).

    Raises ValueError when the run cannot be read or nothing in it can be mapped; a section the
    run lacks the inputs for is omitted with its reason, in the HTML and in analysis.json.
    """
    run = Path(run)
    out = Path(out) if out is not None else _default_out(run)
    result = analyze(
        load_run(run, entropy_key=entropy_key, accuracy_key=accuracy_key),
        fit_fraction=fit_fraction,
        smooth=smooth,
    )
    make_dir(out)
    body = [
        _source_html(result),
        "<h2>Entropy, accuracy and reward</h2>",
        _img(_curves_figure(result, out / "curves.png"), "entropy, accuracy, reward"),
    ]
    body += [_section_html(result, section, out) for section in _TITLES]
    _write_json(out / "analysis.json", result.to_dict())
    report = out / "report.html"
    atomic_write_text(report, _page(f"entroprl analysis: {result.run.name}", "".join(body)))
    return report


# -- several runs ------------------------------------------------------------------------------


def _unique_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        base = path.name if path.is_dir() else path.stem
        name, k = base, 2
        while name in names:
            name, k = f"{base} #{k}", k + 1
        names.append(name)
    return names


def _compare_figure(results: list[RunAnalysis], path: Path) -> Path:
    fig = Figure(figsize=(13, 4.6), layout="constrained")
    ent, acc, law = fig.subplots(1, 3)
    for i, result in enumerate(results):
        run, color = result.run, f"C{i % 10}"
        ent.plot(*_present(run.steps, run.series["entropy"]), color=color, lw=1.2, label=run.name)
        acc.plot(
            *_present(run.steps, run.series["accuracy"]),
            marker="o",
            ms=3,
            color=color,
            lw=1.2,
            label=run.name,
        )
        if result.law is not None:
            law.scatter(result.law_entropy, result.law_accuracy, s=14, color=color, alpha=0.7)
            grid = np.linspace(0.0, float(result.law_entropy.max()) * 1.05, 100)
            law.plot(
                grid,
                result.law.predict(grid),
                color=color,
                lw=1.2,
                label=f"{run.name}: ceiling {result.law.ceiling:.3f}",
            )
    for ax, ylabel, xlabel in (
        (ent, "entropy", "step"),
        (acc, "validation accuracy", "step"),
        (law, "validation accuracy", "entropy H"),
    ):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    law.set_title("law fits R = -a exp(H) + b", fontsize=10)
    return _save(fig, path)


def _summary(result: RunAnalysis) -> dict[str, Any]:
    data = result.to_dict()
    return {
        "name": result.run.name,
        "path": str(result.run.path),
        "format": result.run.table.format,
        "final": data["final"],
        "law": data.get("law"),
        "forecast": (
            {k: data["forecast"][k] for k in ("fit_steps", "rmse", "final_error")}
            if "forecast" in data
            else None
        ),
        "plateau_start_step": result.plateau_step,
        "omitted": data["omitted"],
    }


def _pool_names(paths: list[Path]) -> list[str]:
    """Each run's pool: the name of the folder that holds it (the demo's METHOD/seed_K)."""
    return [path.resolve().parent.name for path in paths]


def _pooled(results: list[RunAnalysis], fit_fraction: float) -> dict[str, Any]:
    """The law on the points of `results` together (`law.law_intervals`) and the pooled 15%
    forecast's error (`law.forecast_error_interval`), each None with a reason when it fails."""
    pool: dict[str, Any] = {"runs": [r.run.name for r in results], "law": None, "forecast": None}
    try:
        arrays = [law_arrays(r)[1:3] for r in results]
        h, r = np.concatenate([h for h, _ in arrays]), np.concatenate([r for _, r in arrays])
        pool["points"] = (h[~np.isnan(r)], r[~np.isnan(r)])
        pool["law"] = law_intervals(arrays)
        pool["forecast"] = forecast_error_interval(arrays, fit_fraction=fit_fraction)
    except ValueError as e:
        pool["omitted"] = str(e)
    return pool


def _pool_dict(pool: dict[str, Any]) -> dict[str, Any]:
    fc = pool["forecast"]
    return {
        "runs": pool["runs"],
        "law": pool["law"].to_dict() if pool["law"] is not None else None,
        "forecast": {"fit": fc[0].to_dict(), "final_error": fc[1].to_dict()} if fc else None,
        **({"omitted": pool["omitted"]} if "omitted" in pool else {}),
    }


def _pooled_figure(pools: dict[str, dict[str, Any]], path: Path) -> Path:
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    for i, (name, pool) in enumerate(pools.items()):
        law, color = pool["law"], f"C{i % 10}"
        if law is None:
            continue
        h, r = pool["points"]
        ax.scatter(h, r, s=10, color=color, alpha=0.45)
        grid = np.linspace(0.0, float(h.max()) * 1.05, 100)
        low, high = law.band(grid)
        ax.fill_between(grid, low, high, color=color, alpha=0.2, lw=0)
        ax.plot(
            grid,
            law.fit.predict(grid),
            color=color,
            lw=1.4,
            label=f"{name} ({law.runs} runs): ceiling {law.ceiling.estimate:.3f} "
            f"[{law.ceiling.low:.3f}, {law.ceiling.high:.3f}]",
        )
    ax.set_xlabel("entropy H")
    ax.set_ylabel("validation accuracy R")
    ax.set_title("law fitted on each pool's points; band: 95% bootstrap", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _ci(interval: Interval, digits: int = 4) -> str:
    return f"{interval.estimate:.{digits}g} [{interval.low:.{digits}g}, {interval.high:.{digits}g}]"


def _pooled_html(pools: dict[str, dict[str, Any]], out: Path) -> str:
    rows = []
    for name, pool in pools.items():
        law, fc = pool["law"], pool["forecast"]
        rows.append(
            [name, len(pool["runs"])]
            + (
                [law.fit.n, _ci(law.a), _ci(law.b), _ci(law.ceiling), law.fit.r2]
                if law is not None
                else [None] * 5
            )
            + [_ci(fc[1]) if fc else pool.get("omitted")]
        )
    head = ["pool", "runs", "points", "a", "b", "ceiling", "R²", "forecast final error"]
    img = _img(_pooled_figure(pools, out / "pooled_law.png"), "pooled law fits")
    return (
        "<h2>Law fitted on the pooled runs</h2><p>Runs in one folder (seeds of one method) are "
        "pooled: R = -a&middot;exp(H) + b fitted on all their evaluations together, with 95% "
        "percentile intervals over 1000 bootstrap resamples of the points. The forecast is fitted "
        "on the pooled first part of each run and its error is the mean over the runs of "
        "(predicted - measured) at their last evaluation.</p>" + img + _table(head, rows)
    )


def compare_runs(
    runs: list[str | Path],
    out: str | Path,
    *,
    fit_fraction: float = 0.15,
    smooth: int = 1,
    pool: bool = False,
    entropy_key: str | None = None,
    accuracy_key: str | None = None,
) -> Path:
    """Overlay the entropy and accuracy curves and law fits of several runs (any formats) and
    tabulate their final metrics and law fits; returns the path of OUT/report.html (beside it
    compare.png and comparison.json). The key and `smooth` options apply to every run. With
    `pool`, the runs held by one folder are also fitted together (`_pooled`), drawn with their
    bootstrap band in pooled_law.png, and tabulated.

    Raises ValueError on no runs or a run that cannot be read.
    """
    if not runs:
        raise ValueError("compare needs at least one run")
    paths = [Path(r) for r in runs]
    results = [
        analyze(
            load_run(p, entropy_key=entropy_key, accuracy_key=accuracy_key, name=n),
            fit_fraction=fit_fraction,
            smooth=smooth,
        )
        for p, n in zip(paths, _unique_names(paths), strict=True)
    ]
    out = Path(out)
    make_dir(out)
    summaries = [_summary(r) for r in results]
    head = [
        "run",
        "format",
        "last step",
        "entropy",
        "accuracy",
        "reward",
        "law a",
        "law b",
        "law R²",
        "ceiling",
        "forecast RMSE",
        "forecast final error",
        "plateau from step",
    ]
    rows = []
    for s in summaries:
        final, law, fc = s["final"], s["law"] or {}, s["forecast"] or {}
        rows.append(
            [s["name"], s["format"], max(v["step"] for v in final.values() if v)]
            + [final[k]["value"] if final[k] else None for k in ("entropy", "accuracy", "reward")]
            + [law.get(k) for k in ("a", "b", "r2", "ceiling")]
            + [fc.get("rmse"), fc.get("final_error"), s["plateau_start_step"]]
        )
    omitted = "".join(
        f'<p class="omitted">{html.escape(s["name"])}: {html.escape(section)} omitted: '
        f"{html.escape(reason)}</p>"
        for s in summaries
        for section, reason in s["omitted"].items()
        if section in ("law", "forecast", "stages")
    )
    body = (
        _img(_compare_figure(results, out / "compare.png"), "entropy and accuracy of the runs")
        + "<h2>Final metrics and law fits</h2>"
        + _table(head, rows)
        + omitted
    )
    data: dict[str, Any] = {"fit_fraction": fit_fraction, "smooth": smooth, "runs": summaries}
    if pool:
        members: dict[str, list[RunAnalysis]] = {}
        for name, result in zip(_pool_names(paths), results, strict=True):
            members.setdefault(name, []).append(result)
        pools = {name: _pooled(rs, fit_fraction) for name, rs in members.items()}
        body += _pooled_html(pools, out)
        data["pools"] = {name: _pool_dict(p) for name, p in pools.items()}
    _write_json(out / "comparison.json", data)
    report = out / "report.html"
    atomic_write_text(report, _page(f"entroprl comparison of {len(results)} runs", body))
    return report
