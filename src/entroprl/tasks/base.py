"""What the trainer needs from a task: prompts with reference answers, and a reward function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from entroprl.errors import RewardError


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

    def score(
        self, completions: list[str], answers: list[Any], prompts: list[str] | None = None
    ) -> list[float]:
        """Rewards of `completions` (to `prompts`, which a task's reward may read); a reward
        function that raises becomes a `RewardError`."""
        rewards = []
        for i, (text, answer) in enumerate(zip(completions, answers, strict=True)):
            try:
                rewards.append(float(self.reward_fn(text, answer)))
            except Exception as e:
                raise RewardError(
                    f"the reward function of task {self.name!r} raised on completion {i} "
                    f"({text[:60]!r}): {type(e).__name__}: {e}"
                ) from e
        return rewards
