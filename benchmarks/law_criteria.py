"""The measurements behind `law.LawCriteria` (algorithms.md §9.5): how the bootstrap interval of the
law's slope and the forecast's error interval behave with few points, and how often the verdict
says the law holds when it does and when it does not.

    python benchmarks/law_criteria.py [--sims 400] [--resamples 500] [--demo RUNS]

Simulated runs: entropy H = 0.15 + 0.85 exp(-t/40) over 200 steps, accuracy R = -a exp(H) + 0.9
plus normal noise of sd 0.03, evaluated at n evenly spaced steps (the law) or at n steps of the
first 30 (the 15% forecast, whose error is read at step 200). Per n it prints, over `--sims` seeded
runs: how often a's 95% percentile interval holds the true a = 0.3; how often the verdict (with
the point floor lowered to 4 so that every n is judged on its interval alone) says the law holds
when a = 0 and when a = 0.1; how often the forecast's interval holds the true accuracy at step
200. With `--demo RUNS` (the folder `entroprl demo` wrote), it also prints each run's step-to-step
entropy noise on its last 60 steps (the sd of first differences over sqrt(2)).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from entroprl.analysis.law import LawCriteria, forecast_error_interval, judge_law, law_intervals

STEPS = 200
FLOOR = LawCriteria(min_points=4)


def entropy(t: np.ndarray) -> np.ndarray:
    return 0.15 + 0.85 * np.exp(-t / 40)


def law_rates(n: int, sims: int, resamples: int, rng: np.random.Generator) -> dict[str, float]:
    t = np.linspace(0, STEPS, n)
    h = entropy(t)
    covered = holds_null = holds_weak = 0
    for k in range(sims):
        noise = 0.03 * rng.standard_normal(n)
        law = law_intervals([(h, -0.3 * np.exp(h) + 0.9 + noise)], resamples=resamples, seed=k)
        covered += law.a.low <= 0.3 <= law.a.high
        null = law_intervals([(h, 0.6 + noise)], resamples=resamples, seed=k)
        holds_null += judge_law(null, FLOOR).valid
        weak = law_intervals([(h, -0.1 * np.exp(h) + 0.9 + noise)], resamples=resamples, seed=k)
        holds_weak += judge_law(weak, FLOOR).valid
    return {"a covered": covered, "holds, a=0": holds_null, "holds, a=0.1": holds_weak}


def forecast_coverage(n: int, sims: int, resamples: int, rng: np.random.Generator) -> int:
    t = np.arange(STEPS + 1)
    h = entropy(t)
    truth = -0.3 * np.exp(h) + 0.9
    fit_steps = np.round(np.linspace(0, 29, n)).astype(int)
    covered = 0
    for k in range(sims):
        r = np.full(STEPS + 1, np.nan)
        r[fit_steps] = truth[fit_steps] + 0.03 * rng.standard_normal(n)
        r[STEPS] = truth[STEPS] + 0.03 * rng.standard_normal()
        pooled = forecast_error_interval([(h, r)], min_points=2, resamples=resamples, seed=k)
        # the interval of the prediction at the last step: the error's interval plus the actual
        low, high = pooled.error.low + r[STEPS], pooled.error.high + r[STEPS]
        covered += low <= truth[STEPS] <= high
    return covered


def demo_noise(folder: Path) -> None:
    print("\n| run | entropy noise (nats) |\n|---|---:|")
    for metrics in sorted(folder.glob("*/seed_*/metrics.jsonl")):
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        h = np.array(
            [r["actor/entropy_seq_mean"] for r in records if "actor/entropy_seq_mean" in r]
        )
        noise = np.std(np.diff(h[-60:])) / np.sqrt(2)
        print(f"| {metrics.parent.parent.name}/{metrics.parent.name} | {noise:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sims", type=int, default=400)
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--points", type=int, nargs="+", default=[3, 4, 5, 6, 8, 10, 15, 20, 30])
    parser.add_argument("--demo", type=Path, default=None, help="an `entroprl demo` folder")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{args.sims} simulated runs per row, {args.resamples} resamples each\n")
    print("| points | a's interval holds a | holds, a = 0 | holds, a = 0.1 | forecast holds R |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.points:
        rates = law_rates(n, args.sims, args.resamples, rng)
        fc = forecast_coverage(n, args.sims, args.resamples, rng)
        cells = [rates["a covered"], rates["holds, a=0"], rates["holds, a=0.1"], fc]
        print(f"| {n} | " + " | ".join(f"{c / args.sims:.2f}" for c in cells) + " |", flush=True)
    if args.demo is not None:
        demo_noise(args.demo)


if __name__ == "__main__":
    main()
