"""`entroprl analyze`: figures (matplotlib, Agg) and one self-contained HTML report per run, with
every PNG embedded as a base64 data URI so that it opens offline; and the pieces of HTML and the
figures that the comparison report (`entroprl.analysis.comparison`) shares.

    analyze RUN  ->  OUT/report.html, OUT/*.png, OUT/analysis.json   (OUT: RUN/analysis by default)

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly, so the global pyplot
state and the user's backend are left alone. A law that does not hold (`law.judge_law`) is never
headlined: no ceiling, no forecast, and the reasons written instead.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from entroprl.analysis.foreign import find_metric
from entroprl.analysis.law import LawCriteria, LawFit, Verdict
from entroprl.analysis.runs import (
    COV_GROUPS,
    Run,
    RunAnalysis,
    SeedBand,
    analyze,
    load_run,
    seed_band,
)
from entroprl.analysis.stats import Interval
from entroprl.train.rundir import atomic_write_text, make_dir

ENTROPY_LABEL = "entropy H (nats)"

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
.omitted, .flag { color: #8a5a00; background: #fff7e6; padding: 0.4em 0.7em;
                  border-left: 3px solid #e0a030; }
.holds { background: #eef7ee; padding: 0.4em 0.7em; border-left: 3px solid #4a9a4a; }
.note { color: #555; font-size: 0.92em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats to `digits` significant digits, None and NaN as "-"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def html_table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"


def paragraph(text: str, kind: str = "note") -> str:
    """`text` escaped, as a paragraph of CSS class `kind` (note, omitted, flag, holds)."""
    return f'<p class="{kind}">{html.escape(text)}</p>'


def save_figure(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def embed_png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def present(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(values)
    return steps[keep], values[keep]


def html_page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def ci_text(interval: Interval, digits: int = 4) -> str:
    return f"{interval.estimate:.{digits}g} [{interval.low:.{digits}g}, {interval.high:.{digits}g}]"


def verdict_text(verdict: Verdict, subject: str) -> tuple[str, str]:
    """(CSS class, sentence) saying whether the law describes `subject`, with the numbers."""
    if verdict.valid:
        return "holds", f"The law describes {subject}: {verdict.summary()}."
    return "omitted", (
        f"The law does not describe {subject}, so nothing is predicted from it: "
        f"{'; '.join(verdict.reasons)}."
    )


# -- drawing pieces shared with the comparison ---------------------------------------------------


def draw_law(
    ax: Axes, fit: LawFit, low: float, high: float, *, color: str, label: str, lw: float = 1.4
) -> None:
    """The curve of `fit`: solid over the entropy [low, high] of the points it was fitted on,
    dashed where it is extrapolated, down to H = 0 where its ceiling is read."""
    inside = np.linspace(low, high, 100)
    ax.plot(inside, fit.predict(inside), color=color, lw=lw, label=label)
    if low > 0:
        below = np.linspace(0.0, low, 50)
        ax.plot(below, fit.predict(below), color=color, lw=lw, ls="--")


def extrapolation_key(ax: Axes) -> None:
    """A legend entry for the dashed part of `draw_law`'s curves."""
    ax.plot([], [], color="grey", ls="--", lw=1.2, label="dashed: extrapolated beyond the points")


def draw_band(ax: Axes, band: SeedBand, color: str, label: str) -> None:
    """A `SeedBand`: the mean over runs, and its t band shaded when there are several runs."""
    ax.plot(band.steps, band.mean, color=color, lw=1.8, label=label)
    if band.low is not None:
        ax.fill_between(band.steps, band.low, band.high, color=color, alpha=0.2, lw=0)


def band_label(method: str, band: SeedBand) -> str:
    if band.runs == 1:
        return method
    return f"{method}: mean of {band.runs} runs, 95% t band"


def draw_method(ax: Axes, runs: list[Run], values, color: str, method: str) -> str | None:
    """The series `values(run)` (None: not logged) of a method's runs against the step: each run
    thin when there are several, their `seed_band` bold. Returns why nothing or no band was drawn,
    or None."""
    logged = [(run, v) for run in runs if (v := values(run)) is not None and not np.isnan(v).all()]
    if not logged:
        return "logged by none of its runs"
    if len(logged) > 1:
        for run, v in logged:
            ax.plot(*present(run.steps, v), color=color, lw=0.6, alpha=0.35)
    try:
        band = seed_band([run.steps for run, _ in logged], [v for _, v in logged])
    except ValueError as e:
        return f"no band: {e}"
    draw_band(ax, band, color, band_label(method, band))
    missing = len(runs) - len(logged)
    return f"{missing} of its {len(runs)} runs do not log it" if missing else None


def covariance_figure(
    methods: dict[str, list[Run]], colors: dict[str, str], path: Path
) -> tuple[Path | None, list[str]]:
    """The covariance groups (cov/top_0.02% ... cov/all) against the step, one panel per group
    logged, each method as `draw_method` draws it. Returns the figure (None when no run logs a
    group) and notes on what is missing."""
    groups = [
        g
        for g in COV_GROUPS
        if any(find_metric(run.table, f"cov/{g}") for runs in methods.values() for run in runs)
    ]
    if not groups:
        return None, []
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = Figure(figsize=(4.4 * cols, 3.3 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    notes = []
    for ax, group in zip(axes, groups, strict=False):
        for method, runs in methods.items():

            def values(run: Run, group: str = group) -> np.ndarray | None:
                key = find_metric(run.table, f"cov/{group}")
                return None if key is None else run.table.columns[key]

            why = draw_method(ax, runs, values, colors[method], method)
            if why is not None:
                notes.append(f"{method}, cov/{group}: {why}")
        ax.set_title(f"cov/{group}", fontsize=10)
        ax.set_xlabel("step")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    entries = {}  # one legend for the figure: each method once, whichever panels it is in
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        entries |= dict(zip(labels, handles, strict=True))
    if entries:
        fig.legend(
            entries.values(), entries.keys(), loc="outside upper center", ncols=min(3, len(entries))
        )
    return save_figure(fig, path), notes


# -- figures of one run ------------------------------------------------------------------------


def _curves_figure(result: RunAnalysis, path: Path) -> Path:
    run = result.run
    labels = {
        "entropy": f"entropy (nats)\n{run.keys.entropy}",
        "accuracy": "validation accuracy",
        "reward": f"reward\n{run.keys.reward}",
    }
    shown = [k for k in ("entropy", "accuracy", "reward") if not np.isnan(run.series[k]).all()]
    fig = Figure(figsize=(10, 2.6 * len(shown) + 0.6), layout="constrained")
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, shown, strict=True):
        steps, values = present(run.steps, run.series[key])
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
    return save_figure(fig, path)


def _law_panel(ax: Axes, result: RunAnalysis) -> None:
    law, ci, verdict, f = result.law, result.law_intervals, result.law_verdict, result.forecast
    h, r, steps = result.law_entropy, result.law_accuracy, result.law_steps
    if f is not None:
        last_fit = result.forecast_first_step + f.n_fit - 1
        head = steps <= last_fit
        ax.scatter(h[head], r[head], s=18, color="C1", label="first part (forecast fit)", zorder=3)
        ax.scatter(h[~head], r[~head], s=18, color="C0", label="rest of the run", zorder=3)
    else:
        ax.scatter(h, r, s=18, color="C0", label="evaluations", zorder=3)
    if verdict.valid:
        draw_law(
            ax,
            law,
            ci.entropy_low,
            ci.entropy_high,
            color="k",
            label=f"law: R = -{law.a:.3g} exp(H) + {law.b:.3g}  (R² {law.r2:.3f})",
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
        ax.set_title("the law holds", fontsize=10)
    else:
        inside = np.linspace(ci.entropy_low, ci.entropy_high, 100)
        ax.plot(inside, law.predict(inside), color="grey", ls=":", lw=1.2, label="least squares")
        ax.set_title("the law does not hold here: no ceiling (see the text)", fontsize=10)
    if f is not None and result.forecast_verdict.valid:
        first = result.forecast_error.law
        draw_law(
            ax,
            f.fit,
            first.entropy_low,
            first.entropy_high,
            color="C1",
            lw=1.2,
            label=f"law fitted on the first {result.fit_fraction:.0%}",
        )
    if verdict.valid or (f is not None and result.forecast_verdict.valid):
        extrapolation_key(ax)
    ax.set_xlabel(ENTROPY_LABEL)
    ax.set_ylabel("validation accuracy R")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)


def _forecast_panel(ax: Axes, result: RunAnalysis) -> None:
    f, first = result.forecast, result.forecast_first_step
    ax.plot(result.law_steps, result.law_accuracy, "o", ms=4, color="C0", label="measured")
    ax.axvspan(first, first + f.n_fit - 1, color="C1", alpha=0.12, label="fit part")
    if result.forecast_verdict.valid:
        ax.plot(
            f.steps_rest + first,
            f.predicted,
            "--",
            color="C1",
            lw=1.5,
            label="forecast from the law fitted on the first part",
        )
        title = f"forecast RMSE {f.rmse:.4f}, final-step error {f.final_error:+.4f}"
    else:
        title = "no forecast: the law does not hold on the first part"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy R")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)


def _law_figure(result: RunAnalysis, path: Path) -> Path:
    f = result.forecast
    fig = Figure(figsize=(12, 4.6) if f else (6.5, 4.6), layout="constrained")
    axes = fig.subplots(1, 2 if f else 1, squeeze=False)[0]
    _law_panel(axes[0], result)
    if f is not None:
        _forecast_panel(axes[1], result)
    return save_figure(fig, path)


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
    ax.set_xlabel(f"predicted entropy change, nats ({d.x_key})")
    ax.set_ylabel(f"measured entropy change, nats ({d.y_key})")
    ax.set_title(f"Pearson r = {d.r:.3f} over {d.x.size} steps", fontsize=10)
    ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


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
    ax.set_ylabel("mean token entropy (nats)")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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


def _law_html(result: RunAnalysis, out: Path) -> str:
    law, ci, verdict = result.law, result.law_intervals, result.law_verdict
    kind, sentence = verdict_text(verdict, "this run")
    text = paragraph(sentence, kind)
    if verdict.valid:
        text += (
            f"<p>R = -a&middot;exp(H) + b fitted on {law.n} evaluations; predicted ceiling "
            f"b - a = <b>{law.ceiling:.4f}</b> (the accuracy at entropy 0, extrapolated from the "
            f"lowest entropy fitted, {ci.entropy_low:.3g} nats), 95% bootstrap interval "
            f"[{ci.ceiling.low:.4f}, {ci.ceiling.high:.4f}] ({ci.a_samples.size} resamples of "
            "the points).</p>"
        )
        keys = ("a", "b", "ceiling", "r2", "rmse", "n")
    else:
        text += paragraph(
            "The least-squares numbers below are for the record; analysis.json holds them "
            "with law.valid = false and the reasons."
        )
        keys = ("a", "b", "r2", "rmse", "n")
    text += paragraph(_smooth_note(result.smooth))
    if result.interpolated:
        text += paragraph(
            f"{result.interpolated} evaluations fell on steps without a logged entropy; their "
            "entropy is interpolated between the neighbouring logged steps."
        )
    img = embed_png(_law_figure(result, out / "law.png"), "accuracy against entropy")
    rows = [[k, law.to_dict()[k], *_bounds(getattr(ci, k, None))] for k in keys]
    return text + img + html_table(["", "value", "95% low", "95% high"], rows)


def _forecast_html(result: RunAnalysis) -> str:
    f, first, verdict = result.forecast, result.forecast_first_step, result.forecast_verdict
    part = (
        f"steps {first}-{first + f.n_fit - 1} (the first {result.fit_fraction:.0%} of the run, "
        f"{f.fit.n} evaluations)"
    )
    if not verdict.valid:
        return paragraph(
            f"No forecast: the law fitted on {part} does not hold there: "
            f"{'; '.join(verdict.reasons)}. Its numbers are in analysis.json (forecast.valid = "
            "false).",
            "omitted",
        )
    error = result.forecast_error.error
    return (
        f"<p>Law fitted on {part}: a = {f.fit.a:.4g}, b = {f.fit.b:.4g}, and applied to the "
        f"entropy of the {f.steps_rest.size} later evaluations: RMSE <b>{f.rmse:.4f}</b>, error at "
        f"the last one (step {int(f.steps_rest[-1]) + first}) <b>{f.final_error:+.4f}</b> "
        f"(predicted - measured; 95% bootstrap interval over the fit points "
        f"[{error.low:+.4f}, {error.high:+.4f}]). The right panel of the figure above draws "
        "it.</p>" + paragraph(verdict_text(verdict, "the first part")[1], "holds")
    )


def _covariance_html(result: RunAnalysis, out: Path) -> str:
    run = result.run
    rows = [[r["group"], r["mean"], r["first"], r["last"], r["n"]] for r in result.covariance]
    figure, _ = covariance_figure({run.name: [run]}, {run.name: "C0"}, out / "covariance.png")
    return (
        "<p>Mean token covariance cov = (log p - mean)(A - mean) of the tokens with the largest "
        "covariance in each group (top x% of the valid tokens).</p>"
        + embed_png(figure, "covariance groups against the step")
        + html_table(["group", "mean over steps", "first step", "last step", "steps"], rows)
    )


def _section_html(result: RunAnalysis, section: str, out: Path) -> str:
    title = f"<h2>{_TITLES[section]}</h2>"
    if section in result.omitted:
        return title + paragraph(f"Omitted: {result.omitted[section]}", "omitted")
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
        return title + _law_html(result, out)
    if section == "forecast":
        return title + _forecast_html(result)
    if section == "dynamics":
        d = result.dynamics
        img = embed_png(_dynamics_figure(result, out / "dynamics.png"), "covariance vs change")
        return (
            f"{title}<p>Per step, the first-order entropy change predicted by the token "
            f"covariance (x = <code>{html.escape(d.x_key)}</code>) against the entropy "
            f"change measured on the same rollouts after the update (y = "
            f"<code>{html.escape(d.y_key)}</code>). Pearson correlation <b>{d.r:.3f}</b> over "
            f"{d.x.size} steps.</p>{img}"
        )
    if section == "covariance":
        return title + _covariance_html(result, out)
    if section == "position_entropy":
        img = embed_png(
            _position_figure(result, out / "position_entropy.png"), "entropy vs position"
        )
        return (
            f"{title}<p>Mean entropy of the sampled tokens in ten equal bins of relative "
            f"position t/L, from the saved rollout samples.</p>{img}"
        )
    p = result.perplexity.to_dict()
    img = embed_png(_perplexity_figure(result, out / "perplexity.png"), "perplexity box plot")
    rows = [
        [side, p[side]["n"], p[side]["mean"], p[side]["median"], p[side]["q1"], p[side]["q3"]]
        for side in ("positive", "negative")
    ]
    return (
        f"{title}<p>Per response exp(-mean token log-prob) under the rollout policy, split by "
        f"the sign of its advantage ({p['zero_advantage']} responses with advantage 0 left "
        f"out).</p>{img}" + html_table(["advantage", "n", "mean", "median", "q1", "q3"], rows)
    )


def _source_html(result: RunAnalysis) -> str:
    run, keys = result.run, result.run.keys
    rows = [
        ["format", run.table.format],
        ["read by", run.table.reader],
        ["source", str(run.table.source)],
        ["entropy", keys.entropy],
        ["accuracy", ", ".join(keys.accuracy) or None],
        ["reward", keys.reward],
        ["steps", f"{int(run.steps[0])}-{int(run.steps[-1])} ({run.steps.size} logged)"],
    ]
    notes = "".join(paragraph(n) for n in (*run.table.notes, *keys.notes))
    flags = "".join(paragraph(f"Warning: {flag}.", "flag") for flag in result.flags)
    final = result.final()
    finals = [[k, v["step"] if v else None, v["value"] if v else None] for k, v in final.items()]
    return (
        html_table(["run", run.name], rows)
        + notes
        + flags
        + "<h2>Final values</h2>"
        + html_table(["metric", "step", "value"], finals)
    )


def _default_out(run: Path) -> Path:
    return run / "analysis" if run.is_dir() else run.parent / f"{run.stem}_analysis"


def analyze_run(
    run: str | Path,
    out: str | Path | None = None,
    *,
    fit_fraction: float = 0.15,
    smooth: int = 1,
    entropy_key: str | None = None,
    accuracy_key: str | None = None,
    criteria: LawCriteria | None = None,
) -> Path:
    """Analyse one run (any format of `entroprl.analysis.foreign`) and write its report; returns
    the path of report.html. `out` defaults to RUN/analysis (RUN_STEM_analysis beside a log file);
    `smooth` is the window of `runs.smooth_performance` (1: the performance as logged);
    `criteria` say when the law is taken to hold (`law.LawCriteria`, its defaults when None).

    Raises ValueError when the run cannot be read or nothing in it can be mapped; a section the
    run lacks the inputs for is omitted with its reason, in the HTML and in analysis.json.
    """
    run = Path(run)
    out = Path(out) if out is not None else _default_out(run)
    result = analyze(
        load_run(run, entropy_key=entropy_key, accuracy_key=accuracy_key),
        fit_fraction=fit_fraction,
        smooth=smooth,
        criteria=criteria,
    )
    make_dir(out)
    body = [
        _source_html(result),
        "<h2>Entropy, accuracy and reward</h2>",
        embed_png(_curves_figure(result, out / "curves.png"), "entropy, accuracy, reward"),
    ]
    body += [_section_html(result, section, out) for section in _TITLES]
    write_json(out / "analysis.json", result.to_dict())
    report = out / "report.html"
    atomic_write_text(report, html_page(f"entroprl analysis: {result.run.name}", "".join(body)))
    return report
