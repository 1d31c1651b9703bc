"""The examples run as their docstrings say: examples/minimal_grpo.py, the newcomer's door, and
examples/trl_kl_cov.py, the TRL door (in .venv-trl), which holds the lines the README's and
docs/trl.md's diff tell a TRL user to change."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from entroprl.demo.models import save_model
from tests.policies import make_tiny_policy

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "minimal_grpo.py"
TRL_EXAMPLE = ROOT / "examples" / "trl_kl_cov.py"


@pytest.mark.parametrize("extra", [[], ["--clip-cov"]])
def test_minimal_grpo_runs(tmp_path, extra):
    model, tok = make_tiny_policy()
    path = save_model(model, tok, tmp_path / "model")
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "2", "--model", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [line for line in done.stdout.splitlines() if line.startswith("step")]
    assert len(steps) == 2 and all("entropy" in s and "predicted dH" in s for s in steps)


def squeeze(code: str) -> str:
    """`code` without whitespace or trailing commas: the same call however it is formatted."""
    return re.sub(r"\s+", "", code).replace(",)", ")")


@pytest.mark.parametrize("page", ["README.md", "docs/trl.md"])
def test_the_trl_example_holds_the_documented_switch(page):
    """Every `+` line of the page's diff occurs in the example, `...` standing for anything."""
    (diff,) = re.findall(r"```diff\n(.*?)```", (ROOT / page).read_text(), re.S)
    added = [line[1:] for line in diff.splitlines() if line.startswith("+")]
    assert len(added) == 2, added
    example = squeeze(TRL_EXAMPLE.read_text())
    for line in added:
        pattern = ".*?".join(re.escape(squeeze(part)) for part in line.split("..."))
        assert re.search(pattern, example), line


@pytest.mark.trl
@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None,
    reason="TRL is not installed in this environment; scripts/test.sh runs this in .venv-trl",
)
def test_the_trl_example_trains_with_kl_cov_and_logs_the_diagnostics(tmp_path):
    model, tok = make_tiny_policy()
    path = save_model(model, tok, tmp_path / "model")
    done = subprocess.run(
        [
            sys.executable,
            str(TRL_EXAMPLE),
            "--model",
            str(path),
            "--steps",
            "4",
            "--eval-every",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    train = [r for r in history if "loss" in r]
    assert len(train) == 4
    assert all({"cov/all", "kl_cov_frac", "entropy_seq_mean"} <= set(r) for r in train)
    assert any(r["kl_cov_frac"] > 0 for r in train)  # steps_per_generation=4: KL-Cov acts
    assert any("eval_rewards/accuracy/mean" in r for r in history)
