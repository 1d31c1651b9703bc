"""The collective operations the algorithms need; no-ops when torch.distributed is not running.

Used so that covariance selections and loss denominators are global across ranks (algorithms.md §3,
§5).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of `tensor` over all ranks (a new tensor; the input is left untouched)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Elementwise maximum of `tensor` over all ranks (a new tensor; the input is untouched)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_gather_cat(values: Tensor) -> tuple[Tensor, int]:
    """Concatenate 1-D `values` of possibly different lengths from all ranks, in rank order.

    Returns the concatenation and the offset of this rank's values inside it.
    """
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
