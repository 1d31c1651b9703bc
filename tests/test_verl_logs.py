"""`entroprl analyze` on the logs verl itself writes (in .venv-verl: scripts/test.sh): its console
lines, its file logger's JSON lines under a ".json" name, and its TensorBoard events, all from one
`verl.utils.tracking.Tracking` fed the same metrics, read alike."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.verl
pytest.importorskip(
    "verl",
    reason="verl is not installed in this environment; scripts/test.sh runs these in .venv-verl",
)

from verl.utils.tracking import Tracking  # noqa: E402

from entroprl import cli  # noqa: E402
from entroprl.analysis.foreign import detect_format  # noqa: E402
from entroprl.analysis.runs import load_run  # noqa: E402

ACC = "val-core/openai/gsm8k/acc/mean@4"


@pytest.fixture
def verl_logs(tmp_path, monkeypatch, capsys):
    """60 steps logged by verl's Tracking to the console, the file logger and TensorBoard, with
    numpy scalars as verl's metric reductions give them; evaluations every 5 steps."""
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "metrics.json"))
    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path / "tb"))
    tracking = Tracking("entroprl", "console", default_backend=["console", "file", "tensorboard"])
    rng = np.random.default_rng(0)
    h = 0.15 + 0.85 * np.exp(-np.arange(61) / 12)
    acc = -0.3 * np.exp(h) + 0.9 + 0.005 * rng.standard_normal(61)
    for step in range(1, 61):
        data = {
            "actor/entropy": np.float64(h[step]),
            "critic/score/mean": np.float64(acc[step] + 0.05),
            "response_length/mean": np.int64(100 + step),
            "actor/pg_loss": -0.01,
        }
        if step % 5 == 0:
            data[ACC] = np.float64(acc[step])
        tracking.log(data=data, step=step)
    tracking.finish()
    console = tmp_path / "train.log"
    console.write_text(capsys.readouterr().out)
    return {"console": console, "file": tmp_path / "metrics.json", "tb": tmp_path / "tb"}


def test_console_file_and_tensorboard_logs_read_alike(verl_logs):
    assert "step:5 - actor/entropy:np.float64(" in verl_logs["console"].read_text()
    formats = {k: detect_format(p) for k, p in verl_logs.items()}
    assert formats == {"console": "verl-console", "file": "verl", "tb": "tensorboard"}
    runs = {k: load_run(p) for k, p in verl_logs.items()}
    assert "console lines" in runs["console"].table.reader
    # verl's own "Creating file logger at ..." and "Saving tensorboard log ..." lines
    assert runs["console"].table.notes == ("2 lines that are not step records skipped",)
    file, console, tb = runs["file"].table, runs["console"].table, runs["tb"].table
    assert file.steps.tolist() == console.steps.tolist() == tb.steps.tolist() == list(range(1, 61))
    assert set(file.columns) == set(console.columns) == set(tb.columns)
    for key, values in file.columns.items():
        np.testing.assert_array_equal(console.columns[key], values)  # repr round-trips
        np.testing.assert_allclose(tb.columns[key], values, rtol=1e-6)  # float32 events
    for run in runs.values():
        assert run.keys.entropy == "actor/entropy" and run.keys.accuracy == (ACC,)


def test_a_ray_prefixed_console_log_analyses_from_the_command_line(verl_logs, tmp_path):
    """verl's trainer runs in a Ray actor, whose output reaches the driver's console prefixed
    "(TaskRunner pid=...)": the lines shared from such a run."""
    lines = verl_logs["console"].read_text().splitlines()
    shared = tmp_path / "ppo_run.txt"
    shared.write_text("".join(f"(TaskRunner pid=4242) {line}\n" for line in lines))
    cli.main(["analyze", str(shared), "--out", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert data["run"]["format"] == "verl-console"
    assert data["law"]["n"] == 12 and data["law"]["valid"] is True
    reference = load_run(verl_logs["file"])
    np.testing.assert_array_equal(load_run(shared).series["entropy"], reference.series["entropy"])
