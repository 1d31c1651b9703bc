"""How a pass splits a batch's rows into micro-batches: at most `Budget.rows` rows each and, with a
token budget, at most `Budget.tokens` tokens each, counted as the forward computes them (its rows
times the prompt width and its longest response: right padding is not computed,
`forward.response_columns`). This is verl's dynamic batch size (`use_dynamic_bsz` with
`ppo_max_token_len_per_gpu`) for padded rows: short responses share a micro-batch, a long one
takes few rows, so the micro-batches are as large as the memory allows and no larger.

The rows run longest response first where the caller allows it (`longest_first`), so that each
micro-batch holds rows of similar lengths. A row longer than the budget runs alone. With a token
budget the ranks' counts can differ, and a sharded forward or backward (FSDP: a collective per
layer) needs the same number on every rank: the ranks with fewer split their largest micro-batches
until they have as many (`same_count`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from entroprl.train import distributed


@dataclass(frozen=True)
class Budget:
    """The most one micro-batch may hold."""

    rows: int
    tokens: int | None = None
    """Rows x (prompt width + the longest response among them); None: rows only."""


def longest_first(lengths: list[int]) -> list[int]:
    """The rows' order by response length, longest first (ties in their order)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def split(lengths: list[int], width: int, budget: Budget) -> list[int]:
    """Sizes of consecutive micro-batches over rows of response `lengths` (in the order they
    run), each within `budget`; `width`: the prompt columns every row computes."""
    sizes: list[int] = []
    count = longest = 0
    for length in lengths:
        widest = max(longest, length)
        full = count == budget.rows or (
            budget.tokens is not None and (count + 1) * (width + widest) > budget.tokens
        )
        if count and full:
            sizes.append(count)
            count, widest = 0, length
        count, longest = count + 1, widest
    return [*sizes, count] if count else sizes


def same_count(sizes: list[int]) -> list[int]:
    """`sizes` with its largest micro-batches halved until there are as many as on the rank with
    the most (every rank must call it; each has at least that many rows)."""
    device = distributed.run_device() or torch.device("cpu")
    target = int(distributed.all_reduce_max(torch.tensor(len(sizes), device=device)).item())
    sizes = list(sizes)
    while len(sizes) < target:
        i = max(range(len(sizes)), key=lambda k: sizes[k])
        half = sizes[i] // 2
        sizes[i : i + 1] = [sizes[i] - half, half]
    return sizes


def plan(lengths: list[int], width: int, budget: Budget, *, sort: bool) -> list[list[int]]:
    """The row positions of each micro-batch of rows with response `lengths`, longest first where
    `sort` (a single micro-batch keeps the rows' order); the same number on every rank where a
    token budget is set."""
    order = longest_first(lengths) if sort else list(range(len(lengths)))
    sizes = split([lengths[i] for i in order], width, budget)
    if budget.tokens is not None and distributed.is_distributed():
        sizes = same_count(sizes)
    if len(sizes) == 1:
        return [list(range(len(lengths)))]
    ends = list(itertools.accumulate(sizes))
    return [order[end - size : end] for end, size in zip(ends, sizes, strict=True)]
