"""The tasks by name: `data.task` picks one, and `build_task` builds it from the `data` section
(scored by the user's own reward function when `data.reward` names one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from entroprl.errors import ConfigError
from entroprl.tasks import countdown, custom_reward, math_problems
from entroprl.tasks.base import Task
from entroprl.tasks.data import DataConfig

TASKS: dict[str, Callable[[DataConfig, Any], Task]] = {
    "countdown": countdown.countdown_task,
    **dict.fromkeys(math_problems.FORMATS, math_problems.file_task),
}


def build_task(cfg: DataConfig, tokenizer: Any = None) -> Task:
    """The task of `cfg.task`. `tokenizer` renders the prompts of file tasks with its chat template
    (when it has one); without it they use `cfg.plain_template`."""
    if cfg.task not in TASKS:
        raise ConfigError(f"data.task: unknown task {cfg.task!r}; known: {sorted(TASKS)}")
    task = TASKS[cfg.task](cfg, tokenizer)
    if custom_reward.is_custom(cfg.reward):
        return custom_reward.with_custom_reward(task, cfg.reward, cfg.reward_timeout)
    return task
