"""Checkpoints: written whole under a temporary name, renamed into place, verified before use.

    CHECKPOINTS/step_000010/   model/ (Hugging Face format, safetensors, with the tokenizer),
                               optimizer.safetensors, optimizer.json, rng.safetensors, state.json
    CHECKPOINTS/latest         the name of the newest checkpoint, for people and scripts

`state.json` is written last, once every other file is written and synced to disk, and records
the size and SHA-256 of each of them; then the folder is renamed into place. A run killed at any
moment therefore leaves no checkpoint of that step or a complete one, and a checkpoint damaged
afterwards (a truncated copy, flipped bytes) fails `verify`. A run resumes from the valid
checkpoint with the highest step read from state.json (`find_resumable`): names stop sorting by
step past step 999,999, and `latest` may be stale or damaged, so neither is trusted. Weights or
optimizer state holding NaN or inf are never written. Nothing is pickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from entroprl.checks import NonFiniteError
from entroprl.rundir import atomic_write_text

STATE = "state.json"
LATEST = "latest"
_OS_ERROR = re.compile(r"os error (\d+)")


class DamagedCheckpoint(Exception):
    """A checkpoint fails verification; the message says what is wrong with it."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def save(
    folder: Path,
    step: int,
    model,
    tokenizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` into `folder` (see the module docstring), point `latest` at it and
    `prune` the folder to `keep` checkpoints. Returns the checkpoint's path.

    `model_state` and `optimizer_state` are full state dicts (`parallel.model_state`,
    `parallel.optimizer_state`); `model` gives the Hugging Face config and save format; `state` is
    the trainer's JSON state. Raises NonFiniteError, writing nothing, when a weight or optimizer
    tensor holds NaN or inf; raises OSError naming the checkpoint when the file system fails (disk
    full, read-only), after removing what it had written of it.
    """
    tensors, meta = _optimizer_to_tensors(optimizer_state)
    _check_finite("weight", model_state)
    _check_finite("optimizer state", tensors)
    name = checkpoint_name(step)
    tmp, final = folder / f".{name}.tmp", folder / name
    try:
        folder.mkdir(exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model.save_pretrained(tmp / "model", state_dict=model_state, safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        save_file(_rng_tensors(), tmp / "rng.safetensors")
        files = {
            f.relative_to(tmp).as_posix(): _synced_record(f)
            for f in sorted(tmp.rglob("*"))
            if f.is_file()
        }
        atomic_write_text(tmp / STATE, json.dumps({"step": step, **state, "files": files}))
        for directory in [*(d for d in tmp.rglob("*") if d.is_dir()), tmp]:
            _sync(directory)
        # Only a damaged checkpoint of this step can be here: resuming skipped it for an older one.
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        code = _errno(e)
        raise OSError(
            code,
            f"{os.strerror(code)}: the checkpoint of step {step} was not written "
            "(the checkpoints before it are intact)",
            str(final),
        ) from e
    _sync(folder)
    atomic_write_text(folder / LATEST, name)
    prune(folder, keep, step)
    return final


def verify(path: Path, *, hashes: bool = True) -> dict[str, Any]:
    """The state.json of checkpoint `path`, once its files check out: every file it lists present,
    of the size recorded and (with `hashes`) of the SHA-256 recorded. Raises DamagedCheckpoint
    saying what is wrong. A checkpoint of an entroprl older than these records is taken on its
    state.json alone."""
    try:
        state = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        raise DamagedCheckpoint("no state.json (an interrupted copy, or damaged)") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise DamagedCheckpoint(f"state.json is unreadable ({e})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise DamagedCheckpoint("state.json holds no step")
    if path.name != checkpoint_name(step):
        raise DamagedCheckpoint(f"state.json says step {step}, not the step of its name")
    files = state.get("files", {})
    try:
        expected = {name: (int(f["bytes"]), str(f["sha256"])) for name, f in files.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise DamagedCheckpoint("state.json's list of files is damaged") from None
    for name, (size, _) in expected.items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        if file.stat().st_size != size:
            raise DamagedCheckpoint(
                f"{name} has {file.stat().st_size} bytes, not the {size} written (truncated?)"
            )
    for name, (_, digest) in expected.items() if hashes else ():
        try:
            ok = _sha256(path / name) == digest
        except OSError as e:
            raise DamagedCheckpoint(f"{name} cannot be read ({e.strerror})") from None
        if not ok:
            raise DamagedCheckpoint(f"{name} does not match the SHA-256 recorded when written")
    return state


def find_resumable(folder: Path) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The valid checkpoint of `folder` with the highest step, its state, and one line for each
    newer checkpoint skipped, saying why; (None, None, lines) when no checkpoint is valid. Only
    the checkpoint chosen and the newer ones are hashed."""
    skipped = []
    for path in sorted(_checkpoints(folder), key=_step_of, reverse=True):
        try:
            state = verify(path)
        except DamagedCheckpoint as e:
            skipped.append(f"{path.name}: {e}")
            continue
        return path, state, skipped
    return None, None, skipped


def prune(folder: Path, keep: int, step: int) -> None:
    """Keep checkpoint `step` and the `keep - 1` complete ones with the highest steps below it
    (by the step in their state.json); delete the others: checkpoints past `step` (skipped when
    the run resumed from an older one, now replaced), incomplete ones, and the temporary folders
    of interrupted writes."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the newest checkpoint stays), got {keep}")
    older: list[tuple[int, Path]] = []
    for path in _checkpoints(folder):
        if path.name == checkpoint_name(step):
            continue
        try:
            found = verify(path, hashes=False)["step"]
        except DamagedCheckpoint:
            found = None
        if found is not None and found < step:
            older.append((found, path))
        else:
            shutil.rmtree(path, ignore_errors=True)
    for _, path in sorted(older, reverse=True)[keep - 1 :]:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in folder.glob(".step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """The full optimizer state dict of checkpoint `path`, keyed by parameter name."""
    meta = json.loads((path / "optimizer.json").read_text())
    return _optimizer_from_tensors(load_file(path / "optimizer.safetensors"), meta)


def restore_rng(path: Path) -> None:
    """Restore every random number generator from checkpoint `path`."""
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def _checkpoints(folder: Path) -> list[Path]:
    return [p for p in folder.glob("step_*") if p.is_dir()] if folder.is_dir() else []


def _step_of(path: Path) -> int:
    """The step in the checkpoint's state.json; the number in its name when that is unreadable,
    so that a damaged checkpoint is reported in its place among the newer ones."""
    try:
        return int(json.loads((path / STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        digits = path.name.removeprefix("step_")
        return int(digits) if digits.isdigit() else -1


def _errno(error: OSError | SafetensorError) -> int:
    """The error number of a failed write; safetensors gives it only in its message."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    found = _OS_ERROR.search(str(error))
    return int(found[1]) if found else errno.EIO


def _check_finite(what: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"{what} {name} holds NaN or inf")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _synced_record(path: Path) -> dict[str, Any]:
    """Sync `path` to disk; its size and SHA-256, as state.json lists them."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sync(directory: Path) -> None:
    """Sync a directory's entries, so that a rename into it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
