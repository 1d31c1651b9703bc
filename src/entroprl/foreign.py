"""Training logs of entroprl, TRL, verl and W&B read into one per-step table, and their metric
names mapped to the quantities the analysis needs (documented in docs/foreign-runs.md).

    entroprl   RUN/ holding metrics.jsonl (or that file itself)
    trl        trainer_state.json (its "log_history"), or a checkpoint folder holding one
    verl       the JSON lines of verl's `file` logger: {"step": N, "data": {...}} or flat records
    wandb      a CSV exported from a W&B run: its history (`_step`, metric columns) or a chart
               export ("Step", "<run> - <metric>", "<run> - <metric>__MIN/__MAX")

Every reader gives a `MetricsTable`: the sorted logged steps and one float64 column per numeric
metric, NaN where a step did not log it. Records that share a step (a TRL evaluation logged beside
its training entry, a W&B history row per `log` call) are merged, a later present value winning.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from entroprl.rundir import read_json_lines, read_metrics, read_text

FORMATS = ("entroprl", "trl", "verl", "wandb")

# In order of preference. The paper's H is the sequence-mean of token-mean entropy, which only
# entroprl logs (its trainer, and TRL's with entroprl.integrations.trl: "entropy_seq_mean"); the
# others log the token-weighted mean. verl before 0.4 named its entropy "actor/entropy_loss" (the
# value of the entropy, not a loss).
ENTROPY_KEYS = (
    "actor/entropy_seq_mean",
    "entropy_seq_mean",
    "train/entropy_seq_mean",
    "actor/entropy",
    "entropy",
    "train/entropy",
    "actor/entropy_loss",
)
REWARD_KEYS = ("critic/score/mean", "critic/rewards/mean", "reward", "train/reward")
# entroprl's own names with a logger's prefix: verl prefixes "actor/" to what a policy loss returns
# (entroprl.integrations.verl); W&B's Hugging Face callback prefixes "train/" to TRL's metrics
# (entroprl.integrations.trl, which logs the plain names to trainer_state.json).
METRIC_PREFIXES = ("", "actor/", "train/")
# W&B's step counts `log` calls; the trainer's own step comes first where both were logged.
STEP_KEYS = ("train/global_step", "global_step", "step", "Step", "_step")

_VAL_CORE = re.compile(r"^val-core/(?P<source>.+)/(?P<var>[^/]+)/mean@(?P<n>\d+)$")
_VAL_CORE_VARS = ("acc", "reward", "score")
_OLD_VERL = re.compile(r"^val/test_score/(?P<source>.+)$")
_EVAL_ACCURACY = re.compile(r"^eval[_/].*accuracy", re.IGNORECASE)


@dataclass(frozen=True, eq=False)
class MetricsTable:
    """Per-step metrics of one run: `steps` sorted and unique, each column aligned with it."""

    format: str
    source: Path
    steps: np.ndarray
    columns: dict[str, np.ndarray]


@dataclass(frozen=True)
class KeyMap:
    """Which columns hold the entropy, the accuracy (averaged when several) and the reward."""

    entropy: str | None
    accuracy: tuple[str, ...]
    reward: str | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "entropy": self.entropy,
            "accuracy": list(self.accuracy),
            "reward": self.reward,
            "notes": list(self.notes),
        }


def _number(value: Any) -> float | None:
    """A logged value as a float, NaN for a missing one (null); None for what is not a number
    (text, lists, booleans), which is left out of the table."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if value is None:
        return math.nan
    return None


MAX_STEP = 2**53
"""Largest step read: CSV steps are read as floats, which hold integers exactly up to here (and
the table's steps are 64-bit integers)."""


def _step(value: Any, where: str) -> int:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and value == int(value)):
        raise ValueError(f"{where}: step {value!r} is not an integer")
    if abs(value) > MAX_STEP:
        raise ValueError(f"{where}: step {value!r} is out of range (over 2**53)")
    return int(value)


def _without(record: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != key}


def _table(fmt: str, source: Path, records: list[tuple[int, dict[str, Any]]]) -> MetricsTable:
    """Merge (step, record) pairs into a table; the numeric values of a record become columns."""
    by_step: dict[int, dict[str, float]] = {}
    for step, record in records:
        merged = by_step.setdefault(step, {})
        for key, value in record.items():
            number = _number(value)
            if number is not None and not (math.isnan(number) and key in merged):
                merged[key] = number
    if not by_step:
        raise ValueError(f"{source}: holds no metrics records")
    steps = np.array(sorted(by_step), dtype=np.int64)
    keys = sorted({k for merged in by_step.values() for k in merged})
    columns = {
        key: np.array([by_step[s].get(key, math.nan) for s in steps.tolist()], dtype=np.float64)
        for key in keys
    }
    columns = {k: v for k, v in columns.items() if not np.isnan(v).all()}
    return MetricsTable(format=fmt, source=source, steps=steps, columns=columns)


def read_entroprl(path: str | Path) -> MetricsTable:
    """An entroprl run directory (or its metrics.jsonl), through `rundir.read_metrics`."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    records = [(_step(r["step"], str(file)), _without(r, "step")) for r in read_metrics(file)]
    return _table("entroprl", file, records)


def read_trl(path: str | Path) -> MetricsTable:
    """TRL's `trainer_state.json` (or a checkpoint folder holding one): its "log_history"."""
    path = Path(path)
    file = path / "trainer_state.json" if path.is_dir() else path
    try:
        state = json.loads(read_text(file))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{file}: JSON nested too deeply to be a trainer state") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ValueError(f"{file}: no 'log_history' list (not a Hugging Face trainer_state.json)")
    records = []
    for i, entry in enumerate(history):
        if not isinstance(entry, dict) or "step" not in entry:
            raise ValueError(f"{file}: log_history[{i}] has no 'step'")
        records.append((_step(entry["step"], f"{file}: log_history[{i}]"), _without(entry, "step")))
    return _table("trl", file, records)


def _read_json_lines(file: Path) -> list[tuple[int, dict[str, Any]]]:
    """(step, values) of verl's JSON lines, tolerating a truncated last line with a warning."""
    records = []
    for number, record in read_json_lines(file, stacklevel=3):
        data = record.get("data")
        values = data if isinstance(data, dict) else record
        key = next((k for k in ("step", "global_step") if k in record), None)
        if key is None:
            raise ValueError(f"{file}:{number}: record has no 'step' or 'global_step'")
        step = _step(record[key], f"{file}:{number}")
        records.append((step, _without(values, key)))
    return records


def read_verl(path: str | Path) -> MetricsTable:
    """The JSON lines written by verl's `file` logger (`trainer.logger=[file]`)."""
    file = Path(path)
    return _table("verl", file, _read_json_lines(file))


def _csv_name(column: str) -> str:
    """A chart export names columns "<run> - <metric>"; the metric is after the last " - "."""
    return column.rsplit(" - ", 1)[-1]


def read_wandb_csv(path: str | Path) -> MetricsTable:
    """A CSV exported from one W&B run (history export or chart export)."""
    file = Path(path)
    rows = list(csv.reader(io.StringIO(read_text(file), newline="")))
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise ValueError(f"{file}: empty CSV file")
    header = rows[0]
    kept: dict[str, int] = {}
    runs: set[str] = set()
    for index, column in enumerate(header):
        if column.endswith(("__MIN", "__MAX")) or not column.strip():
            continue
        name = _csv_name(column)
        if name != column:
            runs.add(column.rsplit(" - ", 1)[0])
        if name in kept:
            raise ValueError(
                f"{file}: column {name!r} appears more than once"
                + (f" (runs {sorted(runs)}): export one run per file" if len(runs) > 1 else "")
            )
        kept[name] = index
    step_key = next((k for k in STEP_KEYS if k in kept), None)
    if step_key is None:
        raise ValueError(
            f"{file}: no step column (looked for {', '.join(STEP_KEYS)}); columns: "
            f"{', '.join(list(kept)[:20])}"
        )
    records = []
    for number, row in enumerate(rows[1:], 2):
        if not row:
            continue
        cells = {name: row[i] if i < len(row) else "" for name, i in kept.items()}
        raw_step = cells.pop(step_key).strip()
        if not raw_step:
            continue
        try:
            value = float(raw_step)
        except ValueError:
            raise ValueError(f"{file}:{number}: step {raw_step!r} is not an integer") from None
        step = _step(value, f"{file}:{number}")
        records.append((step, {k: _csv_float(v) for k, v in cells.items()}))
    return _table("wandb", file, records)


def _csv_float(cell: str) -> float | str:
    """A CSV cell as a float; an empty cell or "nan" is missing, other text stays text."""
    text = cell.strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return text


def detect_format(path: str | Path) -> str:
    """Which of FORMATS `path` is, from its name and first record (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        if (path / "metrics.jsonl").is_file():
            return "entroprl"
        if (path / "trainer_state.json").is_file():
            return "trl"
        raise ValueError(
            f"{path}: neither an entroprl run directory (no metrics.jsonl) nor a TRL checkpoint "
            "(no trainer_state.json)"
        )
    if not path.is_file():
        raise ValueError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "wandb"
    if suffix == ".json":
        return "trl"
    if suffix == ".jsonl":
        first = next((line for line in read_text(path).splitlines() if line.strip()), None)
        if first is None:
            raise ValueError(f"{path}: empty file")
        try:
            record = json.loads(first)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"{path}:1: not a JSON object: {first[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:1: not a JSON object: {first[:80]!r}")
        if isinstance(record.get("data"), dict):
            return "verl"
        if "step" not in record and "global_step" not in record:
            raise ValueError(f"{path}:1: no 'step' or 'global_step': not a metrics log")
        if path.name == "metrics.jsonl" and (path.parent / "config.yaml").is_file():
            return "entroprl"
        return "verl"
    raise ValueError(
        f"{path}: unknown log format (expected a run directory, trainer_state.json, *.jsonl or "
        "*.csv)"
    )


READERS = {"entroprl": read_entroprl, "trl": read_trl, "verl": read_verl, "wandb": read_wandb_csv}


def read_log(path: str | Path) -> MetricsTable:
    """Detect the format of `path` and read it into a `MetricsTable`."""
    return READERS[detect_format(path)](path)


def find_metric(table: MetricsTable, name: str) -> str | None:
    """The column holding entroprl's metric `name` (such as "cov/all"), logged as is or under one
    of METRIC_PREFIXES; None when the log has none."""
    return next((p + name for p in METRIC_PREFIXES if p + name in table.columns), None)


def _accuracy_keys(columns: list[str]) -> tuple[tuple[str, ...], str | None]:
    """The accuracy columns to average, and a note on the choice when there was one."""
    by_var: dict[str, dict[str, tuple[int, str]]] = {}
    for key in columns:
        m = _VAL_CORE.match(key)
        if m:
            best = by_var.setdefault(m["var"], {}).get(m["source"])
            if best is None or int(m["n"]) > best[0]:
                by_var[m["var"]][m["source"]] = (int(m["n"]), key)
    for var in _VAL_CORE_VARS:
        if var in by_var:
            keys = tuple(key for _, key in sorted(by_var[var].values(), key=lambda t: t[1]))
            note = f"accuracy averaged over {len(keys)} sources" if len(keys) > 1 else None
            return keys, note
    old = tuple(sorted(k for k in columns if _OLD_VERL.match(k)))
    if old:
        return old, f"accuracy averaged over {len(old)} sources" if len(old) > 1 else None
    evals = sorted(k for k in columns if _EVAL_ACCURACY.match(k) and "std" not in k.lower())
    if evals:
        means = [k for k in evals if k.endswith("/mean")] or evals
        note = f"accuracy from {means[0]!r}; also found {means[1:]}" if len(means) > 1 else None
        return (means[0],), note
    return (), None


def _require(name: str, key: str, columns: list[str]) -> str:
    if key not in columns:
        tail = key.rsplit("/", 1)[-1].lower()
        near = [c for c in columns if tail in c.lower()] or columns
        raise ValueError(f"{name} key {key!r} is not in the log; columns: {', '.join(near[:30])}")
    return key


def map_keys(
    table: MetricsTable, *, entropy_key: str | None = None, accuracy_key: str | None = None
) -> KeyMap:
    """Guess the entropy, accuracy and reward columns (docs/foreign-runs.md), or check the given
    ones. Raises ValueError when a given key is not a column, or when neither an entropy nor an
    accuracy column can be found."""
    columns = list(table.columns)
    notes = []
    if entropy_key is not None:
        entropy = _require("entropy", entropy_key, columns)
    else:
        entropy = next((k for k in ENTROPY_KEYS if k in table.columns), None)
        if entropy is not None and not entropy.endswith("entropy_seq_mean"):
            notes.append(
                f"entropy from {entropy!r}: a token-weighted mean, not the paper's sequence-mean"
            )
    if accuracy_key is not None:
        accuracy = (_require("accuracy", accuracy_key, columns),)
    else:
        accuracy, note = _accuracy_keys(columns)
        if note:
            notes.append(note)
    if entropy is None and not accuracy:
        raise ValueError(
            f"{table.source}: no entropy or accuracy metric recognised among "
            f"{', '.join(columns[:30]) or 'no numeric columns'}; name them with --entropy-key and "
            "--accuracy-key (docs/foreign-runs.md lists the names recognised)"
        )
    reward = next((k for k in REWARD_KEYS if k in table.columns), None)
    return KeyMap(entropy=entropy, accuracy=accuracy, reward=reward, notes=tuple(notes))


def mapped_series(table: MetricsTable, keys: KeyMap) -> dict[str, np.ndarray]:
    """The "entropy", "accuracy" and "reward" per step (NaN where missing). Several accuracy
    columns are averaged only at steps where all of them are present, so that every point averages
    the same sources. Raises ValueError when a column used holds inf."""
    for key in (keys.entropy, *keys.accuracy, keys.reward):
        bad = np.flatnonzero(np.isinf(table.columns[key])) if key is not None else ()
        if len(bad):
            raise ValueError(f"{table.source}: {key} is infinite at step {table.steps[bad[0]]}")
    n = table.steps.size
    missing = np.full(n, np.nan)
    accuracy = (
        np.mean(np.stack([table.columns[k] for k in keys.accuracy]), axis=0)
        if keys.accuracy
        else missing
    )
    return {
        "entropy": table.columns[keys.entropy] if keys.entropy else missing,
        "accuracy": accuracy,
        "reward": table.columns[keys.reward] if keys.reward else missing,
    }
