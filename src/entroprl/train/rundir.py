"""The run directory: resolved config, metrics, TensorBoard events, checkpoints, rollout samples.

    RUN/config.yaml                   the resolved configuration the run started with
    RUN/config.step_000010.yaml       the configuration of the steps after 10, when a run resumed
                                      from checkpoint 10 with another (`RunDir.write_config`)
    RUN/.lock                         held by the process that trains in RUN (`lock_directory`)
    RUN/metrics.jsonl                 one JSON object per step, appended and flushed
    RUN/tb/                           TensorBoard events, when trainer.report_to names it
    RUN/wandb/                        the Weights & Biases run, when trainer.report_to names it
    RUN/rollouts/step_000010.jsonl    rollouts with per-token log-prob, entropy, advantage, cov
    RUN/checkpoints/                  see `entroprl.train.checkpoint`

Everything a resumed run reads is written to a temporary name and renamed into place, so a run
killed at any moment leaves either the old or the new file, never half of one; the one exception,
metrics.jsonl, is appended a line at a time, and a resumed run first cuts it back to the whole
lines of the steps before the ones it runs (`trim_metrics`). Reading the metrics needs no torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from entroprl.errors import InputError, TrainingError

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")
"""A directory holding any of these holds a run."""
RUN_ENTRIES = (*RUN_MARKERS, "rollouts", "tb", "analysis")
"""What a run (and its default analysis) writes in its directory: what `RunDir.clear` deletes,
with the configurations of its later segments (`SEGMENT_CONFIG`)."""
SEGMENT_CONFIG = re.compile(r"config\.step_(\d+)\.yaml")
LOCK = ".lock"


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Give an OSError raised inside without a file name (a failed write: disk full) `path` as
    its file name, so that the message says where."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def make_dir(path: Path) -> None:
    """`mkdir -p path`; a file in the way is a NotADirectoryError naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # exist_ok accepts a directory only
        raise NotADirectoryError(
            errno.ENOTDIR, "exists and is not a directory", str(path)
        ) from None


def read_text(path: Path) -> str:
    """The UTF-8 text of `path`, a byte-order mark dropped; ValueError naming the file and line
    where it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (save or export it as UTF-8)") from None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    # naming outside open: a failed flush fails again when the file closes, and that error, which
    # replaces the first, must name the file too
    with naming(path), open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _holder(fd: int) -> str:
    """The "pid host" a lock file records; its holder writes it just after locking, so a second
    process started at the same moment waits for it, a second at most."""
    for _ in range(100):
        text = os.pread(fd, 300, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return ""


@contextlib.contextmanager
def lock_directory(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on `directory` for the block: `flock` on its `.lock` file, which
    records the holder's pid and host. Another process holding it is a TrainingError naming that
    pid. The operating system releases the lock when the process ends, however it ends (SIGKILL
    included), so a lock is never left behind; the file stays, unlocked."""
    path = directory / LOCK
    with naming(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, host = _holder(fd).partition(" ")
            raise TrainingError(
                f"{directory} is in use by another entroprl process (pid {pid or 'unknown'}"
                f"{f' on {host}' if host else ''}): wait for it to end, or stop it, first; "
                "two processes in one run directory would mix their steps"
            ) from None
        with naming(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _jsonable(value: Any) -> Any:
    item = getattr(value, "item", None)  # a tensor or numpy scalar
    if item is not None:
        value = item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing value reads back as null
    return value


def trim_metrics(path: Path, first_step: int) -> None:
    """Make metrics file `path` hold only the whole records of steps before `first_step`: a
    cut-off last line (a run killed mid-write) goes, and so do the records of the steps a resumed
    run logs again, so that the file holds each step once. Rewritten atomically, and only when
    something goes; a bad line other than the last raises ValueError naming it."""
    if not path.is_file():
        return
    lines = read_text(path).splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.endswith("\n"):
            break  # cut off: only the last line can be
        try:
            step = json.loads(line)["step"] if line.strip() else None
        except (ValueError, KeyError, TypeError, RecursionError):
            raise InputError(f"{path}:{number}: not a metrics record: {line[:80]!r}") from None
        if isinstance(step, int) and step < first_step:
            kept.append(line)
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))


class MetricsLog:
    """`metrics.jsonl` (append, flush per line) mirrored to the run's trackers
    (`entroprl.train.trackers`), under the same metric names."""

    def __init__(self, path: Path, first_step: int = 0, trackers=None):
        """Append to `path` from `first_step` on (`trim_metrics` first drops what comes after);
        `trackers`: an `entroprl.train.trackers.Trackers`, or None."""
        trim_metrics(path, first_step)
        self.path, self.trackers = path, trackers
        self.file = open(path, "a")  # noqa: SIM115 - held open for the whole run, closed in close()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with naming(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        if self.trackers is not None:
            numbers = {
                k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)
            }
            self.trackers.log(step, numbers)

    def close(self) -> None:
        with naming(self.path):  # the buffer of a failed write is written again here
            self.file.close()
        if self.trackers is not None:
            self.trackers.finish()


def read_json_lines(path: Path, *, stacklevel: int = 2) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line of a JSON-lines file. A truncated last line (a run killed
    mid-write) is skipped with a warning; any other bad line raises ValueError naming it."""
    lines = read_text(path).splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise InputError(f"{path}:{number}: JSON nested too deeply to be a record") from None
        except json.JSONDecodeError:
            if number == len(lines):
                warnings.warn(
                    f"{path}:{number}: incomplete last line (run killed mid-write?); "
                    f"read the {len(records)} complete records before it",
                    stacklevel=stacklevel + 1,
                )
                break
            raise InputError(f"{path}:{number}: not a JSON object: {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: not a JSON object: {line[:80]!r}")
        records.append((number, record))
    return records


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read `metrics.jsonl`: one record per step, the last written wins (files written before
    resumed runs trimmed them hold some steps twice). A truncated last line (a run killed
    mid-write) is skipped with a warning; an empty file or one with no step records raises
    ValueError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such metrics file")
    by_step: dict[int, dict[str, Any]] = {}
    for number, record in read_json_lines(path, stacklevel=2):
        if not isinstance(record.get("step"), int):
            raise InputError(f"{path}:{number}: not an entroprl metrics record (no integer 'step')")
        by_step[record["step"]] = record
    if not by_step:
        raise InputError(f"{path}: holds no metrics records")
    return [by_step[s] for s in sorted(by_step)]


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        make_dir(self.path)
        self.checkpoints = self.path / "checkpoints"

    def holds_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_MARKERS)

    def clear(self) -> None:
        """Delete the run held here (`RUN_ENTRIES` and its segment configurations); other files
        stay."""
        for name in RUN_ENTRIES:
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for _, path in self.segment_configs():
            path.unlink()

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """`lock_directory` on the run directory: held while a process trains in it."""
        return lock_directory(self.path)

    def segment_configs(self) -> list[tuple[int, Path]]:
        """(N, config.step_N.yaml) for each configuration of steps after checkpoint N, by N."""
        found = []
        for path in self.path.glob("config.step_*.yaml"):
            match = SEGMENT_CONFIG.fullmatch(path.name)
            if match:
                found.append((int(match[1]), path))
        return sorted(found)

    def config_of_step(self, step: int) -> tuple[Path, dict[str, Any]] | None:
        """The file and the configuration that ran `step`: config.step_N.yaml with the greatest
        N below `step`, else config.yaml; None when neither is there. A file that does not hold
        a YAML mapping is a ValueError naming it."""
        earlier = [path for n, path in self.segment_configs() if n < step]
        path = earlier[-1] if earlier else self.path / "config.yaml"
        if not path.is_file():
            return None
        try:
            values = yaml.safe_load(read_text(path))
        except yaml.YAMLError:
            values = None
        if not isinstance(values, dict):
            raise InputError(f"{path}: not a configuration written by entroprl (damaged?)")
        return path, values

    def write_config(self, config: dict[str, Any], after: int = 0) -> Path | None:
        """Record the configuration of the steps after checkpoint `after`: config.yaml for a run
        from step 0 (the configurations of any later segments go); for a resumed run,
        config.step_<after>.yaml when it differs from the configuration that ran step `after`,
        and the configurations of the segments from `after` on go (their steps run again).
        Returns the file written, if one is."""
        for n, path in self.segment_configs():
            if n >= after:
                path.unlink()
        text = yaml.safe_dump(config, sort_keys=False)
        if after == 0:
            target = self.path / "config.yaml"
        else:
            before = self.config_of_step(after)
            if before is not None and before[1] == yaml.safe_load(text):
                return None
            target = self.path / f"config.step_{after:06d}.yaml"
        atomic_write_text(target, text)
        return target

    def metrics_log(self, first_step: int = 0, trackers=None) -> MetricsLog:
        """The run's metrics log from `first_step` on, mirrored to `trackers`
        (`entroprl.train.trackers.start`)."""
        return MetricsLog(self.path / "metrics.jsonl", first_step, trackers)

    def write_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        folder = self.path / "rollouts"
        folder.mkdir(exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write_text(folder / f"step_{step:06d}.jsonl", text)
