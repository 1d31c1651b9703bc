"""examples/minimal_grpo.py, the newcomer's door, runs as its docstring says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from entroprl.demo.models import save_model
from tests.policies import make_tiny_policy

EXAMPLE = Path(__file__).parents[1] / "examples" / "minimal_grpo.py"


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
