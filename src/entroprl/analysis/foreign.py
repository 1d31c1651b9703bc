"""Training logs of entroprl, TRL, verl, TensorBoard and W&B read into one per-step table, and
their metric names mapped to the quantities the analysis needs (documented in
docs/foreign-runs.md). The reader is chosen from the content, not the file name (`detect_format`):

    entroprl      RUN/ holding metrics.jsonl (or that file beside its config.yaml)
    trl           a Hugging Face trainer_state.json ("log_history"), or a folder holding one
    verl          JSON lines of {"step": N, "data": {...}}: verl's `file` logger
    jsonl         JSON lines of flat records with "step" or "global_step"
    verl-console  verl's console lines "step:N - key:value - ...", among any other output
    tensorboard   TensorBoard event files (or the one folder holding them), through tensorboard's
                  own EventAccumulator
    wandb         a CSV exported from a W&B run: its history (`_step`, metric columns) or a chart
                  export ("Step", "<run> - <metric>", "<run> - <metric>__MIN/__MAX")

Every reader gives a `MetricsTable`: the sorted logged steps and one float64 column per numeric
metric, NaN where a step did not log it. Records that share a step (a TRL evaluation logged beside
its training entry, a W&B history row per `log` call, a resumed run logging steps again) are
merged, a later present value winning.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from entroprl.errors import InputError
from entroprl.train.rundir import read_json_lines, read_metrics, read_text

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
    notes: tuple[str, ...] = ()

    @property
    def reader(self) -> str:
        """What read the log, in words (`READERS`), for reports."""
        return READERS[self.format].description


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
        raise InputError(f"{where}: step {value!r} is not an integer")
    if abs(value) > MAX_STEP:
        raise InputError(f"{where}: step {value!r} is out of range (over 2**53)")
    return int(value)


def _without(record: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != key}


def _table(
    fmt: str, source: Path, records: list[tuple[int, dict[str, Any]]], notes: tuple[str, ...] = ()
) -> MetricsTable:
    """Merge (step, record) pairs into a table; the numeric values of a record become columns."""
    by_step: dict[int, dict[str, float]] = {}
    for step, record in records:
        merged = by_step.setdefault(step, {})
        for key, value in record.items():
            number = _number(value)
            if number is not None and not (math.isnan(number) and key in merged):
                merged[key] = number
    if not by_step:
        raise InputError(f"{source}: holds no metrics records")
    steps = np.array(sorted(by_step), dtype=np.int64)
    keys = sorted({k for merged in by_step.values() for k in merged})
    columns = {
        key: np.array([by_step[s].get(key, math.nan) for s in steps.tolist()], dtype=np.float64)
        for key in keys
    }
    columns = {k: v for k, v in columns.items() if not np.isnan(v).all()}
    return MetricsTable(format=fmt, source=source, steps=steps, columns=columns, notes=notes)


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
        raise InputError(f"{file}: not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{file}: JSON nested too deeply to be a trainer state") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise InputError(f"{file}: no 'log_history' list (not a Hugging Face trainer_state.json)")
    records = []
    for i, entry in enumerate(history):
        if not isinstance(entry, dict) or "step" not in entry:
            raise InputError(f"{file}: log_history[{i}] has no 'step'")
        records.append((_step(entry["step"], f"{file}: log_history[{i}]"), _without(entry, "step")))
    return _table("trl", file, records)


def _json_lines(file: Path) -> list[tuple[int, dict[str, Any]]]:
    """(step, values) of JSON lines, {"step": N, "data": {...}} or flat records with "step" or
    "global_step", tolerating a truncated last line with a warning."""
    records = []
    for number, record in read_json_lines(file, stacklevel=3):
        data = record.get("data")
        values = data if isinstance(data, dict) else record
        key = next((k for k in ("step", "global_step") if k in record), None)
        if key is None:
            raise InputError(f"{file}:{number}: record has no 'step' or 'global_step'")
        step = _step(record[key], f"{file}:{number}")
        records.append((step, _without(values, key)))
    return records


def read_verl(path: str | Path) -> MetricsTable:
    """The JSON lines written by verl's `file` logger (`trainer.logger=[file]`), whatever the
    file's name."""
    file = Path(path)
    return _table("verl", file, _json_lines(file))


def read_json_lines_log(path: str | Path) -> MetricsTable:
    """JSON lines of flat records holding "step" or "global_step" (a log_history saved a record
    per line, or entroprl's metrics.jsonl away from its run directory)."""
    file = Path(path)
    return _table("jsonl", file, _json_lines(file))


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# verl's console logger prints `concat_dict_to_str(data, step)`: "step:N" then " - key:value" for
# every number; a Ray worker's output arrives prefixed "(TaskRunner pid=...) ".
_CONSOLE_STEP = re.compile(r"(?:^|\s)step:(-?\d+)((?: - .*)?)$")
# pprint.pformat of a numpy scalar under numpy 2: "np.float64(0.25)", "np.int64(3)"
_NUMPY_REPR = re.compile(r"np\.\w+\((.*)\)")


def _console_value(text: str) -> float | None:
    """A value printed by verl's console logger as a float; None for what is not a number."""
    text = text.strip()
    inner = _NUMPY_REPR.fullmatch(text)
    try:
        return float(inner.group(1) if inner else text)
    except ValueError:
        return None


def _console_records(text: str, file: Path) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """(step, values) of every console record line, and the number of other non-blank lines."""
    lines = text.splitlines()
    records, other = [], 0
    for number, raw in enumerate(lines, 1):
        line = _ANSI.sub("", raw).rstrip()
        found = _CONSOLE_STEP.search(line)
        if found is None:
            other += bool(line.strip())
            continue
        values: dict[str, Any] = {}
        for field in filter(None, found.group(2).split(" - ")):
            key, colon, value = field.rpartition(":")
            if not colon or not key.strip():
                if number == len(lines):
                    warnings.warn(f"{file}: incomplete last line {number} skipped", stacklevel=3)
                    break
                raise InputError(f"{file}:{number}: {field[:80]!r} is not key:value")
            values[key.strip()] = _console_value(value)
        else:
            records.append((_step(int(found.group(1)), f"{file}:{number}"), values))
    return records, other


def read_verl_console(path: str | Path) -> MetricsTable:
    """verl's console output (`trainer.logger=[console]`): the lines "step:N - key:value - ...",
    wherever they are among other output (Ray's prefixes, warnings, progress bars)."""
    file = Path(path)
    records, other = _console_records(read_text(file), file)
    notes = (f"{other} lines that are not step records skipped",) if other else ()
    return _table("verl-console", file, records, notes)


def _event_source(path: Path) -> tuple[Path, int]:
    """The event file, or the one folder holding event files under `path`, and how many files."""
    if path.is_file():
        if "tfevents" not in path.name:
            raise InputError(
                f"{path}: a TensorBoard event file, but tensorboard reads only files whose name "
                "holds 'tfevents': rename it (events.out.tfevents.<anything>)"
            )
        return path, 1
    folders: dict[Path, int] = {}
    for file in path.rglob("*tfevents*"):
        if file.is_file():
            folders[file.parent] = folders.get(file.parent, 0) + 1
    if len(folders) > 1:
        shown = ", ".join(str(f.relative_to(path)) for f in sorted(folders)[:5])
        raise InputError(
            f"{path}: TensorBoard event files in {len(folders)} folders ({shown}"
            f"{', ...' if len(folders) > 5 else ''}): give the folder of one run"
        )
    ((folder, count),) = folders.items()
    return folder, count


def read_tensorboard(path: str | Path) -> MetricsTable:
    """TensorBoard event files: an event file, or a folder with the event files of one run (in it
    or in one subfolder), read by tensorboard's `EventAccumulator`. Scalars written by
    `add_scalar` (torch, tensorboardX: verl, TRL, entroprl) and scalar tensors of the "scalars"
    plugin (`tf.summary.scalar`) become columns under their tag. A run restarted from a
    checkpoint has the events it had logged past that checkpoint dropped, as TensorBoard shows it.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    source, files = _event_source(Path(path))
    acc = ea.EventAccumulator(str(source), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    records = [
        (_step(e.step, f"{source}: {tag}"), {tag: e.value})
        for tag in tags[ea.SCALARS]
        for e in acc.Scalars(tag)
    ]
    for tag in tags[ea.TENSORS]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue
        for e in acc.Tensors(tag):
            value = tensor_util.make_ndarray(e.tensor_proto)
            if value.shape == () and np.issubdtype(value.dtype, np.number):
                records.append((_step(e.step, f"{source}: {tag}"), {tag: float(value)}))
    if not records:
        raise InputError(f"{source}: no scalar in its {files} TensorBoard event file(s)")
    return _table("tensorboard", source, records, (f"{files} event file(s) in {source}",))


def _csv_name(column: str) -> str:
    """A chart export names columns "<run> - <metric>"; the metric is after the last " - "."""
    return column.rsplit(" - ", 1)[-1]


def read_wandb_csv(path: str | Path) -> MetricsTable:
    """A CSV exported from one W&B run (history export or chart export)."""
    file = Path(path)
    try:
        rows = list(csv.reader(io.StringIO(read_text(file), newline="")))
    except csv.Error as e:  # a field over csv's limit (131,072 characters), a NUL byte
        raise InputError(f"{file}: not a CSV export ({e})") from None
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise InputError(f"{file}: empty CSV file")
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
            raise InputError(
                f"{file}: column {name!r} appears more than once"
                + (f" (runs {sorted(runs)}): export one run per file" if len(runs) > 1 else "")
            )
        kept[name] = index
    step_key = next((k for k in STEP_KEYS if k in kept), None)
    if step_key is None:
        raise InputError(
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
            raise InputError(f"{file}:{number}: step {raw_step!r} is not an integer") from None
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


def _detect_dir(path: Path) -> str:
    if (path / "metrics.jsonl").is_file():
        return "entroprl"
    if (path / "trainer_state.json").is_file():
        return "trl"
    if any(f.is_file() for f in path.rglob("*tfevents*")):
        return "tensorboard"
    raise InputError(
        f"{path}: not an entroprl run directory (no metrics.jsonl), a TRL checkpoint (no "
        "trainer_state.json) or a TensorBoard log (no events.out.tfevents.* file)"
    )


def _detect_json(path: Path, text: str) -> str:
    """trl, verl, jsonl or entroprl for a file whose content starts with "{"."""
    try:
        whole = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        whole = None  # several JSON documents (JSON lines), or a truncated one
    # a trainer state holds "global_step" too, but a metrics record has "step" or "data"
    if isinstance(whole, dict) and ("log_history" in whole or not {"step", "data"} & whole.keys()):
        return "trl"  # read_trl names what is missing when it is not a trainer state
    first = next(line for line in text.splitlines() if line.strip())
    try:
        record = json.loads(first)
    except (json.JSONDecodeError, RecursionError):
        raise InputError(f"{path}:1: not a JSON object: {first[:80]!r}") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}:1: not a JSON object: {first[:80]!r}")
    if isinstance(record.get("data"), dict):
        return "verl"
    if "step" not in record and "global_step" not in record:
        raise InputError(f"{path}:1: no 'step' or 'global_step': not a metrics log")
    if path.name == "metrics.jsonl" and (path.parent / "config.yaml").is_file():
        return "entroprl"
    return "jsonl"


def _has_step_column(text: str) -> bool:
    try:
        header = next(csv.reader(io.StringIO(text.split("\n", 1)[0])), [])
    except csv.Error:  # a field over csv's limit: no CSV header
        return False
    return len(header) > 1 and any(cell.strip() in STEP_KEYS for cell in header)


def detect_format(path: str | Path) -> str:
    """Which of FORMATS `path` holds, from what is in it (the module docstring lists them); a
    ".csv" name is taken as a W&B export. Raises ValueError naming the path when it is none."""
    path = Path(path)
    if path.is_dir():
        return _detect_dir(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file or directory")
    with open(path, "rb") as f:
        head = f.read(64)
    # an event file is a TFRecord whose first record is the Event holding "brain.Event:<version>"
    if b"brain.Event:" in head or "tfevents" in path.name:
        return "tensorboard"
    if path.suffix.lower() == ".csv":
        return "wandb"
    text = read_text(path)
    if not text.strip():
        raise InputError(f"{path}: empty file")
    if text.lstrip().startswith("{"):
        return _detect_json(path, text)
    if any(_CONSOLE_STEP.search(_ANSI.sub("", line).rstrip()) for line in text.splitlines()):
        return "verl-console"
    if _has_step_column(text):
        return "wandb"
    raise InputError(
        f"{path}: unknown log format: not an entroprl run, a trainer_state.json, JSON lines with "
        "a step, verl console lines (step:N - key:value), TensorBoard events or a CSV with a step "
        "column"
    )


@dataclass(frozen=True)
class Reader:
    """A log format's reader and what it reads, in words."""

    read: Callable[[str | Path], MetricsTable]
    description: str


READERS = {
    "entroprl": Reader(read_entroprl, "entroprl's metrics.jsonl"),
    "trl": Reader(read_trl, "the log_history of a Hugging Face trainer_state.json (TRL)"),
    "verl": Reader(read_verl, 'verl JSON lines ({"step": N, "data": {...}}, its file logger)'),
    "jsonl": Reader(read_json_lines_log, "JSON lines of flat records with step or global_step"),
    "verl-console": Reader(read_verl_console, "verl console lines (step:N - key:value - ...)"),
    "tensorboard": Reader(read_tensorboard, "TensorBoard event files (tensorboard's reader)"),
    "wandb": Reader(read_wandb_csv, "a W&B CSV export"),
}
FORMATS = tuple(READERS)


def read_log(path: str | Path) -> MetricsTable:
    """Detect the format of `path` and read it into a `MetricsTable`."""
    return READERS[detect_format(path)].read(path)


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
        raise InputError(f"{name} key {key!r} is not in the log; columns: {', '.join(near[:30])}")
    return key


def map_keys(
    table: MetricsTable,
    *,
    entropy_key: str | None = None,
    accuracy_key: str | None = None,
    require: bool = True,
) -> KeyMap:
    """Guess the entropy, accuracy and reward columns (docs/foreign-runs.md), or check the given
    ones. Raises ValueError when a given key is not a column, or (with `require`) when neither an
    entropy nor an accuracy column can be found; without it, that is a note."""
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
        missing = (
            f"{table.source}: no entropy or accuracy metric recognised among "
            f"{', '.join(columns[:30]) or 'no numeric columns'}; name them with --entropy-key and "
            "--accuracy-key (docs/foreign-runs.md lists the names recognised)"
        )
        if require:
            raise InputError(missing)
        notes.append(missing)
    reward = next((k for k in REWARD_KEYS if k in table.columns), None)
    return KeyMap(entropy=entropy, accuracy=accuracy, reward=reward, notes=tuple(notes))


def mapped_series(table: MetricsTable, keys: KeyMap) -> dict[str, np.ndarray]:
    """The "entropy", "accuracy" and "reward" per step (NaN where missing). Several accuracy
    columns are averaged only at steps where all of them are present, so that every point averages
    the same sources. Raises ValueError when a column used holds inf."""
    for key in (keys.entropy, *keys.accuracy, keys.reward):
        bad = np.flatnonzero(np.isinf(table.columns[key])) if key is not None else ()
        if len(bad):
            raise InputError(f"{table.source}: {key} is infinite at step {table.steps[bad[0]]}")
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
