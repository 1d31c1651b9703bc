"""`entroprl compare`: several runs, in any format `entroprl.analysis.foreign` reads, in one
self-contained HTML report grouped by method.

    compare RUNS ->  OUT/report.html, OUT/compare.png, OUT/covariance.png, OUT/comparison.json
                     (and OUT/pooled_law.png with --pool)

A method is a group of runs (its seeds): a run belongs to the method named by the folder that
holds it when its own name is a seed's (seed_3, seed-3, seed3: the demo's METHOD/seed_K), or when
the runs compared come from several folders and this one holds several of them; any other run is
a method of its own (`group`). Runs are labelled METHOD/RUN, share their method's colour, and
each series is drawn as the mean over the method's runs with its 95% t band
(`runs.seed_band`). A section a run lacks is left out for that run, with a note.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from entroprl.analysis.law import LawCriteria, forecast_error_interval, judge_law, law_intervals
from entroprl.analysis.report import (
    ENTROPY_LABEL,
    ci_text,
    covariance_figure,
    draw_law,
    draw_method,
    embed_png,
    extrapolation_key,
    html_page,
    html_table,
    paragraph,
    save_figure,
    verdict_text,
    write_json,
)
from entroprl.analysis.runs import Run, RunAnalysis, analyze, law_arrays, load_run
from entroprl.errors import InputError
from entroprl.train.rundir import atomic_write_text, make_dir

_SEED = re.compile(r"seed[_-]?\d+", re.IGNORECASE)
_NOTED_SECTIONS = ("stages", "law", "forecast", "covariance")
"""The sections of a run whose absence the comparison notes (the others are in its own report)."""


@dataclass(frozen=True)
class Member:
    """A run's label in the report and the method it belongs to."""

    label: str
    method: str


def group(paths: list[Path]) -> list[Member]:
    """The label and method of each run (see the module docstring): METHOD/RUN for a run of the
    method METHOD, else its own name; a label taken twice gets its folder, then " #2", " #3"."""
    bases = [path.name if path.is_dir() else path.stem for path in paths]
    folders = [path.resolve().parent for path in paths]
    several = len(set(folders)) > 1
    members: list[Member] = []
    for base, folder in zip(bases, folders, strict=True):
        shared = folders.count(folder) > 1
        method = None  # a method of its own, named by its label
        if _SEED.fullmatch(base) or (several and shared):
            label, method = f"{folder.name}/{base}", folder.name
        else:
            label = base if bases.count(base) == 1 else f"{folder.name}/{base}"
        unique, k = label, 2
        while unique in {m.label for m in members}:
            unique, k = f"{label} #{k}", k + 1
        members.append(Member(label=unique, method=method or unique))
    return members


def _colors(members: list[Member]) -> dict[str, str]:
    methods = list(dict.fromkeys(m.method for m in members))
    return {method: f"C{i % 10}" for i, method in enumerate(methods)}


def _by_method(members: list[Member], results: list[RunAnalysis]) -> dict[str, list[RunAnalysis]]:
    methods: dict[str, list[RunAnalysis]] = {}
    for member, result in zip(members, results, strict=True):
        methods.setdefault(member.method, []).append(result)
    return methods


def _law_panel(ax: Axes, methods: dict[str, list[RunAnalysis]], colors: dict[str, str]) -> int:
    """Every run's evaluations, and its law where it holds; returns how many runs' laws do not."""
    invalid = 0
    for method, results in methods.items():
        for result in results:
            if result.law is None:
                continue
            color = colors[method]
            ax.scatter(result.law_entropy, result.law_accuracy, s=10, color=color, alpha=0.5)
            if not result.law_verdict.valid:
                invalid += 1
                continue
            ci = result.law_intervals
            label = f"{result.run.name}: ceiling {result.law.ceiling:.3f}"
            draw_law(ax, result.law, ci.entropy_low, ci.entropy_high, color=color, label=label)
    if len(ax.get_lines()) > 0:
        extrapolation_key(ax)
    return invalid


def _compare_figure(
    methods: dict[str, list[RunAnalysis]], colors: dict[str, str], path: Path
) -> tuple[Path, list[str]]:
    """Entropy and accuracy against the step (per method: runs thin, mean and band bold), and the
    law of each run where it holds. Returns the figure and notes on what is missing."""
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    ent, acc, law = fig.subplots(1, 3)
    notes = []
    for ax, key in ((ent, "entropy"), (acc, "accuracy")):
        for method, results in methods.items():
            runs = [r.run for r in results]

            def values(run: Run, key: str = key) -> np.ndarray:
                return run.series[key]

            why = draw_method(ax, runs, values, colors[method], method)
            if why is not None:
                notes.append(f"{method}, {key}: {why}")
    invalid = _law_panel(law, methods, colors)
    for ax, ylabel, xlabel in (
        (ent, ENTROPY_LABEL, "step"),
        (acc, "validation accuracy", "step"),
        (law, "validation accuracy", ENTROPY_LABEL),
    ):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    title = "law R = -a exp(H) + b of each run where it holds"
    law.set_title(title + (f"\n(not in {invalid} runs)" if invalid else ""), fontsize=10)
    return save_figure(fig, path), notes


def _summary(result: RunAnalysis, member: Member) -> dict[str, Any]:
    data = result.to_dict()
    forecast = data.get("forecast")
    return {
        "name": member.label,
        "method": member.method,
        "path": str(result.run.path),
        "format": result.run.table.format,
        "reader": result.run.table.reader,
        "final": data["final"],
        "flags": data["flags"],
        "law": data.get("law"),
        "forecast": (
            {k: forecast[k] for k in ("valid", "reasons", "fit_steps", "rmse", "final_error")}
            if forecast
            else None
        ),
        "plateau_start_step": result.plateau_step,
        "omitted": data["omitted"],
    }


def _runs_table(summaries: list[dict[str, Any]]) -> str:
    head = ["run", "method", "format", "last step", "entropy", "accuracy", "reward"]
    head += ["law holds", "law a", "law R²", "ceiling", "forecast final error", "plateau from step"]
    rows = []
    for s in summaries:
        final, law, fc = s["final"], s["law"] or {}, s["forecast"] or {}
        holds = {True: "yes", False: "no"}.get(law.get("valid"))
        rows.append(
            [s["name"], s["method"], s["format"], max(v["step"] for v in final.values() if v)]
            + [final[k]["value"] if final[k] else None for k in ("entropy", "accuracy", "reward")]
            + [holds, law.get("a"), law.get("r2"), law.get("ceiling") if holds == "yes" else None]
            + [fc.get("final_error") if fc.get("valid") else None, s["plateau_start_step"]]
        )
    return html_table(head, rows)


def _run_notes(summaries: list[dict[str, Any]]) -> str:
    """Per run, in one paragraph each: why its law and forecast are not given, which sections it
    lacks, and the flags on its log."""
    text = ""
    for s in summaries:
        law, fc, name = s["law"], s["forecast"], s["name"]
        why = []
        if law and not law["valid"]:
            why.append(f"the law does not hold: {'; '.join(law['reasons'])}.")
        if fc and not fc["valid"]:
            why.append(
                f"No forecast, the law does not hold on its first part: {'; '.join(fc['reasons'])}."
            )
        lacks = [f"{k} ({v})" for k, v in s["omitted"].items() if k in _NOTED_SECTIONS]
        if lacks:
            why.append(f"Left out: {'; '.join(lacks)}.")
        if why:
            text += paragraph(f"{name}: {' '.join(why)}", "omitted")
        text += "".join(paragraph(f"{name}: {flag}.", "flag") for flag in s["flags"])
    return text


def _pooled(results: list[RunAnalysis], fit_fraction: float, criteria: LawCriteria) -> dict:
    """The law on the points of `results` together (`law.law_intervals`) and the pooled
    forecast (`law.forecast_error_interval`), each judged (`law.judge_law`), or None with a reason
    when it cannot be fitted."""
    pool: dict[str, Any] = {"runs": [r.run.name for r in results], "law": None, "forecast": None}
    arrays = []
    for result in results:
        try:
            arrays.append(law_arrays(result)[1:3])
        except ValueError as e:
            pool.setdefault("left_out", []).append(f"{result.run.name}: {e}")
    if not arrays:
        pool["omitted"] = "no run of this method has an entropy and an accuracy"
        return pool
    try:
        h, r = np.concatenate([h for h, _ in arrays]), np.concatenate([r for _, r in arrays])
        pool["points"] = (h[~np.isnan(r)], r[~np.isnan(r)])
        pool["law"] = law_intervals(arrays)
        pool["verdict"] = judge_law(pool["law"], criteria)
        pool["forecast"] = forecast_error_interval(arrays, fit_fraction=fit_fraction)
        pool["forecast_verdict"] = judge_law(pool["forecast"].law, criteria)
    except ValueError as e:
        pool["omitted"] = str(e)
    return pool


def _pool_dict(pool: dict[str, Any]) -> dict[str, Any]:
    law, fc = pool["law"], pool["forecast"]
    out: dict[str, Any] = {"runs": pool["runs"], "law": None, "forecast": None}
    if law is not None:
        out["law"] = {**pool["verdict"].to_dict(), **law.to_dict()}
    if fc is not None:
        verdict = pool["forecast_verdict"].to_dict()
        out["forecast"] = {
            **verdict,
            "fit": fc.law.fit.to_dict(),
            "final_error": fc.error.to_dict(),
        }
    return out | {k: pool[k] for k in ("omitted", "left_out") if k in pool}


def _pooled_figure(pools: dict[str, dict[str, Any]], colors: dict[str, str], path: Path) -> Path:
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    for name, pool in pools.items():
        law, color = pool["law"], colors[name]
        if law is None:
            continue
        h, r = pool["points"]
        ax.scatter(h, r, s=10, color=color, alpha=0.45)
        if not pool["verdict"].valid:
            ax.scatter([], [], s=10, color=color, label=f"{name}: the law does not hold")
            continue
        grid = np.linspace(0.0, law.entropy_high, 100)
        low, high = law.band(grid)
        ax.fill_between(grid, low, high, color=color, alpha=0.2, lw=0)
        c = law.ceiling
        label = f"{name} ({law.runs} runs): ceiling {c.estimate:.3f} [{c.low:.3f}, {c.high:.3f}]"
        draw_law(ax, law.fit, law.entropy_low, law.entropy_high, color=color, label=label)
    if any(p["law"] is not None and p["verdict"].valid for p in pools.values()):
        extrapolation_key(ax)
    ax.set_xlabel(ENTROPY_LABEL)
    ax.set_ylabel("validation accuracy R")
    ax.set_title("law fitted on each method's points; band: 95% bootstrap", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _pool_row(name: str, pool: dict[str, Any]) -> list[Any]:
    law, fc = pool["law"], pool["forecast"]
    if law is None:
        return [name, len(pool["runs"]), None, None, None, None, None, None, None, pool["omitted"]]
    valid = pool["verdict"].valid
    forecast = pool.get("omitted", "no forecast: the law does not hold on the first parts")
    if fc is not None and pool["forecast_verdict"].valid:
        forecast = ci_text(fc.error)
    return [
        name,
        len(pool["runs"]),
        law.fit.n,
        "yes" if valid else "no",
        ci_text(law.a),
        ci_text(law.b),
        ci_text(law.ceiling) if valid else None,
        law.fit.r2,
        law.entropy_high - law.entropy_low,
        forecast,
    ]


def _pooled_html(pools: dict[str, dict[str, Any]], colors: dict[str, str], out: Path) -> str:
    head = ["method", "runs", "points", "law holds", "a", "b", "ceiling", "R²"]
    head += ["entropy range (nats)", "forecast final error"]
    rows = [_pool_row(name, pool) for name, pool in pools.items()]
    verdicts = ""
    for name, pool in pools.items():
        for key, subject in (("verdict", "its pooled points"), ("forecast_verdict", "")):
            if key in pool:
                kind, text = verdict_text(pool[key], subject or "the pooled first parts")
                verdicts += paragraph(f"{name}: {text}", kind)
        verdicts += "".join(
            paragraph(f"{name}: left out {x}", "omitted") for x in pool.get("left_out", [])
        )
    img = embed_png(_pooled_figure(pools, colors, out / "pooled_law.png"), "pooled law fits")
    return (
        "<h2>Law fitted on each method's runs together</h2><p>The runs of one method (its seeds) "
        "are pooled: R = -a&middot;exp(H) + b fitted on all their evaluations together, with 95% "
        "percentile intervals over 1000 bootstrap resamples of the points. The forecast is fitted "
        "on the pooled first part of each run and its error is the mean over the runs of "
        "(predicted - measured) at their last evaluation. A ceiling and a forecast are given only "
        "where the law holds.</p>" + img + html_table(head, rows) + verdicts
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
    criteria: LawCriteria | None = None,
) -> Path:
    """Draw the entropy, accuracy, covariance groups and law fits of several runs (any formats)
    by method (see the module docstring) and tabulate their final metrics and law fits; returns
    the path of OUT/report.html (beside it compare.png, covariance.png when a run logs the
    covariance, and comparison.json). The key, `smooth` and `criteria` options apply to every
    run. With `pool`, the runs of each method are also fitted together (`_pooled`), drawn with
    their bootstrap band in pooled_law.png, and tabulated with their verdicts.

    Raises ValueError on no runs or a run that cannot be read; a run in which no entropy or
    accuracy is recognised is kept, with a note, for what it has.
    """
    if not runs:
        raise InputError("compare needs at least one run")
    paths = [Path(r) for r in runs]
    members = group(paths)
    criteria = criteria or LawCriteria()
    results = [
        analyze(
            load_run(
                p, entropy_key=entropy_key, accuracy_key=accuracy_key, name=m.label, require=False
            ),
            fit_fraction=fit_fraction,
            smooth=smooth,
            criteria=criteria,
        )
        for p, m in zip(paths, members, strict=True)
    ]
    out = Path(out)
    make_dir(out)
    colors = _colors(members)
    methods = _by_method(members, results)
    summaries = [_summary(r, m) for r, m in zip(results, members, strict=True)]
    figure, notes = _compare_figure(methods, colors, out / "compare.png")
    cov_runs = {method: [r.run for r in rs] for method, rs in methods.items()}
    cov_figure, cov_notes = covariance_figure(cov_runs, colors, out / "covariance.png")
    body = embed_png(figure, "entropy, accuracy and law of the runs by method")
    body += "".join(paragraph(f"Left out of the figure: {n}.") for n in notes)
    if cov_figure is not None:
        body += "<h2>Covariance groups over the steps</h2>" + embed_png(
            cov_figure, "covariance groups against the step, by method"
        )
        body += "".join(paragraph(f"Left out of the figure: {n}.") for n in cov_notes)
    body += "<h2>Final metrics and law fits</h2>" + _runs_table(summaries) + _run_notes(summaries)
    data: dict[str, Any] = {"fit_fraction": fit_fraction, "smooth": smooth, "runs": summaries}
    if pool:
        pools = {name: _pooled(rs, fit_fraction, criteria) for name, rs in methods.items()}
        body += _pooled_html(pools, colors, out)
        data["pools"] = {name: _pool_dict(p) for name, p in pools.items()}
    write_json(out / "comparison.json", data)
    report = out / "report.html"
    title = f"entroprl comparison of {len(results)} runs, {len(methods)} methods"
    atomic_write_text(report, html_page(title, body))
    return report
