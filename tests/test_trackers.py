"""The trackers of `trainer.report_to` (`entroprl.train.trackers`): each gets every step's
metrics under the names of metrics.jsonl. TensorBoard runs here; W&B (offline), MLflow (a file
store) and trackio (a local database) run in .venv-trl, which has the `trackers` extra
(scripts/test.sh)."""

import importlib.util
import sys
import time

import pytest

from entroprl.errors import ConfigError
from entroprl.train.rundir import read_metrics
from entroprl.train.trackers import mlflow_name
from entroprl.train.trainer import Trainer
from tests.policies import make_tiny_policy
from tests.test_trainer import small_config


def train(run, **trainer):
    model, tok = make_tiny_policy()
    config = small_config(run, trainer={"steps": 2, "eval_every": 0, **trainer})
    Trainer(config, model=model, tokenizer=tok).train()
    return read_metrics(run / "metrics.jsonl")


def numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}


def needs(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{module} is not installed here; scripts/test.sh runs this in .venv-trl",
    )


def test_tensorboard_gets_every_metric_of_every_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = train(tmp_path / "run", report_to=["tensorboard"])
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    for record in records:
        for key, value in numbers(record).items():
            (event,) = [e for e in events.Scalars(key) if e.step == record["step"]]
            assert event.value == pytest.approx(value, rel=1e-6, abs=1e-30), key
    assert len(events.Tags()["scalars"]) == len(numbers(records[-1]))


def test_no_tracker_writes_nothing_but_the_metrics(tmp_path):
    train(tmp_path / "run", report_to=[])
    assert not (tmp_path / "run" / "tb").exists()
    assert not (tmp_path / "run" / "wandb").exists()


def test_tracker_names_are_checked_where_the_config_is_read(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.report_to\[1\]: one of .*'wandb'"):
        small_config(tmp_path, trainer={"report_to": ["tensorboard", "neptune"]})
    with pytest.raises(ConfigError, match=r"trainer\.wandb_project: now trainer\.project"):
        small_config(tmp_path, trainer={"wandb_project": "x"})


@pytest.mark.trackers
@needs("wandb")
def test_wandb_offline_gets_the_same_names(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls, inits = [], []
    real_init = wandb.init

    def init(**kwargs):  # the real offline run, its log calls recorded on the way
        inits.append(kwargs)
        run = real_init(**kwargs)
        real_log = run.log
        monkeypatch.setattr(
            run, "log", lambda data, step: (calls.append((step, data)), real_log(data, step=step))
        )
        return run

    monkeypatch.setattr(wandb, "init", init)
    run = tmp_path / "run"
    records = train(run, report_to=["wandb"], project="test")
    assert inits[0]["project"] == "test" and inits[0]["name"] == "run"
    assert [step for step, _ in calls] == [r["step"] for r in records]
    for (_, data), record in zip(calls, records, strict=True):
        assert data == numbers(record)
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


@pytest.mark.trackers
@needs("mlflow")
def test_mlflow_gets_every_metric_and_the_configuration(tmp_path, monkeypatch):
    import mlflow

    uri = (tmp_path / "mlruns").as_uri()  # mlflow-skinny has no SQL store: the file store
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    records = train(tmp_path / "run", report_to=["mlflow"], project="entropy-test")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("entropy-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert float(run.data.params["optim.lr"]) == 1e-3
    for key in numbers(records[-1]):
        spelled = mlflow_name(key)
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, spelled)}
        assert history == pytest.approx({r["step"]: r[key] for r in records}), key
    assert mlflow_name("cov/top_0.02%") == "cov/top_0.02pct"


@pytest.mark.trackers
@needs("trackio")
def test_trackio_gets_every_metric(tmp_path, monkeypatch):
    import trackio.sqlite_storage as storage

    monkeypatch.setattr(storage, "TRACKIO_DIR", tmp_path / "trackio")
    records = train(tmp_path / "run", report_to=["trackio"], project="entropy-test")
    logs = storage.SQLiteStorage.get_logs("entropy-test", "run")
    assert [log["step"] for log in logs] == [r["step"] for r in records]
    for log, record in zip(logs, records, strict=True):
        for key, value in numbers(record).items():
            assert log[key] == pytest.approx(value), key


def test_a_run_without_trackers_needs_no_accelerate(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # `import accelerate` raises ImportError
    train(tmp_path / "run", report_to=[])
    with pytest.raises(ConfigError, match=r"trainer\.report_to needs .*pip install accelerate"):
        small_config(tmp_path, trainer={"report_to": ["tensorboard"]})
