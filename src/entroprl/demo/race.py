"""`entroprl demo`: entropy collapse under GRPO, and the entropy-control methods against it, on a
CPU.

One warm-started tiny model (cached after the first run), then GRPO and the chosen methods (by
default Clip-Cov and KL-Cov; `METHODS` lists all) from that start, each with several seeds and the
same budget, run as parallel processes. One seed's margins
are of the size of the numerical noise (docs/demo.md), so the table gives every method's mean over
seeds with its 95% t interval, and each method's paired (same seed) difference to GRPO;
`summary.json` holds the per-seed values next to them, and the comparison report the law fitted
on the pooled points of each method's seeds, with bootstrap intervals.

A rerun into the same folder reuses each seed that finished with the same settings (`RESULT`
records them) and trains the others afresh; the summary and the comparison of the run before are
deleted first and written again only once every seed of this run is in, so that they never mix
the seeds of two runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from entroprl import __version__
from entroprl.analysis.law import judge_law, law_intervals
from entroprl.analysis.stats import paired_interval, t_interval
from entroprl.config import config_from_dict
from entroprl.errors import InputError, Interrupted
from entroprl.train.rundir import atomic_write_text, lock_directory, make_dir, read_metrics

METHODS: dict[str, dict[str, Any]] = {
    "grpo": {"algorithm": {"policy_loss": "ppo"}},
    "clip_cov": {"algorithm": {"policy_loss": "clip_cov"}},
    "kl_cov": {"algorithm": {"policy_loss": "kl_cov"}},
    "entropic": {"algorithm": {"policy_loss": "entropic"}},
    "ce_gppo": {"algorithm": {"policy_loss": "ce_gppo"}},
    "qae": {"algorithm": {"advantage": "qae"}},
    "passk": {"algorithm": {"advantage": "passk"}},
}
"""Each method's overrides of the demo configuration (whose `algorithm.loss` and
`algorithm.advantage_settings` hold their settings); every other value is GRPO's."""
DEFAULT_METHODS = ("grpo", "clip_cov", "kl_cov", "passk")
"""What `entroprl demo` runs without --methods: GRPO, the covariance methods and pass@k training,
the one new method of docs/demo.md's race that kept more entropy than GRPO (12 runs, within 10
minutes on 2 cores)."""
BASELINE = "grpo"


def parse_methods(text: str) -> tuple[str, ...]:
    """`grpo,clip_cov,...` as a tuple of known method names, in the order given, each once."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise InputError(
            f"--methods: unknown method(s) {unknown or text!r}; known: {', '.join(METHODS)}"
        )
    return names


END_STEPS = 20
"""A run's end values average steps T - END_STEPS to T of a T-step run: the rollout entropy of
21 batches and the 3 evaluations there (every 10 steps). One batch, or one evaluation on 300
problems, carries noise of the size of the differences between the methods (the pass@8 of one
evaluation has a binomial sd of about 0.03); the end of a 200-step run changes little in 20."""
METRICS = (
    "entropy_start",
    "entropy_end",
    "entropy_drop",
    "accuracy_start",
    "accuracy_end",
    "accuracy_gain",
    "pass_at_k_end",
)
"""Per-run values given a mean and interval over seeds (and the terminal table's columns)."""
RESULT = "demo_result.json"
"""Written into a seed's folder once it is trained and analysed: the settings it ran with and its
summary, which a rerun with the same settings reuses."""


def demo_config() -> dict[str, Any]:
    """The packaged demo configuration (`entroprl/configs/demo.yaml`)."""
    text = resources.files("entroprl").joinpath("configs/demo.yaml").read_text()
    return yaml.safe_load(text)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _mean_of(records: list[dict[str, Any]], key: str | None) -> float | None:
    values = [r[key] for r in records if key is not None and r.get(key) is not None]
    return sum(values) / len(values) if values else None


def summarize_run(run: Path) -> dict[str, Any]:
    """Start and end entropy and accuracy of a run, and the law fitted on its evaluation steps
    with its verdict (`law.judge_law`: "valid" and "reasons"; the ceiling is not a prediction
    where it does not hold).

    The start is the first step's rollout entropy and the evaluation before training; the end
    values average steps T - `END_STEPS` to T (`end_steps`; never step 0), see `END_STEPS`.
    """
    records = read_metrics(run / "metrics.jsonl")
    acc_key = next(k for k in records[0] if k.startswith("val-core/") and "/mean@" in k)
    pass_key = next((k for k in records[-1] if k.startswith("val-core/") and "/pass@" in k), None)
    trained = [r for r in records if r.get("actor/entropy_seq_mean") is not None]
    pairs = [
        (r["actor/entropy_seq_mean"], r[acc_key]) for r in trained if r.get(acc_key) is not None
    ]
    last = trained[-1]["step"]
    first_end = max(1, last - END_STEPS)
    end = [r for r in records if r["step"] >= first_end]
    summary = {
        "entropy_start": trained[0]["actor/entropy_seq_mean"],
        "entropy_end": _mean_of(end, "actor/entropy_seq_mean"),
        "accuracy_start": records[0][acc_key],
        "accuracy_end": _mean_of(end, acc_key),
        "pass_at_k_end": _mean_of(end, pass_key),
        "pass_at_k": pass_key.rsplit("/", 1)[-1] if pass_key else None,
        "steps": last,
        "end_steps": [first_end, last],
    }
    try:
        law = law_intervals([([h for h, _ in pairs], [r for _, r in pairs])])
        verdict = judge_law(law)
        fit = law.fit
        summary["law"] = {"a": fit.a, "b": fit.b, "r2": fit.r2, "ceiling": fit.ceiling}
        summary["law"] |= {"valid": verdict.valid, "reasons": list(verdict.reasons)}
    except ValueError as e:
        summary["law"] = {"a": None, "b": None, "r2": None, "ceiling": None, "error": str(e)}
        summary["law"] |= {"valid": False, "reasons": [str(e)]}
    return summary


def _interval(values) -> dict[str, Any] | None:
    """The t interval of per-seed values as a dict; None when a value is missing or there is one."""
    if len(values) < 2 or any(v is None for v in values):
        return None
    return t_interval(values).to_dict()


def _per_seed(runs: dict[int, dict[str, Any]], key: str) -> list[Any]:
    return [runs[seed][key] for seed in sorted(runs)]


def _derived(summary: dict[str, Any]) -> dict[str, Any]:
    """The quantities docs/demo.md claims are about, from one run's summary."""
    return {
        **summary,
        "entropy_drop": 1 - summary["entropy_end"] / summary["entropy_start"],
        "accuracy_gain": summary["accuracy_end"] - summary["accuracy_start"],
    }


def aggregate(runs: dict[str, dict[int, dict[str, Any]]], baseline: str = BASELINE) -> dict:
    """Per method the per-seed summaries, the mean and 95% t interval of every metric over seeds,
    and against `baseline` the paired (same seed) difference of each metric and the ratio of the
    final entropies, each with its t interval (None where fewer than 2 seeds or a value is
    missing)."""
    methods = {}
    for name, by_seed in runs.items():
        entry: dict[str, Any] = {
            "seeds": {str(seed): by_seed[seed] for seed in sorted(by_seed)},
            "mean": {key: _interval(_per_seed(by_seed, key)) for key in METRICS},
        }
        base = runs.get(baseline)
        if name != baseline and base is not None and sorted(base) == sorted(by_seed):
            vs: dict[str, Any] = {}
            for key in METRICS:
                a, b = _per_seed(by_seed, key), _per_seed(base, key)
                ok = len(a) > 1 and None not in a and None not in b
                vs[key] = paired_interval(a, b).to_dict() if ok else None
            ratios = [
                x / y
                for x, y in zip(
                    _per_seed(by_seed, "entropy_end"), _per_seed(base, "entropy_end"), strict=True
                )
            ]
            vs["entropy_end_ratio"] = _interval(ratios)
            entry[f"vs_{baseline}"] = vs
        methods[name] = entry
    return methods


def _pm(interval: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    if interval is None:
        return "-"
    return (
        f"{interval['estimate'] * scale:.{digits}f} ± {interval['half_width'] * scale:.{digits}f}"
    )


def format_table(methods: dict[str, Any], baseline: str = BASELINE) -> str:
    """Mean ± half-width of the 95% t interval over seeds per method, then each method's paired
    difference to `baseline` (same seed)."""
    first = next(iter(methods.values()))
    k = next(iter(first["seeds"].values()))["pass_at_k"] or "pass@k"
    n = len(first["seeds"])
    head = ("method", "entropy start", "entropy end", "entropy drop", "acc start", "acc end")
    head += ("acc gain", f"{k} end")
    rows = [head] + [
        (name, *(_pm(m["mean"][key]) for key in METRICS)) for name, m in methods.items()
    ]
    vs_head = ("method", "entropy end diff", f"entropy end / {baseline}", "acc end diff")
    vs_head += (f"{k} end diff",)
    vs_rows = [vs_head] + [
        (
            name,
            _pm(m[f"vs_{baseline}"]["entropy_end"]),
            _pm(m[f"vs_{baseline}"]["entropy_end_ratio"], digits=2),
            _pm(m[f"vs_{baseline}"]["accuracy_end"]),
            _pm(m[f"vs_{baseline}"]["pass_at_k_end"]),
        )
        for name, m in methods.items()
        if f"vs_{baseline}" in m
    ]
    text = (
        f"mean ± 95% t-interval half-width over {n} seeds; end: mean of steps T-{END_STEPS}..T\n"
        + _grid(rows)
    )
    if len(vs_rows) > 1:
        text += f"\n\npaired with {baseline} (same seed), mean ± 95% half-width\n" + _grid(vs_rows)
    return text


def format_law(methods: dict[str, Any]) -> str:
    """Per method, whether the law fitted on its pooled seeds holds (`law.judge_law`), with the
    numbers it rests on; the ceiling only where it holds."""
    lines = ["law R = -a exp(H) + b on each method's pooled seeds (comparison report):"]
    for name, m in methods.items():
        law = m["law"]["law"]
        if law is None:
            lines.append(f"  {name}: not fitted: {m['law'].get('omitted')}")
            continue
        checks, a = law["checks"], law["interval"]["a"]
        numbers = (
            f"a = {law['a']:.3g} [{a['low']:.3g}, {a['high']:.3g}], R² {checks['r2']:.2f}, "
            f"{checks['n']} points, entropy range {checks['entropy_span']:.3g} nats"
        )
        if law["valid"]:
            c = law["interval"]["ceiling"]
            ceiling = f"ceiling {law['ceiling']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"
            lines.append(f"  {name}: holds ({numbers}); {ceiling}")
        else:
            lines.append(f"  {name}: does not hold ({numbers}): {'; '.join(law['reasons'])}")
    return "\n".join(lines)


def _grid(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _train_and_analyze(values: dict[str, Any], threads: int) -> dict[str, Any]:
    """One demo run in a process of its own: train, write its analysis report, summarize; the
    summary is written to `RESULT` with the run's settings, last."""
    from transformers.utils import logging

    from entroprl.analysis.report import analyze_run
    from entroprl.train.trainer import Trainer

    logging.disable_progress_bar()  # one line per finished run is the demo's progress
    torch.set_num_threads(threads)
    out = Path(values["trainer"]["out_dir"])
    (out / RESULT).unlink(missing_ok=True)  # this folder's run is no longer the one it describes
    Trainer(config_from_dict(values)).train(overwrite=True)  # the demo owns its folders
    analyze_run(out, out / "analysis")
    summary = _derived(summarize_run(out))
    result = {"settings": _settings(values), "summary": summary}
    atomic_write_text(out / RESULT, json.dumps(result, indent=2))
    return summary


def _ignore_ctrl_c() -> None:
    """In a run's process: Ctrl-C reaches the whole process group, and the demo's process alone
    answers it, terminating the runs, so that none prints a traceback of its own. tqdm's lock
    is made a thread lock: its default, a multiprocessing one, would be reported as leaked by
    a terminated run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())


def _settings(values: dict[str, Any]) -> dict[str, Any]:
    """What a seed's results depend on: its configuration but where it is written and whether it
    shows progress, and the entroprl version; as JSON reads it back."""
    config = _merge(values, {"trainer": {"out_dir": None, "progress": None}})
    return json.loads(json.dumps({"entroprl": __version__, "config": config}))


def _finished(values: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of the seed `values` describe, when its folder holds that seed finished with
    the same settings; None otherwise (not run, not finished, other settings, damaged)."""
    out = Path(values["trainer"]["out_dir"])
    try:
        result = json.loads((out / RESULT).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(result, dict) or result.get("settings") != _settings(values):
        return None
    summary = result.get("summary")
    done = isinstance(summary, dict) and (out / "metrics.jsonl").is_file()
    return summary if done else None


def run_demo(
    out: Path,
    *,
    steps: int | None = None,
    methods=None,
    seeds: int = 3,
    jobs: int | None = None,
    threads: int = 1,
    warm_start_config=None,
) -> dict[str, Any]:
    """Warm start, then each of `methods` (names of `METHODS`; None: `DEFAULT_METHODS`) with
    `seeds` seeds from it, `jobs` runs at a time (default: one per `threads` cores), each in a
    process of its own on `threads` torch threads; returns the summary also written to
    summary.json. Paired differences need the baseline, grpo, among the methods. Seeds that
    finished in `out` with the same settings are reused (see the module docstring); the folder
    is locked while the demo runs."""
    if seeds < 1:
        raise InputError(f"seeds must be at least 1, got {seeds}")
    methods = DEFAULT_METHODS if methods is None else parse_methods(",".join(methods))
    if threads < 1:
        raise InputError(f"threads must be at least 1, got {threads}")
    if jobs is not None and jobs < 1:
        raise InputError(f"jobs must be at least 1, got {jobs}")
    jobs = jobs or max(1, (os.cpu_count() or 1) // threads)
    # A 133k-parameter model runs fastest on one thread: more only adds synchronisation.
    torch.set_num_threads(1)
    make_dir(out)
    with lock_directory(out):  # one demo at a time in a folder
        return _run_locked(out, steps, methods, seeds, jobs, threads, warm_start_config)


@dataclass(frozen=True)
class SeedRun:
    """One seed of one method: its run's configuration values."""

    name: str
    seed: int
    values: dict[str, Any]


def _run_locked(out, steps, methods, seeds, jobs, threads, warm_start_config) -> dict[str, Any]:
    from entroprl.demo.warmstart import WarmStartConfig, default_cache_dir, warm_start

    # the summary of a run before is not this run's: gone before any seed of this one changes
    (out / "summary.json").unlink(missing_ok=True)
    shutil.rmtree(out / "analysis", ignore_errors=True)
    t0 = time.perf_counter()
    print("warm start (supervised, cached after the first run) ...", flush=True)
    start = warm_start(warm_start_config or WarmStartConfig(), default_cache_dir())
    print(f"  warm-started model: {start} ({time.perf_counter() - t0:.0f} s)", flush=True)
    base = demo_config()
    if steps is not None:
        base = _merge(base, {"trainer": {"steps": steps}})
    # Seed-major order: the first results to come in already compare the methods.
    runs = [
        SeedRun(name, seed, _run_values(base, name, seed, start, out))
        for seed in range(seeds)
        for name in methods
    ]
    results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in methods}
    todo = []
    for run in runs:
        found = _finished(run.values)
        if found is None:
            todo.append(run)
        else:
            results[run.name][run.seed] = found
    reused = {name: sorted(results[name]) for name in methods}
    if todo != runs:
        print(
            f"reusing {len(runs) - len(todo)} runs that finished in {out} with these settings: "
            + ", ".join(f"{n} seed {s}" for n in methods for s in reused[n]),
            flush=True,
        )
    print(
        f"{len(runs)} runs ({seeds} seeds x {len(methods)} methods), {len(todo)} to train, "
        f"{jobs} at a time",
        flush=True,
    )
    _train(todo, results, jobs=jobs, threads=threads, out=out, total=len(runs), t0=t0)
    summary = {
        "seeds": list(range(seeds)),
        "confidence": 0.95,
        "jobs": jobs,
        "threads_per_run": threads,
        "steps": base["trainer"]["steps"],
        "warm_start": str(start),
        "reused": reused,
        "methods": aggregate(results),
    }
    from entroprl.analysis.comparison import compare_runs

    # The comparison pools each method's seeds (they share its folder) into one law fit.
    report = compare_runs(
        [out / name / f"seed_{s}" for name in methods for s in range(seeds)],
        out / "analysis",
        pool=True,
    )
    pools = json.loads((report.parent / "comparison.json").read_text())["pools"]
    for name in methods:
        summary["methods"][name]["law"] = pools[name]
    summary["wall_s"] = time.perf_counter() - t0
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print()
    print(format_table(summary["methods"]))
    print()
    print(format_law(summary["methods"]))
    print(f"\nsummary: {out / 'summary.json'}  (total {summary['wall_s']:.0f} s)")
    print(f"comparison report: {report}  (one per run: {out}/<method>/seed_<k>/analysis/)")
    return summary


def _train(
    todo: list[SeedRun],
    results: dict[str, dict[int, dict[str, Any]]],
    *,
    jobs: int,
    threads: int,
    out: Path,
    total: int,
    t0: float,
) -> None:
    """Train and analyse the runs `todo`, `jobs` at a time, each summary into `results` as it
    comes in; on Ctrl-C the runs still training are terminated and `Interrupted` is raised."""
    # spawn: a fresh interpreter per run (one task per child), so no state of an earlier run or of
    # the parent's torch threads reaches a run, and its numbers do not depend on the scheduling.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        jobs, mp_context=context, max_tasks_per_child=1, initializer=_ignore_ctrl_c
    ) as pool:
        futures = {pool.submit(_train_and_analyze, run.values, threads): run for run in todo}
        try:
            for done, future in enumerate(as_completed(futures), total - len(todo) + 1):
                run = futures[future]
                s = results[run.name][run.seed] = future.result()
                print(
                    f"[{done}/{total}] {run.name} seed {run.seed}: entropy "
                    f"{s['entropy_end']:.3f}, acc {s['accuracy_end']:.3f}, {s['pass_at_k']} "
                    f"{s['pass_at_k_end']:.3f} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        except KeyboardInterrupt:
            for child in multiprocessing.active_children():  # the runs still training
                child.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise Interrupted(
                f"interrupted; the runs that finished are kept in {out}, and the next demo "
                "into it with these settings reuses them"
            ) from None


def _run_values(base: dict, name: str, seed: int, start: Path, out: Path) -> dict[str, Any]:
    values = _merge(base, METHODS[name])
    return _merge(
        values,
        {
            "model": {"path": str(start)},
            "trainer": {
                "out_dir": str(out / name / f"seed_{seed}"),
                "seed": seed,
                "progress": False,
            },
        },
    )
