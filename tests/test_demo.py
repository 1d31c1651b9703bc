import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from entroprl.analysis.law import judge_law, law_intervals
from entroprl.config import config_from_dict
from entroprl.demo.race import (
    DEFAULT_METHODS,
    METHODS,
    METRICS,
    RESULT,
    _run_values,
    aggregate,
    demo_config,
    format_law,
    format_table,
    parse_methods,
    run_demo,
    summarize_run,
)
from entroprl.demo.warmstart import WarmStartConfig
from entroprl.train.rundir import read_metrics


def fake_runs() -> dict:
    """Per-seed summaries of three methods over 3 seeds, with a seed effect shared by methods."""
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 0.03, 3)
    runs = {}
    for name, ent, acc, pass8 in (
        ("grpo", 0.2, 0.22, 0.40),
        ("clip_cov", 0.4, 0.21, 0.52),
        ("kl_cov", 0.45, 0.18, 0.50),
    ):
        runs[name] = {
            seed: {
                "entropy_start": 0.6,
                "entropy_end": ent + 0.01 * rng.standard_normal(),
                "entropy_drop": 0.0,
                "accuracy_start": 0.14 + seed_effect[seed],
                "accuracy_end": acc + seed_effect[seed] + 0.005 * rng.standard_normal(),
                "accuracy_gain": 0.0,
                "pass_at_k_end": pass8 + seed_effect[seed],
                "pass_at_k": "pass@8",
            }
            for seed in range(3)
        }
    return runs


def test_aggregate_means_and_paired_differences_match_scipy():
    runs = fake_runs()
    methods = aggregate(runs)
    assert list(methods) == ["grpo", "clip_cov", "kl_cov"]
    for name, m in methods.items():
        assert m["seeds"] == {str(s): runs[name][s] for s in range(3)}
        for key in METRICS:
            x = [runs[name][s][key] for s in range(3)]
            if np.ptp(x) == 0:
                assert m["mean"][key]["half_width"] == 0
                continue
            low, high = stats.ttest_1samp(x, 0).confidence_interval(0.95)
            assert (m["mean"][key]["low"], m["mean"][key]["high"]) == pytest.approx((low, high))
    assert "vs_grpo" not in methods["grpo"]
    for name in ("clip_cov", "kl_cov"):
        vs = methods[name]["vs_grpo"]
        x = [runs[name][s]["accuracy_end"] for s in range(3)]
        y = [runs["grpo"][s]["accuracy_end"] for s in range(3)]
        low, high = stats.ttest_rel(x, y).confidence_interval(0.95)
        assert (vs["accuracy_end"]["low"], vs["accuracy_end"]["high"]) == pytest.approx((low, high))
        ratios = [runs[name][s]["entropy_end"] / runs["grpo"][s]["entropy_end"] for s in range(3)]
        assert vs["entropy_end_ratio"]["estimate"] == pytest.approx(np.mean(ratios))
    # the shared seed effect cancels in the pair: pass@8's difference is resolved
    assert methods["clip_cov"]["vs_grpo"]["pass_at_k_end"]["low"] > 0.1


def test_one_seed_has_no_interval():
    runs = {name: {0: by_seed[0]} for name, by_seed in fake_runs().items()}
    methods = aggregate(runs)
    assert methods["grpo"]["mean"]["entropy_end"] is None
    assert methods["kl_cov"]["vs_grpo"]["entropy_end_ratio"] is None
    assert "-" in format_table(methods)


def test_table_shows_mean_and_half_width():
    methods = aggregate(fake_runs())
    table = format_table(methods)
    ci = methods["clip_cov"]["vs_grpo"]["pass_at_k_end"]
    assert f"{ci['estimate']:.3f} ± {ci['half_width']:.3f}" in table
    assert "over 3 seeds" in table and "paired with grpo" in table


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    """The whole demo path on a small budget: warm start, the default methods x 2 seeds in
    parallel processes, table, summary with per-seed values and intervals, reports."""
    monkeypatch.setenv("ENTROPRL_CACHE_DIR", str(tmp_path / "cache"))
    small = WarmStartConfig(steps=30, num_problems=100, eval_problems=20)
    summary = run_demo(tmp_path / "demo", steps=3, seeds=2, warm_start_config=small)
    methods = summary["methods"]
    assert list(methods) == list(DEFAULT_METHODS)
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    for method, m in written["methods"].items():
        assert list(m["seeds"]) == ["0", "1"]
        for s in m["seeds"].values():
            for key in METRICS:
                assert isinstance(s[key], float), (method, key)
            assert s["steps"] == 3
        assert set(m["mean"]["entropy_end"]) >= {"estimate", "low", "high", "half_width"}
        assert set(m["law"]) >= {"runs", "law", "forecast"}
        for seed in (0, 1):
            report = tmp_path / "demo" / method / f"seed_{seed}" / "analysis" / "report.html"
            assert report.is_file()
    assert (tmp_path / "demo" / "analysis" / "pooled_law.png").is_file()
    out = capsys.readouterr().out
    assert format_table(methods) in out and format_law(methods) in out
    runs = 2 * len(DEFAULT_METHODS)
    assert f"[{runs}/{runs}]" in out and "comparison report:" in out


def test_end_values_average_the_last_steps(tmp_path):
    """40 steps, evaluations every 10: the end averages steps 20-40 (entropy of 21 steps, the
    evaluations at 20, 30 and 40); the start is step 1's entropy and step 0's evaluation."""
    acc, pas = "val-core/countdown/acc/mean@8", "val-core/countdown/acc/pass@8"
    lines = [{"step": 0, acc: 0.1, pas: 0.3}]
    for step in range(1, 41):
        record = {"step": step, "actor/entropy_seq_mean": 1.0 / step}
        if step % 10 == 0:
            record |= {acc: step / 100, pas: step / 50}
        lines.append(record)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    s = summarize_run(tmp_path)
    assert s["entropy_start"] == 1.0 and s["accuracy_start"] == 0.1
    assert s["entropy_end"] == pytest.approx(np.mean([1.0 / t for t in range(20, 41)]))
    assert s["accuracy_end"] == pytest.approx(0.3) and s["pass_at_k_end"] == pytest.approx(0.6)
    assert s["end_steps"] == [20, 40] and s["steps"] == 40 and s["pass_at_k"] == "pass@8"
    assert s["law"]["a"] is not None
    # 4 evaluations (10-40): the fit is kept, and so is the reason it is no prediction
    assert s["law"]["valid"] is False and s["law"]["reasons"][0].startswith("too few points: 4")


def test_the_law_lines_give_each_verdict_with_its_numbers():
    rng = np.random.default_rng(1)
    h = 0.2 + 0.5 * np.exp(-np.arange(0, 200, 10) / 50)
    holds = law_intervals([(h, -0.2 * np.exp(h) + 0.5 + 0.003 * rng.standard_normal(20))])
    flat = law_intervals([(h, 0.2 + 0.01 * rng.standard_normal(20))])
    methods = {
        name: {"law": {"law": judge_law(law).to_dict() | law.to_dict()}}
        for name, law in (("clip_cov", holds), ("grpo", flat))
    }
    methods["kl_cov"] = {"law": {"law": None, "omitted": "no usable point"}}
    lines = format_law(methods).splitlines()
    a = holds.a
    assert lines[1] == (
        f"  clip_cov: holds (a = {holds.fit.a:.3g} [{a.low:.3g}, {a.high:.3g}], "
        f"R² {holds.fit.r2:.2f}, 20 points, entropy range {h.max() - h.min():.3g} nats); "
        f"ceiling {holds.fit.ceiling:.3f} [{holds.ceiling.low:.3f}, {holds.ceiling.high:.3f}]"
    )
    assert lines[2].startswith("  grpo: does not hold (a = ") and "flat noise" in lines[2]
    assert "ceiling" not in lines[2]
    assert lines[3] == "  kl_cov: not fitted: no usable point"


def test_methods_parse_and_every_method_is_a_valid_configuration(tmp_path):
    """--methods: known names in the order given, each once; every method's configuration (the
    demo's with its overrides) validates, and differs from GRPO's where it should."""
    assert parse_methods("grpo, passk,grpo,qae") == ("grpo", "passk", "qae")
    with pytest.raises(ValueError, match=r"unknown method.*'nope'.*known: grpo, clip_cov"):
        parse_methods("grpo,nope")
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods(" , ")
    assert set(DEFAULT_METHODS) <= set(METHODS)
    configs = {
        name: config_from_dict(_run_values(demo_config(), name, 1, tmp_path, tmp_path / "out"))
        for name in METHODS
    }
    chosen = {name: (c.algorithm.policy_loss, c.algorithm.advantage) for name, c in configs.items()}
    assert chosen == {
        "grpo": ("ppo", "grpo"),
        "clip_cov": ("clip_cov", "grpo"),
        "kl_cov": ("kl_cov", "grpo"),
        "entropic": ("entropic", "grpo"),
        "ce_gppo": ("ce_gppo", "grpo"),
        "qae": ("ppo", "qae"),
        "passk": ("ppo", "passk"),
    }
    # EntroPIC's target in the demo is the law's (algorithms.md §4.9)
    assert configs["entropic"].loss_settings().target_entropy() == pytest.approx(
        math.log((0.270 - 0.9 * (0.270 - 0.046)) / 0.046)
    )
    assert all(c.trainer.seed == 1 for c in configs.values())


def test_paired_table_has_the_entropy_difference():
    table = format_table(aggregate(fake_runs()))
    assert "entropy end diff" in table.splitlines()[-4]


DEMO = """
import sys
from pathlib import Path
from entroprl.demo.race import run_demo
from entroprl.demo.warmstart import WarmStartConfig

small = WarmStartConfig(steps=30, num_problems=100, eval_problems=20)
run_demo(
    Path(sys.argv[1]),
    steps=int(sys.argv[2]),
    methods=["grpo", "clip_cov", "kl_cov"],
    seeds=1,
    jobs=1,
    warm_start_config=small,
)
"""


def _demo(out, steps: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DEMO, str(out), str(steps)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # killed with its run processes, as a closed terminal kills them
    )


def _steps_of(result: Path) -> int:
    return json.loads(result.read_text())["settings"]["config"]["trainer"]["steps"]


@pytest.mark.slow
def test_demo_rerun_reuses_finished_seeds_and_never_mixes_two_runs(tmp_path):
    """A demo of 2 steps; the same demo again reuses every run; a 3-step demo killed once its
    first run is in leaves no summary (not the 2-step one's); run again, it reuses that run,
    trains the others (the 2-step ones among them) afresh, and summarizes 3-step runs only."""
    env = os.environ | {"ENTROPRL_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "demo"
    first = _demo(out, 2, env)
    stdout, stderr = first.communicate(timeout=1800)
    assert first.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    again = _demo(out, 2, env)
    stdout, stderr = again.communicate(timeout=1800)
    assert again.returncode == 0, stderr[-3000:]
    assert "reusing 3 runs" in stdout and "0 to train" in stdout, stdout
    rerun = json.loads((out / "summary.json").read_text())
    assert rerun["methods"].keys() == summary["methods"].keys()
    for name, m in rerun["methods"].items():
        assert m["seeds"] == summary["methods"][name]["seeds"], name
    assert rerun["reused"] == {name: [0] for name in summary["methods"]}

    killed = _demo(out, 3, env)
    grpo = out / "grpo" / "seed_0" / RESULT
    while killed.poll() is None and not (grpo.is_file() and _steps_of(grpo) == 3):
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (out / "summary.json").exists() and not (out / "analysis").exists()
    assert _steps_of(out / "kl_cov" / "seed_0" / RESULT) == 2  # not trained yet: the 2-step run

    last = _demo(out, 3, env)
    stdout, stderr = last.communicate(timeout=1800)
    assert last.returncode == 0, stderr[-3000:]
    assert "reusing 1 runs" in stdout and "grpo seed 0" in stdout and "2 to train" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["reused"] == {"grpo": [0], "clip_cov": [], "kl_cov": []}
    for name, m in summary["methods"].items():
        assert m["seeds"]["0"]["steps"] == 3, name
        assert _steps_of(out / name / "seed_0" / RESULT) == 3
        assert read_metrics(out / name / "seed_0" / "metrics.jsonl")[-1]["step"] == 3


DEMO_COMMAND = """
import sys

if __name__ == "__main__":  # the runs' processes (spawn) import this file again
    import entroprl.demo.race as demo
    from entroprl import cli
    from entroprl.demo.warmstart import WarmStartConfig

    small = WarmStartConfig(steps=30, num_problems=100, eval_problems=20)
    real = demo.run_demo
    demo.run_demo = lambda out, **kw: real(out, warm_start_config=small, **kw)
    cli.main(["demo", "--out", sys.argv[1], "--steps", "40", "--seeds", "1", "--jobs", "2",
              "--methods", "grpo,clip_cov,kl_cov"])
"""


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_and_its_runs_with_one_line(tmp_path):
    """Ctrl-C (SIGINT to the whole process group) once the first run is in: `entroprl demo`
    exits 130 with one line, its runs print nothing of their own, the finished run is kept."""
    script = tmp_path / "demo_command.py"
    script.write_text(DEMO_COMMAND)
    env = os.environ | {"ENTROPRL_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "demo"
    process = subprocess.Popen(
        [sys.executable, str(script), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in process.stdout:
        if line.startswith("[1/3]"):
            break
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 130, stderr[-3000:]
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith("entroprl: interrupted; the runs that finished are kept in")
    ), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(list(out.glob(f"*/seed_0/{RESULT}"))) >= 1
    assert not (out / "summary.json").exists()
