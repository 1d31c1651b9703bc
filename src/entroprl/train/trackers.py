"""Where the metrics go besides `metrics.jsonl`: the experiment trackers named in
`trainer.report_to`, through Accelerate's tracker layer (the classes `Accelerator(log_with=...)`
starts), so every tracker Accelerate knows is one name away: tensorboard, wandb, mlflow, trackio,
aim, comet_ml, clearml, dvclive, swanlab.

Each is started as `Accelerator.init_trackers` starts it (the project name, and the run directory
for those that need one), with these choices so that a run's trackers line up with its files:
  tensorboard  events in RUN/tb; a resumed run hides the events of the steps it logs again
  wandb        a run named after the run directory, its files in RUN/wandb
               (`WANDB_MODE=offline` keeps it there)
  mlflow       a run named after the run directory in experiment `trainer.project`
               (`MLFLOW_TRACKING_URI` says where the tracking server or store is); a name
               MLflow refuses is spelled as it accepts (`mlflow_name`: `%` as `pct`)
  trackio      a run named after the run directory in project `trainer.project`
The configuration goes to each tracker but TensorBoard, whose hyper-parameter dashboard would add
a folder per start to RUN/tb (the run's configuration is RUN/config.yaml).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from entroprl.errors import ConfigError
from entroprl.train.rundir import naming


def names() -> list[str]:
    """The trackers `trainer.report_to` may name: Accelerate's."""
    return sorted(_tracking().LOGGER_TYPE_TO_CLASS)


def _tracking():
    """Accelerate's tracker module, imported when a run names a tracker (a run with
    `trainer.report_to=[]` does without Accelerate)."""
    try:
        from accelerate import tracking
    except ImportError as e:
        raise ConfigError(
            f"trainer.report_to needs Accelerate's tracker layer, which cannot be imported ({e}): "
            "pip install accelerate, or set trainer.report_to=[]"
        ) from None
    return tracking


_EXTRA = {"wandb": "entroprl[wandb]"}
"""How to install a tracker where it is not entroprl's own extra's name."""


def check(report_to: list[str]) -> None:
    """A ConfigError naming `trainer.report_to` for a tracker that is unknown or cannot be
    imported: before a run writes anything."""
    known = names() if report_to else []
    for i, name in enumerate(report_to):
        key = f"trainer.report_to[{i}]"
        if name not in known:
            raise ConfigError(f"{key}: unknown tracker {name!r}; known: {known}")
        if not getattr(_tracking(), f"is_{name}_available")():
            package = _EXTRA.get(name, name)
            raise ConfigError(
                f"{key}: {name} cannot be imported: pip install '{package}', or leave it out "
                "of trainer.report_to"
            )


@dataclasses.dataclass
class Started:
    """A started tracker, the path its failed writes are reported under, and how a metric's name
    is spelled for it."""

    tracker: Any  # an accelerate.tracking.GeneralTracker
    where: Path
    spell: Callable[[str], str] = str


def mlflow_name(name: str) -> str:
    """`name` as MLflow accepts it (alphanumerics, `_-. :/`): `cov/top_0.02%` is
    `cov/top_0.02pct`, any other character an underscore."""
    return re.sub(r"[^\w\-. :/]", "_", name.replace("%", "pct"))


@dataclasses.dataclass
class Trackers:
    """The started trackers of one run, logged to and finished together."""

    started: list[Started]

    def log(self, step: int, numbers: dict[str, float]) -> None:
        for s in self.started:
            with naming(s.where):  # a full disk surfaces here (a writer thread's error too)
                s.tracker.log({s.spell(k): v for k, v in numbers.items()}, step=step)

    def finish(self) -> None:
        for s in self.started:
            with naming(s.where):
                s.tracker.finish()


def start(
    report_to: list[str], run_dir: Path, project: str, config: dict[str, Any], first_step: int
) -> Trackers:
    """Start the trackers `report_to` for the run in `run_dir`, logging from `first_step` on."""
    check(report_to)
    if report_to:
        # Accelerate's trackers log through its process-aware logger, which needs its state: in a
        # process group entroprl has started, this only reads the rank (rank 0 starts trackers)
        from accelerate import PartialState

        PartialState()
    started = []
    for name in report_to:
        tracker = _make(name, run_dir, project, first_step)
        where = run_dir / ("tb" if name == "tensorboard" else name)
        with naming(where):
            tracker.start()
            if name != "tensorboard":
                tracker.store_init_configuration(_flat(config))
        started.append(Started(tracker, where, mlflow_name if name == "mlflow" else str))
    return Trackers(started)


def _make(name: str, run_dir: Path, project: str, first_step: int):
    """Accelerate's tracker `name`, made as `Accelerator.init_trackers` makes it."""
    cls = _tracking().LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":
        return cls("tb", run_dir, purge_step=first_step or None)
    if name == "wandb":
        return cls(project, name=run_dir.name, dir=str(run_dir))
    if name == "mlflow":
        return cls(experiment_name=project, run_name=run_dir.name)
    if name == "trackio":
        return cls(project, name=run_dir.name)
    if cls.requires_logging_directory:
        return cls(project, run_dir)
    return cls(project)


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 1e-6}}` as `{"optim.lr": 1e-6}`, lists as text: the scalars every
    tracker's configuration takes."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            scalar = value is None or isinstance(value, bool | int | float | str)
            out[f"{prefix}{key}"] = value if scalar else str(value)
    return out
