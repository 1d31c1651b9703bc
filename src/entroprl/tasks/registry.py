"""Build the task named in the config: its train and held-out examples and its reward function."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from entroprl import data
from entroprl.config import ConfigError, DataConfig
from entroprl.tasks.base import Example, Task
from entroprl.tasks.countdown import countdown_reward, generate_problems, load_jsonl


def _countdown(cfg: DataConfig, tokenizer: Any = None) -> Task:
    """Countdown prompts are the model's own short format: the tokenizer plays no part."""

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


def file_examples(cfg: DataConfig, key: str, tokenizer: Any = None) -> list[Example]:
    """The examples of `data.<key>` (train_file or test_file) for a file task, prompts rendered
    with `tokenizer`'s chat template when it has one. A bad file raises ConfigError naming the
    key; rows left out are reported by a `DataWarning` naming the file."""
    path = getattr(cfg, key)
    if path is None:
        raise ConfigError(f"data.{key}: task {cfg.task!r} reads its problems from a file; set it")
    limit = cfg.train_limit if key == "train_file" else cfg.test_limit
    try:
        return data.load_configured_examples(path, cfg.task, cfg, tokenizer, limit=limit)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"data.{key}: {e}") from e


def _file_task(cfg: DataConfig, tokenizer: Any = None) -> Task:
    """gsm8k / math / jsonl: problems from `train_file` and `test_file` (see `entroprl.data`)."""
    train = file_examples(cfg, "train_file", tokenizer)
    test = [] if cfg.test_file is None else file_examples(cfg, "test_file", tokenizer)
    return data.make_task(cfg.task, train, test, cfg.reward or data.default_reward(cfg.task))


TASKS: dict[str, Callable[[DataConfig, Any], Task]] = {
    "countdown": _countdown,
    **dict.fromkeys(data.FORMATS, _file_task),
}


def build_task(cfg: DataConfig, tokenizer: Any = None) -> Task:
    """The task of `cfg.task`. `tokenizer` renders the prompts of file tasks with its chat template
    (when it has one); without it they use `cfg.plain_template`."""
    if cfg.task not in TASKS:
        raise ConfigError(f"data.task: unknown task {cfg.task!r}; known: {sorted(TASKS)}")
    return TASKS[cfg.task](cfg, tokenizer)
