"""Checkpoints: written whole under a temporary name, renamed into place, verified before use.

    CHECKPOINTS/step_000010/   model/ (Hugging Face format, safetensors, with the tokenizer),
                               optimizer.safetensors, optimizer.json, rng.safetensors, state.json
    CHECKPOINTS/latest         the name of the newest checkpoint, for people and scripts

A model sharded with FSDP is saved sharded (`save_sharded`): each rank writes its own shards of the
weights and the AdamW state with `torch.distributed.checkpoint` into `sharded/`, and `model/` holds
the Hugging Face config and the tokenizer without weights; no rank ever holds the whole state (a
7B model's full state with AdamW is about 90 GB). It resumes on any number of ranks, sharded or
not (`load_sharded`), and `export_hf` turns it into a Hugging Face folder
(`entroprl export CHECKPOINT --out DIR`).

`state.json` is written last, once every other file is written and synced to disk, and records
the size and SHA-256 of each of them; then the folder is renamed into place. A run killed at any
moment therefore leaves no checkpoint of that step or a complete one, and a checkpoint damaged
afterwards (a truncated copy, flipped bytes) fails `verify`. A run resumes from the valid
checkpoint with the highest step read from state.json (`find_resumable`): names stop sorting by
step past step 999,999, and `latest` may be stale or damaged, so neither is trusted. Weights or
optimizer state holding NaN or inf are never written. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from entroprl.errors import DamagedCheckpoint, NonFiniteError
from entroprl.train.rundir import atomic_write_text

STATE = "state.json"
LATEST = "latest"
SHARDED = "sharded"
"""The folder of a sharded checkpoint's `torch.distributed.checkpoint` files."""
_OS_ERROR = re.compile(r"os error (\d+)")


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
    tmp = _fresh_tmp(folder, step)
    with _written(folder, step):
        model.save_pretrained(tmp / "model", state_dict=model_state, safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(meta))
    return _finish(folder, step, state, keep)


def _fresh_tmp(folder: Path, step: int) -> Path:
    """The empty temporary folder checkpoint `step` is written into."""
    tmp = folder / f".{checkpoint_name(step)}.tmp"
    with _written(folder, step):
        folder.mkdir(exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    return tmp


@contextlib.contextmanager
def _written(folder: Path, step: int) -> Iterator[None]:
    """A file-system failure inside the block removes the temporary folder of checkpoint `step`
    and raises OSError naming the checkpoint (disk full, read-only)."""
    name = checkpoint_name(step)
    try:
        yield
    except (OSError, SafetensorError) as e:
        shutil.rmtree(folder / f".{name}.tmp", ignore_errors=True)
        code = _errno(e)
        raise OSError(
            code,
            f"{os.strerror(code)}: the checkpoint of step {step} was not written "
            "(the checkpoints before it are intact)",
            str(folder / name),
        ) from e


def _finish(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Complete the temporary folder of checkpoint `step`: the RNG states, state.json with each
    file's size and SHA-256, everything synced, then renamed into place, `latest` pointed at it
    and the folder pruned to `keep` checkpoints."""
    name = checkpoint_name(step)
    tmp, final = folder / f".{name}.tmp", folder / name
    with _written(folder, step):
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
    _sync(folder)
    atomic_write_text(folder / LATEST, name)
    prune(folder, keep, step)
    return final


def save_sharded(
    folder: Path,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    tokenizer,
    state: dict[str, Any],
    keep: int,
    *,
    writer: bool,
) -> Path:
    """Write checkpoint `step` of an FSDP-sharded `model` into `folder`, every rank its own shards
    (every rank must call it; `writer`, one rank, writes the rest and completes the checkpoint as
    `save` does). Raises NonFiniteError on every rank, writing nothing, when any shard of a weight
    or of the optimizer state holds NaN or inf."""
    from entroprl.train import distributed, parallel

    model_state = get_model_state_dict(model)
    tensors, meta = _optimizer_to_tensors(get_optimizer_state_dict(model, optimizer), cpu=False)
    if not parallel.all_finite([*model_state.values(), *tensors.values()]):
        raise NonFiniteError("a weight or the optimizer state holds NaN or inf")
    tmp = _fresh_tmp(folder, step) if writer else folder / f".{checkpoint_name(step)}.tmp"
    _barrier()  # the folder exists before any rank writes into it
    with _written(folder, step):
        dcp.save({"model": model_state, "optimizer": tensors}, checkpoint_id=tmp / SHARDED)
    failure = None
    if writer:
        try:
            with _written(folder, step):
                model.config.save_pretrained(tmp / "model")
                tokenizer.save_pretrained(tmp / "model")
                (tmp / "optimizer.json").write_text(json.dumps(meta))
            _finish(folder, step, {**state, "format": SHARDED}, keep)
        except OSError as e:
            failure = e
    # every rank leaves together, once the checkpoint is in place or known not to be
    stop = torch.tensor(int(failure is not None), device=_device_of(model_state))
    if int(distributed.all_reduce_sum(stop)):
        raise failure or OSError(errno.EIO, f"rank 0 could not write the checkpoint of step {step}")
    return folder / checkpoint_name(step)


def is_sharded(state: dict[str, Any]) -> bool:
    """Whether the checkpoint whose state.json is `state` was saved by `save_sharded`."""
    return state.get("format") == SHARDED


def load_sharded(path: Path, model, optimizer: torch.optim.Optimizer) -> None:
    """Load sharded checkpoint `path` into `model` and `optimizer`, every rank reading what its
    own layout needs: the same shards on the same number of ranks, other slices of them on
    another number, whole tensors for a model that is not sharded. Every rank must call it."""
    model_state = get_model_state_dict(model)
    tensors, _ = _optimizer_to_tensors(get_optimizer_state_dict(model, optimizer), cpu=False)
    dcp.load({"model": model_state, "optimizer": tensors}, checkpoint_id=path / SHARDED)
    meta = json.loads((path / "optimizer.json").read_text())
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, _optimizer_from_tensors(tensors, meta))


def read_sharded(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The whole tensors of sharded checkpoint `path` whose names start with `prefix` (`model.`,
    `optimizer.`), read in one process with no process group."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path / SHARDED)
    stored = reader.read_metadata().state_dict_metadata
    tensors = {
        name: torch.empty(meta.size, dtype=meta.properties.dtype, device="cpu")
        for name, meta in stored.items()
        if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors


def export_hf(path: Path, out: Path) -> Path:
    """A Hugging Face model folder at `out` (weights and tokenizer) from checkpoint `path`,
    verified first; in one process, with no process group, for a sharded checkpoint too. A LoRA
    run's checkpoint gives its base model with the adapters merged in (`policy.load_pretrained`;
    the adapters alone are the checkpoint's `model/`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from entroprl.train import policy

    state = verify(path)
    if policy.is_adapter(path / "model"):
        return policy.write_merged(path / "model", out)
    if not is_sharded(state):
        shutil.copytree(path / "model", out)
        return out
    weights = {k.removeprefix("model."): v for k, v in read_sharded(path, "model.").items()}
    dtype = next(iter(weights.values())).dtype
    config = AutoConfig.from_pretrained(path / "model")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())  # saved under one name or two
    if unexpected or set(missing) - tied:
        raise DamagedCheckpoint(
            f"its weights do not fit its config.json (missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)})"
        )
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(path / "model").save_pretrained(out)
    return out


def _device_of(tensors: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(tensors.values())).device


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def verify(path: Path, *, hashes: bool = True) -> dict[str, Any]:
    """The state.json of checkpoint `path`, once its files check out: every file it lists present,
    of the size recorded and (with `hashes`) of the SHA-256 recorded. Raises DamagedCheckpoint
    saying what is wrong. A checkpoint of an entroprl older than these records is taken on its
    state.json alone."""
    try:
        state = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        raise DamagedCheckpoint("no state.json (an interrupted copy, or damaged)") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, or not UTF-8
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


def find_resumable(
    folder: Path, *, hashes: bool = True
) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The valid checkpoint of `folder` with the highest step, its state, and one line for each
    newer checkpoint skipped, saying why; (None, None, lines) when no checkpoint is valid. Only
    the checkpoint chosen and the newer ones are hashed (none without `hashes`: the complete
    checkpoint with the highest step, by its files' sizes)."""
    skipped = []
    for path in sorted(_checkpoints(folder), key=_step_of, reverse=True):
        try:
            state = verify(path, hashes=hashes)
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


def stored_shapes(path: Path, state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape of each weight of checkpoint `path` (whose state.json is `state`), by name, read
    from the files' headers: no tensor is loaded."""
    if is_sharded(state):
        stored = dcp.FileSystemReader(path / SHARDED).read_metadata().state_dict_metadata
        return {
            name.removeprefix("model."): tuple(meta.size)
            for name, meta in stored.items()
            if name.startswith("model.") and hasattr(meta, "size")
        }
    shapes = {}
    for file in sorted((path / "model").glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            shapes |= {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    return shapes


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
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
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


def _optimizer_to_tensors(state: dict, *, cpu: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a name-keyed optimizer state dict (`parallel.optimizer_state`) into tensors
    ``"<parameter name>.<slot>"`` (on the CPU and contiguous, for safetensors, with `cpu`; else as
    they are, shards included) and the JSON rest."""
    tensors, scalars = {}, {}
    for param, slots in state["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}.{slot}"] = value.detach().cpu().contiguous() if cpu else value
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
