"""The run directory: resolved config, metrics, TensorBoard events, checkpoints, rollout samples.

    RUN/config.yaml                   the resolved configuration
    RUN/metrics.jsonl                 one JSON object per step, appended and flushed
    RUN/tb/                           TensorBoard events
    RUN/wandb/                        the Weights & Biases run, when trainer.wandb is set
    RUN/rollouts/step_000010.jsonl    rollouts with per-token log-prob, entropy, advantage, cov
    RUN/checkpoints/step_000010/      model/ (HF format, safetensors), optimizer.safetensors,
                                      state.json, rng.safetensors
    RUN/checkpoints/latest            name of the newest complete checkpoint

Everything a resumed run reads is written to a temporary name and renamed into place, so a run
killed at any moment leaves either the old or the new file, never half of one. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing value reads back as null
    return value


class MetricsLog:
    """`metrics.jsonl` (append, flush per line) mirrored to TensorBoard and to a Weights & Biases
    run, under the same metric names."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, wandb_run=None):
        self.file = open(path, "a")  # noqa: SIM115 - held open for the whole run, closed in close()
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))
        self.wandb_run = wandb_run

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def read_json_lines(path: Path, *, stacklevel: int = 2) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line of a JSON-lines file. A truncated last line (a run killed
    mid-write) is skipped with a warning; any other bad line raises ValueError naming it."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                warnings.warn(
                    f"{path}:{number}: incomplete last line (run killed mid-write?); "
                    f"read the {len(records)} complete records before it",
                    stacklevel=stacklevel + 1,
                )
                break
            raise ValueError(f"{path}:{number}: not a JSON object: {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object: {line[:80]!r}")
        records.append((number, record))
    return records


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read `metrics.jsonl`: one record per step, the last written wins (a resumed run re-logs the
    steps after its checkpoint). A truncated last line (a run killed mid-write) is skipped with a
    warning; an empty file or one with no step records raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such metrics file")
    by_step: dict[int, dict[str, Any]] = {}
    for number, record in read_json_lines(path, stacklevel=2):
        if not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: not an entroprl metrics record (no integer 'step')")
        by_step[record["step"]] = record
    if not by_step:
        raise ValueError(f"{path}: holds no metrics records")
    return [by_step[s] for s in sorted(by_step)]


def _optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a name-keyed optimizer state dict (`parallel.optimizer_state`) into safetensors
    tensors ``"<parameter name>.<slot>"`` and the JSON rest."""
    tensors, scalars = {}, {}
    for param, slots in state["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}.{slot}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param}.{slot}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        param, slot = key.rsplit(".", 1)  # parameter names have dots, slot names do not
        state.setdefault(param, {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = s
    return states


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def metrics_log(
        self,
        tensorboard: bool,
        *,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> MetricsLog:
        """The run's metrics log, mirrored to TensorBoard, and to a W&B run of `wandb_project`
        (named after the run directory, holding `config`) when one is given; `WANDB_MODE=offline`
        keeps that run on disk in RUN/wandb."""
        return MetricsLog(
            self.path / "metrics.jsonl",
            self.path / "tb" if tensorboard else None,
            wandb_run=None if wandb_project is None else self._wandb_run(wandb_project, config),
        )

    def _wandb_run(self, project: str, config: dict[str, Any] | None):
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "trainer.wandb=true needs Weights & Biases: pip install 'entroprl[wandb]'"
            ) from None
        return wandb.init(project=project, name=self.path.name, dir=self.path, config=config)

    def write_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        folder = self.path / "rollouts"
        folder.mkdir(exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write_text(folder / f"step_{step:06d}.jsonl", text)

    def save_checkpoint(
        self,
        step: int,
        model,
        tokenizer,
        model_state: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any],
        state: dict[str, Any],
        keep: int = 2,
    ) -> Path:
        """Write checkpoint `step` completely under a temporary name, then rename it into place.

        `model_state` and `optimizer_state` are full state dicts (`parallel.model_state`,
        `parallel.optimizer_state`); `model` gives the Hugging Face config and save format."""
        self.checkpoints.mkdir(exist_ok=True)
        name = f"step_{step:06d}"
        tmp = self.checkpoints / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model.save_pretrained(tmp / "model", state_dict=model_state, safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        tensors, meta = _optimizer_to_tensors(optimizer_state)
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        save_file(_rng_tensors(), tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
        final = self.checkpoints / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(self.checkpoints / "latest", name)
        for old in sorted(self.checkpoints.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if not pointer.is_file():
            return None
        path = self.checkpoints / pointer.read_text().strip()
        return path if (path / "state.json").is_file() else None


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """The full optimizer state dict of checkpoint `path`, keyed by parameter name."""
    meta = json.loads((path / "optimizer.json").read_text())
    return _optimizer_from_tensors(load_file(path / "optimizer.safetensors"), meta)


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    """Restore every RNG from checkpoint `path`; return its state.json."""
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return json.loads((path / "state.json").read_text())
