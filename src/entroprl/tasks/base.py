"""What the trainer needs from a task: prompts with reference answers, and a reward function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Example:
    prompt: str
    """The text given to the model, already rendered (chat template or plain)."""
    answer: Any
    """What the reward function compares the completion with."""


@dataclass(frozen=True)
class Task:
    name: str
    train: list[Example]
    test: list[Example]
    reward_fn: Callable[[str, Any], float]
    """`reward_fn(completion, answer) -> float`; 1.0 means correct."""
