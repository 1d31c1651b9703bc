"""The collective operations the algorithms need; no-ops when torch.distributed is not running.

Used so that covariance selections and loss denominators are global across ranks (algorithms.md §3,
§5).

Every collective checks that its tensor sits on the run's device (`use_device`; under NCCL with no
run device set, a GPU): NCCL rejects a CPU tensor with an error that names no line of ours, and a
single GPU, where the collectives are no-ops, would not notice at all. So a tensor made on the CPU
in a training path fails here, on the CPU test machines too, wherever the run's device is set to
something else.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

_run_device: torch.device | None = None
"""The device the run's tensors live on, set by the trainer (`use_device`)."""


class DeviceMismatchError(RuntimeError):
    """A collective got a tensor on another device than the run's: a bug in the code that made
    it (every tensor of a training path is made on the device of its data)."""


def use_device(device: torch.device | str | None) -> None:
    """Declare the device of the run's tensors (None: no check beyond NCCL's own device)."""
    global _run_device
    _run_device = None if device is None else torch.device(device)


def run_device() -> torch.device | None:
    return _run_device


def init(strategy: str) -> None:
    """Join torchrun's process group (it sets WORLD_SIZE), or start a group of one for FSDP:
    NCCL on GPUs, gloo on the CPU."""
    launched = "WORLD_SIZE" in os.environ
    if dist.is_initialized() or not (launched or strategy == "fsdp"):
        return
    if torch.cuda.is_available():
        # before the group forms, so that NCCL and FSDP's device mesh use this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if launched:
        dist.init_process_group(backend)
    else:
        store = Path(tempfile.mkdtemp(prefix="entroprl-pg-")) / "store"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)


def shutdown(*, wait_for_all: bool = True) -> None:
    """Destroy the process group so that none of its threads outlives the interpreter.

    A gloo worker thread drops its reference to a collective's tensors after the collective has
    completed, and dropping a tensor made in Python takes the GIL. A rank that exits right after
    its last collective can reach interpreter shutdown first; the thread then cannot take the GIL
    and the rank aborts after its work is done (SIGABRT, "terminate called without an active
    exception": seen in the 2-rank tests and once under torchrun). With `wait_for_all`, a barrier
    first (every rank must call it): waiting releases the GIL for those threads. Without (after an
    error, when another rank may never reach a barrier), a short sleep releases it. The group is
    then destroyed, and the collection frees the FSDP modules that hold it in reference cycles, so
    its threads are joined while Python still runs."""
    if not dist.is_initialized():
        return
    if wait_for_all:
        dist.barrier()
    else:
        time.sleep(0.05)
    dist.destroy_process_group()
    gc.collect()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _check_device(tensor: Tensor, op: str) -> None:
    expected = _run_device
    if expected is None and is_distributed() and dist.get_backend() == "nccl":
        expected = torch.device("cuda", torch.cuda.current_device())
    if expected is None or tensor.device == expected:
        return
    if expected.type == tensor.device.type and expected.index is None:
        return  # "cuda" set without an index matches any GPU
    raise DeviceMismatchError(
        f"distributed.{op}: a tensor on {tensor.device} where the run's tensors are on {expected}; "
        "the code that made it must make it on the device of its data"
    )


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of `tensor` over all ranks (a new tensor; the input is left untouched)."""
    _check_device(tensor, "all_reduce_sum")
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Elementwise maximum of `tensor` over all ranks (a new tensor; the input is untouched)."""
    _check_device(tensor, "all_reduce_max")
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_gather_cat(values: Tensor) -> tuple[Tensor, int]:
    """Concatenate 1-D `values` of possibly different lengths from all ranks, in rank order.

    Returns the concatenation and the offset of this rank's values inside it.
    """
    _check_device(values, "all_gather_cat")
    values = values.detach().reshape(-1)
    if not is_distributed():
        return values, 0
    n = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    offset = sum(sizes[: rank()])
    return torch.cat([g[:s] for g, s in zip(gathered, sizes, strict=True)]), offset
