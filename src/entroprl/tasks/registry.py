"""Build the task named in the config: its train and held-out examples and its reward function."""

from __future__ import annotations

from pathlib import Path

from entroprl.config import ConfigError, DataConfig
from entroprl.tasks.base import Example, Task
from entroprl.tasks.countdown import countdown_reward, generate_problems, load_jsonl


def _countdown(cfg: DataConfig) -> Task:
    def problems(file: str | None, size: int, split: str, key: str):
        if file is None:
            return generate_problems(size, seed=cfg.seed, split=split)
        if not Path(file).is_file():
            raise ConfigError(f"data.{key}: file not found: {file}")
        return load_jsonl(file)

    train = problems(cfg.train_file, cfg.train_size, "train", "train_file")
    test = problems(cfg.test_file, cfg.test_size, "test", "test_file")
    as_examples = lambda ps: [Example(p.prompt, p) for p in ps]  # noqa: E731
    return Task("countdown", as_examples(train), as_examples(test), countdown_reward)


TASKS = {"countdown": _countdown}


def build_task(cfg: DataConfig) -> Task:
    if cfg.task not in TASKS:
        raise ConfigError(f"data.task: unknown task {cfg.task!r}; known: {sorted(TASKS)}")
    return TASKS[cfg.task](cfg)
