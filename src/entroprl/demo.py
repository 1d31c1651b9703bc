"""`entroprl demo`: entropy collapse under GRPO, and Clip-Cov / KL-Cov holding entropy, on a CPU.

One warm-started tiny model (cached after the first run), then GRPO, Clip-Cov and KL-Cov from the
same start with the same seed and budget, a comparison table, `summary.json`, and the analysis
report of the three runs.
"""

from __future__ import annotations

import json
import math
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from entroprl.config import config_from_dict
from entroprl.law import fit_law
from entroprl.rundir import atomic_write_text, make_dir, read_metrics

METHODS: dict[str, dict[str, Any]] = {
    "grpo": {"algorithm": {"policy_loss": "ppo"}},
    "clip_cov": {"algorithm": {"policy_loss": "clip_cov"}},
    "kl_cov": {"algorithm": {"policy_loss": "kl_cov"}},
}


def demo_config() -> dict[str, Any]:
    """The packaged demo configuration (`entroprl/configs/demo.yaml`)."""
    text = resources.files("entroprl").joinpath("configs/demo.yaml").read_text()
    return yaml.safe_load(text)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def summarize_run(run: Path) -> dict[str, Any]:
    """Start and end entropy and accuracy of a run, and the law fitted on its evaluation steps."""
    records = read_metrics(run / "metrics.jsonl")
    acc_key = next(k for k in records[0] if k.startswith("val-core/") and "/mean@" in k)
    pass_key = next((k for k in records[-1] if k.startswith("val-core/") and "/pass@" in k), None)
    trained = [r for r in records if r.get("actor/entropy_seq_mean") is not None]
    pairs = [
        (r["actor/entropy_seq_mean"], r[acc_key]) for r in trained if r.get(acc_key) is not None
    ]
    summary = {
        "entropy_start": trained[0]["actor/entropy_seq_mean"],
        "entropy_end": trained[-1]["actor/entropy_seq_mean"],
        "accuracy_start": records[0][acc_key],
        "accuracy_end": records[-1][acc_key],
        "pass_at_k_end": records[-1][pass_key] if pass_key else None,
        "pass_at_k": pass_key.rsplit("/", 1)[-1] if pass_key else None,
        "steps": trained[-1]["step"],
    }
    try:
        law = fit_law([h for h, _ in pairs], [r for _, r in pairs])
        summary["law"] = {"a": law.a, "b": law.b, "r2": law.r2, "ceiling": law.ceiling}
    except ValueError as e:
        summary["law"] = {"a": None, "b": None, "r2": None, "ceiling": None, "error": str(e)}
    return summary


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    k = next(iter(summary.values()))["pass_at_k"] or "pass@k"
    head = (
        "method",
        "entropy start",
        "entropy end",
        "acc start",
        "acc end",
        f"{k} end",
        "law a",
        "law b",
        "law R2",
        "ceiling",
    )
    rows = [head] + [
        (
            name,
            f(s["entropy_start"]),
            f(s["entropy_end"]),
            f(s["accuracy_start"]),
            f(s["accuracy_end"]),
            f(s["pass_at_k_end"]),
            f(s["law"]["a"]),
            f(s["law"]["b"]),
            f(s["law"]["r2"]),
            f(s["law"]["ceiling"]),
        )
        for name, s in summary.items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(
    out: Path, *, steps: int | None = None, methods=tuple(METHODS), warm_start_config=None
) -> dict[str, Any]:
    """Warm start, then each method from it; returns the summary also written to summary.json."""
    from entroprl.trainer import Trainer
    from entroprl.warmstart import WarmStartConfig, default_cache_dir, warm_start

    # A 133k-parameter model runs fastest on one thread: more only adds synchronisation.
    torch.set_num_threads(1)
    make_dir(out)
    t0 = time.perf_counter()
    print("warm start (supervised, cached after the first run) ...", flush=True)
    start = warm_start(warm_start_config or WarmStartConfig(), default_cache_dir())
    print(f"  warm-started model: {start} ({time.perf_counter() - t0:.0f} s)", flush=True)
    base = demo_config()
    if steps is not None:
        base = _merge(base, {"trainer": {"steps": steps}})
    summary = {}
    for name in methods:
        values = _merge(base, METHODS[name])
        values = _merge(
            values, {"model": {"path": str(start)}, "trainer": {"out_dir": str(out / name)}}
        )
        t = time.perf_counter()
        print(f"{name}: training ...", flush=True)
        Trainer(config_from_dict(values)).train(overwrite=True)  # the demo owns its folders
        summary[name] = summarize_run(out / name)
        print(f"  {name} done in {time.perf_counter() - t:.0f} s", flush=True)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print()
    print(format_table(summary))
    from entroprl.report import analyze_run, compare_runs

    for name in methods:
        analyze_run(out / name, out / name / "analysis")
    report = compare_runs([out / m for m in methods], out / "analysis")
    print(f"\nsummary: {out / 'summary.json'}  (total {time.perf_counter() - t0:.0f} s)")
    print(f"analysis report: {report}  (one per method: {out}/<method>/analysis/report.html)")
    return summary
