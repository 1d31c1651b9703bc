"""The trainer's optional Weights & Biases logger, offline (runs in .venv-trl: scripts/test.sh)."""

import pytest

pytestmark = pytest.mark.wandb
wandb = pytest.importorskip(
    "wandb",
    reason="wandb is not installed in this environment; scripts/test.sh runs these in .venv-trl",
)

from entroprl.rundir import read_metrics  # noqa: E402
from entroprl.trainer import Trainer  # noqa: E402
from tests.policies import make_tiny_policy  # noqa: E402
from tests.test_trainer import small_config  # noqa: E402


def test_trainer_logs_the_same_names_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls = []
    real_init = wandb.init

    def init(**kwargs):  # the real offline run, its log calls recorded on the way
        run = real_init(**kwargs)
        real_log = run.log
        monkeypatch.setattr(
            run, "log", lambda data, step: (calls.append((step, data)), real_log(data, step=step))
        )
        return run

    monkeypatch.setattr(wandb, "init", init)
    run = tmp_path / "run"
    model, tok = make_tiny_policy()
    config = small_config(run, trainer={"steps": 2, "wandb": True, "wandb_project": "test"})
    Trainer(config, model=model, tokenizer=tok).train()

    records = read_metrics(run / "metrics.jsonl")
    assert [step for step, _ in calls] == [r["step"] for r in records]
    for (_, data), record in zip(calls, records, strict=True):
        assert data == {k: v for k, v in record.items() if k != "step"}
    assert {"cov/all", "actor/entropy_seq_mean", "dynamics/predicted_entropy_change"} <= set(data)
    # and W&B wrote them to its offline run under those names (the first step's: its record is
    # on disk long before the run finishes)
    (history,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    stored = history.read_bytes()
    assert [key for key in calls[0][1] if key.encode() not in stored] == []


def test_wandb_is_off_by_default(tmp_path):
    model, tok = make_tiny_policy()
    Trainer(small_config(tmp_path, trainer={"steps": 1}), model=model, tokenizer=tok).train()
    assert not (tmp_path / "wandb").exists()
