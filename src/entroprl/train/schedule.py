"""The learning-rate schedule, shared by the trainer (`optim.schedule`) and the warm start."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear")
"""After the linear warm-up: the peak held, a cosine or a straight line down to 0."""


def learning_rate(
    step: int, *, lr: float, warmup_steps: int, total_steps: int, schedule: str
) -> float:
    """The learning rate of optimizer step `step` (from 0) of `total_steps`: `lr * (step + 1) /
    warmup_steps` during the warm-up, then, with p = (step - warmup_steps) / (total_steps -
    warmup_steps) capped at 1, `lr` (constant), `lr * (1 + cos(pi p)) / 2` (cosine) or
    `lr * (1 - p)` (linear)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr * (1 - progress)
    return lr
