"""The trainer's optional Weights & Biases logger, offline (runs in .venv-trl: scripts/test.sh)."""

import time

import pytest

pytestmark = pytest.mark.wandb
wandb = pytest.importorskip(
    "wandb",
    reason="wandb is not installed in this environment; scripts/test.sh runs these in .venv-trl",
)

from entroprl.train.rundir import read_metrics  # noqa: E402
from entroprl.train.trainer import Trainer  # noqa: E402
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
    # and W&B wrote them to its offline run under those names. Its writer is another process
    # that may still be flushing when `finish()` returns, so the file is read until it holds them.
    (history,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    names = {key for _, data in calls for key in data}
    deadline = time.monotonic() + 60
    while (missing := sorted(k for k in names if k.encode() not in history.read_bytes())) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert missing == []


def test_wandb_is_off_by_default(tmp_path):
    model, tok = make_tiny_policy()
    Trainer(small_config(tmp_path, trainer={"steps": 1}), model=model, tokenizer=tok).train()
    assert not (tmp_path / "wandb").exists()
