"""Tests for `entroprl analyze` / `compare`: run loading, foreign logs, the analysis numbers and the
written report (issue 4). Expected numbers come from the generated curves, hand calculations,
numpy's polyfit/corrcoef or plain loops, never from the functions under test."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from matplotlib.colors import to_hex
from scipy import stats

from entroprl.analysis import comparison, report as report_module
from entroprl.analysis.comparison import compare_runs, group
from entroprl.analysis.foreign import detect_format, map_keys, read_log
from entroprl.analysis.report import analyze_run
from entroprl.analysis.runs import (
    analyze,
    covariance_table,
    law_grid,
    load_run,
    log_flags,
    pearson,
    perplexity_split,
    position_entropy,
    printed_decimals,
    read_rollouts,
    seed_band,
    smooth_performance,
)

ACC = "val-core/countdown/acc/mean@4"
GROUPS = ("top_0.02%", "top_0.2%", "top_2%", "top_20%", "top_50%", "all")


def curve(steps: int, *, start: float = 1.0, end: float = 0.15, tau: float = 10.0) -> np.ndarray:
    """Entropy per step 0..steps: a fast fall then a plateau, like the paper's runs."""
    t = np.arange(steps + 1)
    return end + (start - end) * np.exp(-t / tau)


def rollout_samples(step: int) -> list[dict]:
    """Five samples with known statistics: token entropy = 1 + t/L, log-prob -0.1 on positive,
    -0.5 on negative samples, one sample with advantage 0 (log-prob -3)."""
    out = []
    for length, adv, logp in (
        (3, 1.0, -0.1),
        (4, -1.0, -0.5),
        (5, 1.0, -0.1),
        (8, -1.0, -0.5),
        (2, 0.0, -3.0),
    ):
        t = np.arange(length)
        out.append(
            {
                "group": 0,
                "response": "x" * length,
                "reward": float(adv > 0),
                "tokens": ["x"] * length,
                "log_prob": [logp] * length,
                "entropy": (1 + t / length).tolist(),
                "advantage": [adv] * length,
                "cov": [0.0] * length,
            }
        )
    return out


def make_run(
    path: Path,
    *,
    steps: int = 100,
    a: float = 0.25,
    b: float = 0.75,
    noise: float = 0.003,
    seed: int = 0,
    eval_every: int = 1,
    dynamics: bool = True,
    rollout_steps: tuple[int, ...] = (1, 5, 60, 90),
) -> dict:
    """An entroprl run directory whose accuracy is -a*exp(H) + b plus seeded noise."""
    rng = np.random.default_rng(seed)
    h = curve(steps)
    acc = -a * np.exp(h) + b + noise * rng.standard_normal(steps + 1)
    cov_all = 0.002 * np.exp(-np.arange(steps + 1) / 15) + 1e-4
    change = -0.8 * cov_all + 2e-5 * rng.standard_normal(steps + 1)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"trainer:\n  steps: {steps}\n")
    lines = [{"step": 0, ACC: acc[0]}]
    for s in range(1, steps + 1):
        record = {
            "step": s,
            "critic/score/mean": acc[s] + 0.05,
            "actor/entropy": h[s] * 1.1,
            "actor/entropy_seq_mean": h[s],
            "train/acc": acc[s],
        }
        for i, g in enumerate(GROUPS):
            record[f"cov/{g}"] = cov_all[s] * (6 - i) ** 2
        if dynamics:
            record["dynamics/predicted_entropy_change"] = -cov_all[s]
            record["dynamics/entropy_change"] = change[s]
        if s % eval_every == 0 or s == steps:
            record[ACC] = acc[s]
        lines.append(record)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if rollout_steps:
        (path / "rollouts").mkdir()
        for s in rollout_steps:
            text = "".join(json.dumps(r) + "\n" for r in rollout_samples(s))
            (path / "rollouts" / f"step_{s:06d}.jsonl").write_text(text)
    return {"h": h, "acc": acc, "cov_all": cov_all, "change": change}


def polyfit_law(h, r) -> tuple[float, float]:
    """(a, b) of R = -a*exp(H) + b by numpy's own least squares."""
    slope, intercept = np.polyfit(np.exp(np.asarray(h)), np.asarray(r), 1)
    return -slope, intercept


# -- the analysis of a synthetic entroprl run ---------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    truth = make_run(root / "run")
    report = analyze_run(root / "run")
    return root / "run", truth, report, json.loads((report.parent / "analysis.json").read_text())


def test_outputs_written_where_expected(synthetic):
    run, _, report, data = synthetic
    assert report == run / "analysis" / "report.html"
    for name in ("curves", "law", "dynamics", "position_entropy", "perplexity"):
        assert (run / "analysis" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["omitted"] == {}
    assert data["run"]["keys"]["entropy"] == "actor/entropy_seq_mean"
    assert data["run"]["keys"]["accuracy"] == [ACC]
    assert data["run"]["keys"]["reward"] == "critic/score/mean"


def test_law_fit_recovers_the_generating_curve(synthetic):
    _, truth, _, data = synthetic
    h, acc = truth["h"][1:], truth["acc"][1:]  # step 0 has an accuracy but no entropy
    a, b = polyfit_law(h, acc)
    law = data["law"]
    assert law["n"] == 100
    assert law["a"] == pytest.approx(a, abs=1e-9)
    assert law["b"] == pytest.approx(b, abs=1e-9)
    assert law["ceiling"] == pytest.approx(b - a, abs=1e-9)
    # and the generating values, up to the 0.003 noise
    assert law["a"] == pytest.approx(0.25, abs=0.01)
    assert law["b"] == pytest.approx(0.75, abs=0.02)
    resid = acc - (-a * np.exp(h) + b)
    assert law["rmse"] == pytest.approx(math.sqrt(np.mean(resid**2)), rel=1e-9)
    assert law["entropy_interpolated"] == 0


def test_forecast_from_first_15_percent(synthetic):
    _, truth, _, data = synthetic
    h, acc = truth["h"], truth["acc"]
    f = data["forecast"]
    # 100 training steps (1..100): the first ceil(15) = 15 steps fit, steps 16..100 are forecast
    assert f["fit_steps"] == [1, 15]
    a, b = polyfit_law(h[1:16], acc[1:16])
    assert f["fit"]["a"] == pytest.approx(a, abs=1e-9)
    assert f["fit"]["b"] == pytest.approx(b, abs=1e-9)
    assert f["steps"] == list(range(16, 101))
    predicted = -a * np.exp(h[16:]) + b
    np.testing.assert_allclose(f["predicted"], predicted, atol=1e-9)
    np.testing.assert_allclose(f["actual"], acc[16:], atol=0)
    assert f["rmse"] == pytest.approx(math.sqrt(np.mean((predicted - acc[16:]) ** 2)), rel=1e-9)
    assert f["final_error"] == pytest.approx(predicted[-1] - acc[100], abs=1e-12)
    assert f["rmse"] < 0.02  # the law holds, so the early fit forecasts the rest


def test_law_and_forecast_carry_bootstrap_intervals(synthetic):
    _, _, report, data = synthetic
    law, f = data["law"], data["forecast"]
    assert law["smooth"] == 1 and law["resamples"] == 1000
    for key in ("a", "b", "ceiling"):
        ci = law["interval"][key]
        assert ci["estimate"] == law[key]
        assert ci["low"] < law[key] < ci["high"]
    # 100 points with noise 0.003: the generating a = 0.25 and b = 0.75 lie inside
    assert law["interval"]["a"]["low"] < 0.25 < law["interval"]["a"]["high"]
    assert law["interval"]["b"]["low"] < 0.75 < law["interval"]["b"]["high"]
    err = f["final_error_interval"]
    assert err["estimate"] == pytest.approx(f["final_error"], abs=1e-12)
    assert err["low"] <= f["final_error"] <= err["high"]
    text = report.read_text()
    assert "95% bootstrap interval" in text and "no smoothing" in text


def test_smooth_performance_hand_example():
    values = np.array([0.0, np.nan, 3.0, 0.0, 3.0])
    # over the 4 logged values: ends keep a window of 1, the middle ones average 3 neighbours
    np.testing.assert_allclose(smooth_performance(values, 3), [0.0, np.nan, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(smooth_performance(values, 1), values)
    for bad in (2, 0, 1.5, True):
        with pytest.raises(ValueError, match="smooth"):
            smooth_performance(values, bad)


def test_smoothing_a_noisy_per_step_reward_recovers_the_law(tmp_path):
    """A TRL log fitted on its per-step training reward (noise sd 0.3 on a signal that moves by
    0.47): the raw fit explains little, the 9-point moving average most of the variance."""
    rng = np.random.default_rng(3)
    h = curve(200, tau=40)
    reward = -0.3 * np.exp(h) + 0.9 + 0.3 * rng.standard_normal(h.size)
    history = [{"entropy": h[s], "reward": reward[s], "step": s} for s in range(1, 201)]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    fits = {}
    for smooth in (1, 9):
        out = tmp_path / f"smooth{smooth}"
        report = analyze_run(tmp_path, out, accuracy_key="reward", smooth=smooth)
        fits[smooth] = json.loads((out / "analysis.json").read_text())["law"]
        assert fits[smooth]["smooth"] == smooth
    assert fits[1]["r2"] < 0.2 and fits[9]["r2"] > 0.6
    assert "9-point centered moving average (--smooth 9)" in report.read_text()
    expected = smooth_performance(np.concatenate([[np.nan], reward[1:]]), 9)[1:]
    a, b = polyfit_law(h[1:], expected)
    assert fits[9]["a"] == pytest.approx(a, abs=1e-9) and fits[9]["b"] == pytest.approx(b, abs=1e-9)
    with pytest.raises(ValueError, match="odd integer"):
        analyze_run(tmp_path, tmp_path / "bad", accuracy_key="reward", smooth=4)


def test_fit_fraction_option(tmp_path):
    make_run(tmp_path / "run", rollout_steps=())
    report = analyze_run(tmp_path / "run", tmp_path / "out", fit_fraction=0.3)
    f = json.loads((report.parent / "analysis.json").read_text())["forecast"]
    assert f["fit_fraction"] == 0.3
    assert f["fit_steps"] == [1, 30]
    assert f["steps"][0] == 31


def test_dynamics_correlation_and_covariance_table(synthetic):
    _, truth, _, data = synthetic
    x, y = -truth["cov_all"][1:], truth["change"][1:]
    d = data["dynamics"]
    assert d["x"] == "dynamics/predicted_entropy_change"
    assert d["y"] == "dynamics/entropy_change"
    assert d["n"] == 100
    assert d["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert d["pearson_r"] > 0.9
    slope, intercept = np.polyfit(x, y, 1)
    assert d["slope"] == pytest.approx(slope, rel=1e-9)
    assert d["intercept"] == pytest.approx(intercept, abs=1e-12)
    table = data["covariance_table"]
    assert [r["group"] for r in table] == list(GROUPS)
    for i, row in enumerate(table):
        values = truth["cov_all"][1:] * (6 - i) ** 2
        assert row["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert row["first"] == pytest.approx(values[0], rel=1e-12)
        assert row["last"] == pytest.approx(values[-1], rel=1e-12)
        assert row["n"] == 100


def test_stage_boundary_of_a_kinked_curve(tmp_path):
    # Entropy falls linearly by 0.05/step until step 30, then stays flat: the plateau starts
    # within the few steps the 5-step smoothing and slope windows spread the kink over.
    make_run(tmp_path / "run", rollout_steps=())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for r in records[1:]:
        r["actor/entropy_seq_mean"] = 2.0 - 0.05 * min(r["step"], 30)
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = analyze(load_run(tmp_path / "run"))
    assert 30 <= result.plateau_step <= 35
    assert result.to_dict()["stages"]["plateau_start_step"] == result.plateau_step


def test_rollout_statistics(synthetic):
    _, _, _, data = synthetic
    p = data["perplexity"]
    # every positive sample has mean log-prob -0.1, every negative one -0.5; 4 steps x 2 each
    assert p["positive"]["n"] == 8 and p["negative"]["n"] == 8
    assert p["positive"]["mean"] == pytest.approx(math.exp(0.1), rel=1e-12)
    assert p["negative"]["median"] == pytest.approx(math.exp(0.5), rel=1e-12)
    assert p["zero_advantage"] == 4
    pos = data["position_entropy"]
    assert pos["edges"] == pytest.approx(np.linspace(0, 1, 11).tolist())
    # per step: token t of a length-L response has entropy 1 + t/L; bin = floor(10 t / L)
    sums, counts = np.zeros(10), np.zeros(10)
    for length in (3, 4, 5, 8, 2):
        for t in range(length):
            k = int(10 * t / length)
            sums[k] += 1 + t / length
            counts[k] += 1
    expected = [s / c if c else None for s, c in zip(sums, counts, strict=True)]
    got = pos["all"]["mean"]
    for e, g in zip(expected, got, strict=True):
        assert (g is None) if e is None else g == pytest.approx(e, rel=1e-12)
    assert pos["all"]["tokens"] == (4 * counts).astype(int).tolist()
    assert pos["all"]["responses"] == 20


def test_samples_split_by_stage(synthetic):
    _, _, _, data = synthetic
    plateau = data["stages"]["plateau_start_step"]
    assert plateau is not None and 5 < plateau < 60  # samples at 1, 5 rising; 60, 90 plateau
    assert data["position_entropy"]["rising"]["responses"] == 10
    assert data["position_entropy"]["plateau"]["responses"] == 10


def test_final_values(synthetic):
    _, truth, _, data = synthetic
    assert data["final"]["entropy"] == {"step": 100, "value": pytest.approx(truth["h"][100])}
    assert data["final"]["accuracy"]["value"] == pytest.approx(truth["acc"][100])
    assert data["final"]["reward"]["value"] == pytest.approx(truth["acc"][100] + 0.05)


def test_html_is_self_contained(synthetic):
    _, _, report, _ = synthetic
    text = report.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:|//|file:)""", text)
    assert "<script" not in text and "@import" not in text and "url(" not in text
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 6 == text.count("<img")
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Omitted" not in text


# -- omissions, bad input -------------------------------------------------------------------


def test_missing_inputs_omit_sections_with_reasons(tmp_path):
    make_run(tmp_path / "run", dynamics=False, rollout_steps=(), eval_every=50)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    stripped = [
        {k: v for k, v in json.loads(line).items() if not k.startswith("cov/")} for line in lines
    ]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    report = analyze_run(tmp_path / "run")
    data = json.loads((report.parent / "analysis.json").read_text())
    omitted = data["omitted"]
    assert set(omitted) == {"forecast", "dynamics", "covariance", "position_entropy", "perplexity"}
    assert "dynamics/entropy_change" in omitted["dynamics"]
    assert "cov/" in omitted["covariance"]
    assert "rollout" in omitted["perplexity"]
    # evaluations at steps 50 and 100 only: the first 15 steps hold none to fit
    assert "usable points" in omitted["forecast"]
    assert data["law"]["n"] == 2
    assert data["law"]["valid"] is False
    assert data["law"]["reasons"][0].startswith("too few points: 2 with both entropy and accuracy")
    text = report.read_text()
    # the five sections, and the law's verdict in place of a ceiling
    assert text.count('class="omitted"') == 6
    assert "predicted ceiling" not in text
    assert not (report.parent / "dynamics.png").exists()


def test_truncated_metrics_read_to_last_complete_line(tmp_path):
    make_run(tmp_path / "run", rollout_steps=())
    path = tmp_path / "run" / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # killed in the middle of the step-100 record
    with pytest.warns(UserWarning, match="incomplete last line"):
        report = analyze_run(tmp_path / "run")
    data = json.loads((report.parent / "analysis.json").read_text())
    assert data["run"]["last_step"] == 99
    assert data["law"]["n"] == 99


def test_empty_and_foreign_files_are_clear_errors(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no metrics records"):
        analyze_run(run)
    (run / "metrics.jsonl").write_text('{"loss": 1.0}\n{"loss": 0.5}\n')
    with pytest.raises(ValueError, match="no integer 'step'"):
        analyze_run(run)
    (run / "metrics.jsonl").write_text("this is not json\nnor this\n")
    with pytest.raises(ValueError, match="not a JSON object"):
        analyze_run(run)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown log format"):
        analyze_run(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="no such file"):
        analyze_run(tmp_path / "missing.jsonl")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"no metrics\.jsonl"):
        analyze_run(tmp_path / "empty_dir")


def test_nothing_mappable_is_a_clear_error_and_keys_fix_it(tmp_path):
    rng = np.random.default_rng(3)
    h = curve(40)
    acc = -0.3 * np.exp(h) + 0.8 + 0.002 * rng.standard_normal(41)
    lines = [{"step": s, "data": {"my_H": h[s], "score_on_test": acc[s]}} for s in range(1, 41)]
    path = tmp_path / "custom.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(
        ValueError, match=r"no entropy or accuracy metric recognised.*--entropy-key"
    ):
        analyze_run(path)
    with pytest.raises(ValueError, match=r"entropy key 'my_h2' is not in the log"):
        analyze_run(path, entropy_key="my_h2", accuracy_key="score_on_test")
    report = analyze_run(path, entropy_key="my_H", accuracy_key="score_on_test")
    assert report == tmp_path / "custom_analysis" / "report.html"
    law = json.loads((report.parent / "analysis.json").read_text())["law"]
    a, b = polyfit_law(h[1:], acc[1:])
    assert (law["a"], law["b"]) == (pytest.approx(a, abs=1e-9), pytest.approx(b, abs=1e-9))


def test_bad_fit_fraction_raises(tmp_path):
    make_run(tmp_path / "run", rollout_steps=())
    with pytest.raises(ValueError, match="fit_fraction"):
        analyze_run(tmp_path / "run", fit_fraction=1.5)


def test_malformed_rollouts_omit_the_sample_sections(tmp_path):
    make_run(tmp_path / "run", rollout_steps=(1,))
    with open(tmp_path / "run" / "rollouts" / "step_000001.jsonl", "a") as f:
        f.write(json.dumps({"log_prob": [0.1], "entropy": [1.0, 2.0], "advantage": [1.0]}) + "\n")
    result = analyze(load_run(tmp_path / "run"))
    assert "step_000001.jsonl:6" in result.omitted["perplexity"]
    assert "one length" in result.omitted["position_entropy"]


# -- foreign logs ---------------------------------------------------------------------------


def law_points(seed: int, steps: int, a: float, b: float, noise: float = 0.002):
    rng = np.random.default_rng(seed)
    h = curve(steps)
    return h, -a * np.exp(h) + b + noise * rng.standard_normal(steps + 1)


def test_trl_trainer_state(tmp_path):
    h, acc = law_points(1, 60, 0.35, 0.85)
    history = []
    for s in range(1, 61):
        history.append(
            {"loss": 0.1, "entropy": h[s], "reward": acc[s] + 0.1, "epoch": s / 60, "step": s}
        )
        if s % 5 == 0:  # TRL logs an evaluation as its own entry at the same step
            history.append(
                {
                    "eval_loss": 0.2,
                    "eval_rewards/accuracy_reward/mean": acc[s],
                    "eval_rewards/accuracy_reward/std": 0.3,
                    "eval_entropy": 9.0,
                    "step": s,
                }
            )
    history.append({"train_runtime": 100.0, "train_loss": 0.1, "step": 60})
    folder = tmp_path / "checkpoint-60"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(
        json.dumps({"global_step": 60, "log_history": history})
    )
    assert detect_format(folder) == detect_format(folder / "trainer_state.json") == "trl"
    report = analyze_run(folder)
    assert report == folder / "analysis" / "report.html"
    data = json.loads((report.parent / "analysis.json").read_text())
    keys = data["run"]["keys"]
    assert keys["entropy"] == "entropy"
    assert keys["accuracy"] == ["eval_rewards/accuracy_reward/mean"]
    assert keys["reward"] == "reward"
    every5 = np.arange(5, 61, 5)
    a, b = polyfit_law(h[every5], acc[every5])
    assert data["law"]["n"] == 12
    assert data["law"]["a"] == pytest.approx(a, abs=1e-9)
    assert data["law"]["b"] == pytest.approx(b, abs=1e-9)
    assert data["law"]["a"] == pytest.approx(0.35, abs=0.02)
    # 60 steps: the first 9 hold evaluations at 5 only -> too few to fit a forecast
    assert "forecast" in data["omitted"]
    assert set(data["omitted"]) == {
        "forecast",
        "dynamics",
        "covariance",
        "position_entropy",
        "perplexity",
    }
    assert "trl log holds no rollout samples" in data["omitted"]["perplexity"]


def test_verl_file_logger_two_sources_averaged(tmp_path):
    h, acc1 = law_points(2, 50, 0.3, 0.8)
    _, acc2 = law_points(3, 50, 0.5, 1.0)
    path = tmp_path / "verl_metrics.jsonl"
    lines = []
    for s in range(1, 51):
        data = {
            "actor/entropy": h[s],
            "critic/score/mean": acc1[s],
            "actor/pg_loss": 0.1,
            "val-core/openai/gsm8k/acc/mean@1": acc1[s] + 0.5,  # smaller n: not used
            "val-core/openai/gsm8k/acc/mean@8": acc1[s],
            "val-core/math/acc/mean@8": acc2[s],
            "val-aux/math/reward/mean@8": 5.0,
        }
        lines.append({"step": s, "data": data})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert detect_format(path) == "verl"
    report = analyze_run(path, tmp_path / "out")
    data = json.loads((report.parent / "analysis.json").read_text())
    assert data["run"]["keys"]["accuracy"] == [
        "val-core/math/acc/mean@8",
        "val-core/openai/gsm8k/acc/mean@8",
    ]
    assert "averaged over 2 sources" in " ".join(data["run"]["keys"]["notes"])
    mean_acc = [(acc1[s] + acc2[s]) / 2 for s in range(1, 51)]
    a, b = polyfit_law(h[1:], mean_acc)
    assert data["law"]["a"] == pytest.approx(a, abs=1e-9)
    assert data["law"]["b"] == pytest.approx(b, abs=1e-9)
    assert data["law"]["a"] == pytest.approx(0.4, abs=0.02)
    assert data["forecast"]["fit_steps"] == [1, 8]


def test_verl_flat_records_and_global_step(tmp_path):
    h, acc = law_points(4, 30, 0.3, 0.8)
    path = tmp_path / "flat.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "global_step": s,
                    "actor/entropy": h[s],
                    **({"val-core/aime/reward/mean@4": acc[s]} if s % 3 == 0 else {}),
                }
            )
            + "\n"
            for s in range(1, 31)
        )
    )
    run = load_run(path)
    assert run.table.format == "jsonl"
    assert "flat records" in run.table.reader
    assert run.keys.accuracy == ("val-core/aime/reward/mean@4",)
    law = analyze(run).law
    a, b = polyfit_law(h[3::3], acc[3::3])
    assert (law.a, law.b, law.n) == (pytest.approx(a, abs=1e-9), pytest.approx(b, abs=1e-9), 10)


def test_wandb_chart_export(tmp_path):
    h, acc = law_points(5, 40, 0.3, 0.8)
    path = tmp_path / "export.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "Step",
                "grpo-7b - train/entropy",
                "grpo-7b - train/entropy__MIN",
                "grpo-7b - train/entropy__MAX",
                "grpo-7b - eval/rewards/accuracy_reward/mean",
                "grpo-7b - train/reward",
            ]
        )
        for s in range(1, 41):
            evaluated = repr(float(acc[s])) if s % 2 == 0 else ""
            w.writerow([s, repr(float(h[s])), "0", "9", evaluated, repr(float(acc[s] + 0.1))])
    assert detect_format(path) == "wandb"
    run = load_run(path)
    assert run.keys.entropy == "train/entropy"
    assert run.keys.accuracy == ("eval/rewards/accuracy_reward/mean",)
    assert run.keys.reward == "train/reward"
    law = analyze(run).law
    a, b = polyfit_law(h[2::2], acc[2::2])
    assert (law.a, law.b, law.n) == (pytest.approx(a, abs=1e-9), pytest.approx(b, abs=1e-9), 20)


def test_wandb_history_export_merges_rows_by_trainer_step(tmp_path):
    # W&B's _step counts log calls: a training row and an evaluation row share train/global_step
    path = tmp_path / "history.csv"
    rows = [
        ["", "_step", "_runtime", "train/global_step", "actor/entropy", "val/test_score/x"],
        ["0", "0", "1.0", "10", "1.5", ""],
        ["1", "1", "2.0", "10", "", "0.2"],
        ["2", "2", "3.0", "20", "1.0", ""],
        ["3", "3", "4.0", "20", "", "0.4"],
        ["4", "4", "5.0", "30", "0.5", "0.6"],
    ]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    table = read_log(path)
    assert table.steps.tolist() == [10, 20, 30]
    np.testing.assert_array_equal(table.columns["actor/entropy"], [1.5, 1.0, 0.5])
    np.testing.assert_array_equal(table.columns["val/test_score/x"], [0.2, 0.4, 0.6])
    law = analyze(load_run(path)).law
    # R = 0.2, 0.4, 0.6 against x = exp(1.5), e, exp(0.5): check the fit by hand
    x = np.exp([1.5, 1.0, 0.5])
    sxy = sum((xi - x.mean()) * (ri - 0.4) for xi, ri in zip(x, [0.2, 0.4, 0.6], strict=True))
    sxx = sum((xi - x.mean()) ** 2 for xi in x)
    assert law.a == pytest.approx(-sxy / sxx, rel=1e-12)


def test_integration_keys_under_logger_prefixes(tmp_path):
    """verl logs what entroprl's policy loss returns under "actor/"; W&B's Hugging Face callback
    logs TRL's metrics under "train/": both reach the covariance and dynamics sections."""
    cov = {g: [0.01 * (6 - i) * s for s in range(1, 6)] for i, g in enumerate(GROUPS)}
    change = [-0.5 * v + 0.001 * (-1) ** s for s, v in enumerate(cov["all"])]
    verl = tmp_path / "verl.jsonl"
    verl.write_text(
        "".join(
            json.dumps(
                {
                    "step": s + 1,
                    "data": {
                        "actor/entropy": 1.0 / (s + 1),
                        **{f"actor/cov/{g}": cov[g][s] for g in GROUPS},
                        "actor/dynamics/predicted_entropy_change": -cov["all"][s],
                        "dynamics/entropy_change": change[s],
                    },
                }
            )
            + "\n"
            for s in range(5)
        )
    )
    wandb = tmp_path / "trl.csv"
    with open(wandb, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["train/global_step", "train/entropy_seq_mean", *[f"train/cov/{g}" for g in GROUPS]]
        )
        for s in range(5):
            w.writerow([s + 1, 1.0 / (s + 1), *[cov[g][s] for g in GROUPS]])
    for path in (verl, wandb):
        result = analyze(load_run(path))
        assert [row["group"] for row in result.covariance] == list(GROUPS)
        for row in result.covariance:
            assert row["mean"] == pytest.approx(np.mean(cov[row["group"]]))
            assert (row["first"], row["last"], row["n"]) == (
                cov[row["group"]][0],
                cov[row["group"]][-1],
                5,
            )
    assert load_run(wandb).keys.entropy == "train/entropy_seq_mean"
    assert not load_run(wandb).keys.notes  # the paper's H: no token-weighted note
    dynamics = analyze(load_run(verl)).dynamics
    assert dynamics.x_key == "actor/dynamics/predicted_entropy_change"
    np.testing.assert_allclose(dynamics.x, [-v for v in cov["all"]])
    assert "dynamics/entropy_change" in analyze(load_run(wandb)).omitted["dynamics"]


def test_wandb_csv_with_two_runs_is_an_error(tmp_path):
    path = tmp_path / "two.csv"
    path.write_text("Step,a - actor/entropy,b - actor/entropy\n1,1.0,2.0\n")
    with pytest.raises(ValueError, match="export one run per file"):
        read_log(path)
    (tmp_path / "nostep.csv").write_text("x,actor/entropy\n1,2\n")
    with pytest.raises(ValueError, match="no step column"):
        read_log(tmp_path / "nostep.csv")


def test_trl_file_without_log_history(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"global_step": 3}')
    with pytest.raises(ValueError, match="no 'log_history'"):
        load_run(tmp_path / "trainer_state.json")


def test_verl_truncated_last_line_warns(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "data": {"actor/entropy": 1.0}}\n{"step": 2, "data": {"act')
    with pytest.warns(UserWarning, match="incomplete last line"):
        table = read_log(path)
    assert table.steps.tolist() == [1]


def test_map_keys_prefers_the_papers_entropy(tmp_path):
    make_run(tmp_path / "run", rollout_steps=())
    keys = map_keys(read_log(tmp_path / "run"))
    assert keys.entropy == "actor/entropy_seq_mean" and keys.notes == ()
    assert map_keys(read_log(tmp_path / "run"), entropy_key="actor/entropy").entropy == (
        "actor/entropy"
    )


# -- compare --------------------------------------------------------------------------------


def test_compare_runs_tabulates_each_fit(tmp_path):
    t1 = make_run(tmp_path / "grpo", a=0.4, b=0.9, seed=1, rollout_steps=())
    t2 = make_run(tmp_path / "clip_cov", a=0.2, b=0.7, seed=2, rollout_steps=())
    report = compare_runs([tmp_path / "grpo", tmp_path / "clip_cov"], tmp_path / "cmp")
    assert report == tmp_path / "cmp" / "report.html"
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["grpo", "clip_cov"]
    for row, truth in zip(data["runs"], (t1, t2), strict=True):
        a, b = polyfit_law(truth["h"][1:], truth["acc"][1:])
        assert row["law"]["a"] == pytest.approx(a, abs=1e-9)
        assert row["law"]["b"] == pytest.approx(b, abs=1e-9)
        assert row["final"]["accuracy"]["value"] == pytest.approx(truth["acc"][100])
        assert row["forecast"]["fit_steps"] == [1, 15]
    text = report.read_text()
    assert text.count("<img") == 2 and "grpo" in text and "clip_cov" in text


def test_compare_pools_the_runs_of_one_folder(tmp_path):
    truths = {
        (method, seed): make_run(
            tmp_path / method / f"seed_{seed}",
            a=a,
            b=0.8,
            steps=200,
            noise=0.02,
            seed=10 * seed + i,
            eval_every=10,
            rollout_steps=(),
        )
        for i, (method, a) in enumerate((("grpo", 0.4), ("kl_cov", 0.2)))
        for seed in range(3)
    }
    runs = [tmp_path / m / f"seed_{s}" for m in ("grpo", "kl_cov") for s in range(3)]
    report = compare_runs(runs, tmp_path / "cmp", pool=True)
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert list(data["pools"]) == ["grpo", "kl_cov"]
    for method, a_true in (("grpo", 0.4), ("kl_cov", 0.2)):
        pool = data["pools"][method]
        assert len(pool["runs"]) == 3
        steps = np.arange(10, 201, 10)
        h = np.concatenate([truths[method, s]["h"][steps] for s in range(3)])
        r = np.concatenate([truths[method, s]["acc"][steps] for s in range(3)])
        a, b = polyfit_law(h, r)
        law = pool["law"]
        assert law["n"] == 60 and law["runs"] == 3
        assert law["a"] == pytest.approx(a, abs=1e-9) and law["b"] == pytest.approx(b, abs=1e-9)
        assert law["interval"]["a"]["low"] < a < law["interval"]["a"]["high"]
        # the generating a lies inside (these seeds; a 95% interval misses 1 time in 20)
        assert law["interval"]["a"]["low"] < a_true < law["interval"]["a"]["high"]
        assert set(pool["forecast"]["final_error"]) >= {"estimate", "low", "high"}
    assert (tmp_path / "cmp" / "pooled_law.png").read_bytes()[:4] == b"\x89PNG"
    assert "Law fitted on each method's runs together" in report.read_text()
    compare_runs(runs, tmp_path / "plain")
    assert "pools" not in json.loads((tmp_path / "plain" / "comparison.json").read_text())


def test_compare_disambiguates_names_and_mixes_formats(tmp_path):
    make_run(tmp_path / "a" / "run", rollout_steps=())
    make_run(tmp_path / "b" / "run", rollout_steps=(), seed=5)
    h, acc = law_points(6, 30, 0.3, 0.8)
    (tmp_path / "v.jsonl").write_text(
        "".join(
            json.dumps(
                {"step": s, "data": {"actor/entropy": h[s], "val-core/m/acc/mean@1": acc[s]}}
            )
            + "\n"
            for s in range(1, 31)
        )
    )
    compare_runs(
        [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "v.jsonl"], tmp_path / "cmp"
    )
    runs = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["runs"]
    # one run per folder: each its own method, its folder naming it apart
    assert [r["name"] for r in runs] == ["a/run", "b/run", "v"]
    assert [r["method"] for r in runs] == ["a/run", "b/run", "v"]
    assert [r["format"] for r in runs] == ["entroprl", "entroprl", "verl"]
    with pytest.raises(ValueError, match="at least one run"):
        compare_runs([], tmp_path / "cmp")


# -- the building blocks, by hand -----------------------------------------------------------


def test_law_grid_interpolates_entropy_at_evaluation_steps():
    steps = np.array([0, 10, 15, 20])
    entropy = np.array([np.nan, 1.0, np.nan, 2.0])
    accuracy = np.array([0.1, np.nan, 0.5, 0.7])
    grid, h, r, interpolated = law_grid(steps, entropy, accuracy)
    assert grid.tolist() == list(range(10, 21))
    assert h[5] == pytest.approx(1.5)  # step 15, halfway between 1.0 at 10 and 2.0 at 20
    assert r[5] == 0.5 and r[10] == 0.7
    assert np.isnan(r[[0, 1, 2, 3, 4, 6, 7, 8, 9]]).all()  # step 0 lies before any entropy
    assert interpolated == 1
    with pytest.raises(ValueError, match="at least 2"):
        law_grid(steps, np.array([np.nan, 1.0, np.nan, np.nan]), accuracy)


def test_pearson_hand_example():
    # x = 1, 2, 3; y = 1, 3, 2: dx = -1, 0, 1, dy = -1, 1, 0 -> sum dxdy = 1, sxx = syy = 2
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5, abs=1e-15)
    with pytest.raises(ValueError, match="at least 3"):
        pearson([1, 2], [2, 1])
    with pytest.raises(ValueError, match="y is constant"):
        pearson([1, 2, 3], [2, 2, 2])
    with pytest.raises(ValueError, match="finite"):
        pearson([1, 2, np.nan], [1, 2, 3])
    with pytest.raises(ValueError, match="one length"):
        pearson([1, 2, 3], [1, 2])


def test_position_entropy_hand_example():
    # L = 2: positions 0, 0.5 -> bins 0, 1 of 2; L = 4: 0, .25, .5, .75 -> bins 0, 0, 1, 1
    samples = [{"entropy": [1.0, 3.0]}, {"entropy": [2.0, 4.0, 6.0, 8.0]}]
    profile = position_entropy(samples, bins=2)
    assert profile.mean.tolist() == pytest.approx([(1 + 2 + 4) / 3, (3 + 6 + 8) / 3])
    assert profile.tokens.tolist() == [3, 3]
    profile = position_entropy(samples, bins=8)  # bins 0, 4 and 0, 2, 4, 6; others empty
    assert profile.tokens.tolist() == [2, 0, 1, 0, 2, 0, 1, 0]
    assert profile.mean[4] == pytest.approx((3 + 6) / 2) and np.isnan(profile.mean[1])
    with pytest.raises(ValueError, match="no rollout samples"):
        position_entropy([])
    with pytest.raises(ValueError, match="bins"):
        position_entropy(samples, bins=0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.floats(0, 10), min_size=1, max_size=30), min_size=1, max_size=8),
    st.integers(1, 12),
)
def test_position_entropy_matches_a_token_loop(entropies, bins):
    samples = [{"entropy": e} for e in entropies]
    sums, counts = [0.0] * bins, [0] * bins
    for e in entropies:
        for t, value in enumerate(e):
            k = min(int(t * bins / len(e)), bins - 1)
            sums[k] += value
            counts[k] += 1
    profile = position_entropy(samples, bins=bins)
    assert profile.tokens.tolist() == counts
    for k in range(bins):
        if counts[k]:
            assert profile.mean[k] == pytest.approx(sums[k] / counts[k], rel=1e-9, abs=1e-12)
        else:
            assert np.isnan(profile.mean[k])


def test_perplexity_split_hand_example():
    samples = [
        {"log_prob": [-1.0, -3.0], "advantage": [0.5, 0.5]},  # mean -2 -> ppl e^2, positive
        {"log_prob": [-0.5], "advantage": [-1.0]},  # e^0.5, negative
        {"log_prob": [-1.0, -1.0, -4.0], "advantage": [2.0, 1.0, 0.0]},  # e^2, mean adv 1 > 0
        {"log_prob": [-9.0], "advantage": [0.0]},  # advantage 0: left out
    ]
    split = perplexity_split(samples)
    assert split.positive.tolist() == pytest.approx([math.exp(2), math.exp(2)])
    assert split.negative.tolist() == pytest.approx([math.exp(0.5)])
    assert split.zero == 1
    stats = split.to_dict()
    assert stats["positive"]["mean_log_ppl"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no rollout sample has a negative advantage"):
        perplexity_split(samples[:1])


def test_covariance_table_requires_groups_and_finite_values(tmp_path):
    make_run(tmp_path / "run", rollout_steps=())
    table = read_log(tmp_path / "run")
    assert [r["group"] for r in covariance_table(table)] == list(GROUPS)
    table.columns.pop("cov/top_2%")
    assert "top_2%" not in [r["group"] for r in covariance_table(table)]
    table.columns["cov/all"][3] = np.inf
    with pytest.raises(ValueError, match="cov/all contains inf"):
        covariance_table(table)
    for g in GROUPS:
        table.columns.pop(f"cov/{g}", None)
    with pytest.raises(ValueError, match="no cov/<group>"):
        covariance_table(table)


def test_read_rollouts_adds_the_step(tmp_path):
    make_run(tmp_path / "run", rollout_steps=(7, 12))
    samples = read_rollouts(tmp_path / "run" / "rollouts")
    assert [s["step"] for s in samples] == [7] * 5 + [12] * 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_rollouts(tmp_path / "nowhere") == []


def test_infinite_values_are_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        "".join(
            json.dumps({"step": s, "data": {"actor/entropy": 1.0 / s, "grad_norm": math.inf}})
            + "\n"
            for s in range(1, 8)
        )
    )
    assert load_run(path).keys.entropy == "actor/entropy"  # inf in an unused column is fine
    path.write_text(path.read_text().replace('"actor/entropy": 0.25', '"actor/entropy": Infinity'))
    with pytest.raises(ValueError, match="actor/entropy is infinite at step 4"):
        load_run(path)
    samples = [{"log_prob": [-1.0, math.nan], "entropy": [1.0, 1.0], "advantage": [1.0, 1.0]}]
    with pytest.raises(ValueError, match="log_prob contains NaN or inf"):
        perplexity_split(samples)


@pytest.mark.parametrize("step", ["1.5", "NaN", "Infinity", '"3"', "true"])
def test_non_integer_steps_are_named(tmp_path, step):
    path = tmp_path / "m.jsonl"
    path.write_text(f'{{"step": {step}, "data": {{"actor/entropy": 1.0}}}}\n')
    with pytest.raises(ValueError, match="is not an integer"):
        read_log(path)


def test_a_csv_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("_step,actor/entropy\n1,1.5\n2,1.0\n".encode("utf-8-sig"))
    table = read_log(path)
    assert table.steps.tolist() == [1, 2]
    np.testing.assert_array_equal(table.columns["actor/entropy"], [1.5, 1.0])


def test_a_csv_not_in_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("_step,actor/entropy,note\n1,1.5,ok\n2,1.0,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: not UTF-8")):
        read_log(path)


@pytest.mark.parametrize(
    "name, text",
    [
        ("h.csv", "_step,actor/entropy\n1,1.0\n1e20,0.5\n"),
        ("m.jsonl", '{"step": 1, "data": {"actor/entropy": 1.0}}\n{"step": 1e20, "data": {}}\n'),
        ("metrics.jsonl", '{"step": 1, "actor/entropy": 1.0}\n{"step": 100000000000000000000}\n'),
    ],
)
def test_a_step_out_of_range_is_named(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=r"step 1e\+?20|step 100000000000000000000") as caught:
        read_log(tmp_path if name == "metrics.jsonl" else path)
    assert "out of range" in str(caught.value)


# -- whether the law holds, in the reports (algorithms.md §9.5) --------------------------------


def test_a_law_that_holds_is_headlined(synthetic):
    _, _, report, data = synthetic
    assert data["law"]["valid"] is True and data["law"]["reasons"] == []
    assert data["law"]["checks"]["n"] == 100 and data["law"]["checks"]["min_points"] == 8
    assert data["forecast"]["valid"] is True and data["flags"] == []
    text = report.read_text()
    assert "The law describes this run: a = 0.2" in text and "predicted ceiling" in text
    assert "RMSE <b>" in text


def resumed_flat_log(path: Path) -> None:
    """The issue's verl PPO run: resumed at step 101, entropy collapsed to 0.02-0.04 and accuracy
    near 0.88, both printed to 3 decimals; evaluations every 5 steps; JSON lines saved as .json."""
    rng = np.random.default_rng(11)
    lines = []
    for step in range(101, 301):
        data = {"actor/entropy": round(float(rng.uniform(0.02, 0.04)), 3)}
        if step % 5 == 0:
            data["val-core/gsm8k/acc/mean@1"] = round(0.88 + 0.01 * rng.standard_normal(), 3)
        lines.append({"step": step, "data": data})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_a_flat_entropy_log_headlines_no_ceiling(tmp_path):
    resumed_flat_log(tmp_path / "ppo.json")
    assert detect_format(tmp_path / "ppo.json") == "verl"
    report = analyze_run(tmp_path / "ppo.json")
    data = json.loads((report.parent / "analysis.json").read_text())
    law = data["law"]
    assert law["valid"] is False and law["n"] == 40
    assert law["reasons"][0].startswith("no entropy range: the entropy spans 0.019 nats (0.021 to")
    flags = " | ".join(data["flags"])
    assert "the log starts at step 101, far from step 0 (it logs every 1 step)" in flags
    assert "entropy (actor/entropy) is quantised to 3 decimals (printed rounded" in flags
    assert "21 distinct values from 0.020 to 0.040, one step of the last decimal being 5%" in flags
    assert "accuracy (val-core/gsm8k/acc/mean@1) is quantised to 3 decimals" in flags
    text = report.read_text()
    assert "The law does not describe this run, so nothing is predicted from it: no entropy" in text
    assert "predicted ceiling" not in text and "RMSE <b>" not in text
    assert "Warning: the log starts at step 101" in text


def test_a_wrong_sign_log_headlines_no_ceiling(tmp_path):
    h = 0.2 + 0.8 * np.exp(-np.arange(80) / 20)
    acc = 0.3 * np.exp(h) + 0.2 + 0.01 * np.random.default_rng(12).standard_normal(80)
    path = tmp_path / "wrong.jsonl"
    path.write_text(
        "".join(
            json.dumps({"step": s, "actor/entropy": h[s], "eval_accuracy": acc[s]}) + "\n"
            for s in range(80)
        )
    )
    report = analyze_run(path)
    data = json.loads((report.parent / "analysis.json").read_text())
    assert data["law"]["valid"] is False and data["law"]["a"] < 0
    assert data["law"]["reasons"][0].startswith("wrong sign: a = -0.")
    assert data["forecast"]["valid"] is False
    text = report.read_text()
    assert "wrong sign" in text and "predicted ceiling" not in text
    assert "No forecast: the law fitted on steps 0-11" in text


def test_printed_decimals_by_hand():
    assert printed_decimals(np.array([0.034, 0.021, np.nan])) == 3
    assert printed_decimals(np.array([0.5, 2.0])) == 1
    assert printed_decimals(np.array([3.0, 7.0])) == 0
    assert printed_decimals(np.array([1 / 3])) is None
    assert printed_decimals(np.array([np.nan])) is None
    # TensorBoard stores float32: 0.034 comes back as 0.03400000184774399
    assert printed_decimals(np.array([0.034, 0.5], dtype=np.float32).astype(np.float64)) == 3


def test_late_start_counts_logging_intervals(tmp_path):
    def flags_of(steps):
        path = tmp_path / "log.jsonl"
        h = np.linspace(1.0, 0.2, len(steps)) + np.pi * 1e-7  # not on a decimal grid
        path.write_text(
            "".join(
                json.dumps({"step": s, "entropy": x}) + "\n" for s, x in zip(steps, h, strict=True)
            )
        )
        return log_flags(load_run(path))

    assert flags_of(range(10, 501, 10)) == []  # TRL's logging_steps=10 starts at step 10
    assert flags_of(range(0, 50)) == [] and flags_of(range(2, 50)) == []
    assert flags_of(range(3, 50))[0].startswith("the log starts at step 3")
    assert flags_of(range(40, 501, 10))[0].startswith("the log starts at step 40")


# -- logs as people have them ------------------------------------------------------------------


def _write_events(folder: Path, writer: str, h, acc) -> None:
    """Entropy every step and accuracy every 5 through torch's SummaryWriter (what verl, TRL
    and entroprl use) or tensorboard's own Writer (tensor summaries, as tf.summary writes)."""
    if writer == "torch":
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(str(folder))
        add = w.add_scalar
    else:
        from tensorboard.summary import Writer

        w = Writer(str(folder))
        add = w.add_scalar
    for s in range(1, len(h)):
        add("actor/entropy", float(h[s]), s)
        if s % 5 == 0:
            add(ACC, float(acc[s]), s)
    w.close()


@pytest.mark.parametrize("writer", ["torch", "tensorboard"])
def test_tensorboard_events(tmp_path, writer):
    h, acc = law_points(7, 60, 0.3, 0.8)
    _write_events(tmp_path / "tb", writer, h, acc)
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    for path in (tmp_path / "tb", files[0], tmp_path):  # the folder, the file, a folder above
        assert detect_format(path) == "tensorboard"
        run = load_run(path)
        assert run.table.reader == "TensorBoard event files (tensorboard's reader)"
        assert run.steps.tolist() == list(range(1, 61))
        np.testing.assert_allclose(run.series["entropy"], h[1:], rtol=1e-6)  # stored as float32
    law = analyze(run).law
    every5 = np.arange(5, 61, 5)
    a, b = polyfit_law(h[every5].astype(np.float32), acc[every5].astype(np.float32))
    assert (law.a, law.b, law.n) == (pytest.approx(a, abs=1e-6), pytest.approx(b, abs=1e-6), 12)


def test_tensorboard_of_a_resumed_run_and_bad_folders(tmp_path):
    """A run resumed from step 20's checkpoint logs 21.. again (entroprl opens its writer with
    purge_step): what the first attempt logged past 20 is dropped, as TensorBoard shows it."""
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(str(tmp_path / "run"))
    for s in range(1, 31):
        first.add_scalar("actor/entropy", 1.0, s)
    first.close()
    again = SummaryWriter(str(tmp_path / "run"), purge_step=21)
    for s in range(21, 41):
        again.add_scalar("actor/entropy", 0.5, s)
    again.close()
    table = read_log(tmp_path / "run")
    assert table.steps.tolist() == list(range(1, 41))
    np.testing.assert_array_equal(table.columns["actor/entropy"], [1.0] * 20 + [0.5] * 20)
    assert table.notes == (f"2 event file(s) in {tmp_path / 'run'}",)
    _write_events(tmp_path / "other", "torch", *law_points(1, 10, 0.3, 0.8))
    with pytest.raises(ValueError, match=r"event files in 2 folders \(other, run\)"):
        read_log(tmp_path)
    renamed = tmp_path / "events.bin"
    renamed.write_bytes(next((tmp_path / "other").glob("events*")).read_bytes())
    with pytest.raises(ValueError, match="rename it"):
        read_log(renamed)


def test_json_lines_and_trainer_state_whatever_the_name(tmp_path):
    h, acc = law_points(8, 20, 0.3, 0.8)
    records = [{"step": s, "data": {"actor/entropy": h[s], ACC: acc[s]}} for s in range(1, 21)]
    verl = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "metrics.json").write_text(verl)  # was "Extra data": chosen by the extension
    (tmp_path / "metrics.log").write_text(verl)
    history = [{"step": s, "entropy": h[s], "eval_accuracy": acc[s]} for s in range(1, 21)]
    (tmp_path / "state.txt").write_text(json.dumps({"log_history": history}, indent=2))
    expected = {"metrics.json": "verl", "metrics.log": "verl", "state.txt": "trl"}
    for name, fmt in expected.items():
        run = load_run(tmp_path / name)
        assert run.table.format == fmt
        np.testing.assert_array_equal(run.series["entropy"], h[1:])
        np.testing.assert_array_equal(run.series["accuracy"], acc[1:])


def test_console_lines_read_among_other_output(tmp_path):
    """verl's console logger prints `concat_dict_to_str`: "step:N" and " - key:value" for every
    number, numpy scalars as their repr; tests/test_verl_logs.py reads what verl itself prints."""
    path = tmp_path / "out.txt"
    path.write_text(
        "INFO starting\n"
        "(TaskRunner pid=7) step:1 - actor/entropy:np.float64(0.5) - n:np.int64(3) - x:True\n"
        "\x1b[36m(TaskRunner pid=7)\x1b[0m step:2 - actor/entropy:0.25 - eval_accuracy:nan\n"
        "Training Progress:  50%|#####     | 1/2\n"
        "step:3 - actor/entropy:1e-05 - eval_accuracy:np.float64(0.5)\n"
    )
    table = read_log(path)
    assert table.format == "verl-console" and table.steps.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(table.columns["actor/entropy"], [0.5, 0.25, 1e-05])
    np.testing.assert_array_equal(table.columns["n"], [3.0, np.nan, np.nan])
    np.testing.assert_array_equal(table.columns["eval_accuracy"], [np.nan, np.nan, 0.5])
    assert "x" not in table.columns  # a boolean is not a metric
    assert table.notes == ("2 lines that are not step records skipped",)
    path.write_text("step:1 - actor/entropy:0.5\nstep:2 - broken\nstep:3 - actor/entropy:0.1\n")
    with pytest.raises(ValueError, match=r"out.txt:2: 'broken' is not key:value"):
        read_log(path)
    path.write_text("step:1 - actor/entropy:0.5\nstep:2 - actor/entro")
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert read_log(path).steps.tolist() == [1]


# -- comparisons by method ---------------------------------------------------------------------


def test_runs_are_grouped_by_method(tmp_path):
    def members(*names):
        return [(m.label, m.method) for m in group([tmp_path / n for n in names])]

    assert members("grpo/seed_0", "grpo/seed_1", "kl_cov/seed_0") == [
        ("grpo/seed_0", "grpo"),
        ("grpo/seed_1", "grpo"),
        ("kl_cov/seed_0", "kl_cov"),
    ]
    # one folder of seeds: one method; one folder of unrelated logs: a method each
    assert members("grpo/seed_0", "grpo/seed1") == [("grpo/seed_0", "grpo"), ("grpo/seed1", "grpo")]
    assert members("logs/a.jsonl", "logs/b.jsonl") == [("a", "a"), ("b", "b")]
    # runs from several folders: each folder holding several is a method
    assert members("dapo/x", "dapo/y", "ppo/x") == [
        ("dapo/x", "dapo"),
        ("dapo/y", "dapo"),
        ("ppo/x", "ppo/x"),  # alone in its folder: its own method, its name taken twice
    ]
    assert members("a/seed_0", "a/seed_0")[1] == ("a/seed_0 #2", "a")
    assert members("a/run", "a/run")[1] == ("a/run #2", "a/run #2")


def test_seed_band_is_the_t_interval_at_the_steps_all_runs_logged():
    steps = [np.arange(1, 6), np.arange(1, 6), np.arange(2, 8)]
    values = [
        np.array([1.0, 2.0, np.nan, 4.0, 5.0]),
        np.array([1.5, 2.5, 3.0, 4.5, 5.5]),
        np.array([2.2, 3.3, 4.4, 5.5, 6.6, 7.7]),
    ]
    band = seed_band(steps, values)
    assert band.steps.tolist() == [2, 4, 5] and band.runs == 3
    for i, (a, b, c) in enumerate([(2.0, 2.5, 2.2), (4.0, 4.5, 4.4), (5.0, 5.5, 5.5)]):
        low, high = stats.ttest_1samp([a, b, c], 0.0).confidence_interval(0.95)
        assert band.mean[i] == pytest.approx((a + b + c) / 3)
        assert (band.low[i], band.high[i]) == (pytest.approx(low), pytest.approx(high))
    single = seed_band(steps[:1], values[:1])
    assert single.low is None and single.steps.tolist() == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="no step at which all 2 runs"):
        seed_band([np.arange(3), np.arange(3, 6)], [np.ones(3), np.ones(3)])


def test_compare_draws_one_band_per_method(tmp_path, monkeypatch):
    figures = {}
    real_save = comparison.save_figure

    def keep(fig, path):
        figures[path.name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(comparison, "save_figure", keep)
    monkeypatch.setattr(report_module, "save_figure", keep)
    truths = {}
    for i, method in enumerate(("grpo", "clip_cov", "kl_cov")):
        for seed in range(3):
            truths[method, seed] = make_run(
                tmp_path / method / f"seed_{seed}",
                steps=60,
                a=0.2 + 0.1 * i,
                eval_every=5,
                seed=10 * i + seed,
                rollout_steps=(),
            )
    runs = [tmp_path / m / f"seed_{s}" for m in ("grpo", "clip_cov", "kl_cov") for s in range(3)]
    compare_runs(runs, tmp_path / "cmp")
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["name"] for r in data["runs"]][:2] == ["grpo/seed_0", "grpo/seed_1"]
    assert {r["method"] for r in data["runs"]} == {"grpo", "clip_cov", "kl_cov"}
    entropy, accuracy, law = figures["compare.png"].axes[:3]
    assert entropy.get_ylabel() == "entropy H (nats)" == law.get_xlabel()
    for ax, key in ((entropy, "h"), (accuracy, "acc")):
        bands = ax.collections
        assert len(bands) == 3  # one shaded band per method
        for i, method in enumerate(("grpo", "clip_cov", "kl_cov")):
            assert to_hex(bands[i].get_facecolor()[0], keep_alpha=False) == to_hex(f"C{i}")
            (line,) = [x for x in ax.get_lines() if x.get_label().startswith(f"{method}: mean")]
            # entropy from step 1, accuracy evaluated at step 0 and every 5 steps
            every = slice(1, None) if key == "h" else slice(0, None, 5)
            seeds = np.stack([truths[method, s][key][every] for s in range(3)])
            np.testing.assert_allclose(line.get_ydata(), seeds.mean(axis=0), atol=1e-12)
    # the law: solid over the points, dashed down to H = 0 where each ceiling is read
    assert any(x.get_linestyle() == "--" and x.get_xdata()[0] == 0 for x in law.get_lines())
    cov = figures["covariance.png"].axes
    assert [ax.get_title() for ax in cov] == [f"cov/{g}" for g in GROUPS]
    assert all(len(ax.collections) == 3 for ax in cov)


def test_compare_keeps_runs_that_lack_sections(tmp_path):
    make_run(tmp_path / "full", rollout_steps=())
    (tmp_path / "reward_only.jsonl").write_text(
        "".join(json.dumps({"step": s, "critic/score/mean": 0.1 * s}) + "\n" for s in range(9))
    )
    (tmp_path / "accuracy_only.jsonl").write_text(
        "".join(json.dumps({"step": s, ACC: 0.1 * s}) + "\n" for s in range(9))
    )
    paths = [tmp_path / "full", tmp_path / "reward_only.jsonl", tmp_path / "accuracy_only.jsonl"]
    with pytest.raises(ValueError, match="no entropy or accuracy metric recognised"):
        analyze_run(paths[1])  # one run alone: nothing to analyse
    report = compare_runs(paths, tmp_path / "cmp")
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["full", "reward_only", "accuracy_only"]
    assert data["runs"][1]["law"] is None and "law" in data["runs"][1]["omitted"]
    text = report.read_text()
    assert "reward_only, entropy: logged by none of its runs" in text
    assert "accuracy_only, entropy: logged by none of its runs" in text
    assert "accuracy_only: Left out: stages (no entropy metric" in text
    assert "reward_only, cov/all: logged by none of its runs" in text
