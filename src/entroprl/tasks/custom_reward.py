"""A user's own reward, `data.reward: module:function`, with TRL's reward-function signature:

    def my_reward(prompts: list[str], completions: list[str], answer: list, **kwargs) -> list[float]

one float per completion (None counts 0, as TRL sums rewards ignoring None); `answer` holds each
row's reference answer (the task's: the data file's answer column, or a Countdown problem).
It runs as the built-in math rewards do (`entroprl.tasks.rewards`): in a sandbox process, killed
past `data.reward_timeout` seconds for a batch; its module is imported there, so it must be
importable (installed, on PYTHONPATH or in the working directory). A function that raises, overruns
or returns something else than one number per completion stops the run with one line naming
`data.reward`, never a silent 0.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

from entroprl.errors import ConfigError, RewardError
from entroprl.tasks import rewards
from entroprl.tasks.base import Task

SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
"""`module.path:function`."""


def is_custom(reward: str | None) -> bool:
    return reward is not None and ":" in reward


def load(spec: str) -> Any:
    """The function `spec` names, imported here to check it (ConfigError naming data.reward)."""
    if not SPEC.fullmatch(spec):
        raise ConfigError(f"data.reward={spec!r}: expected module:function, e.g. my_rewards:score")
    module, name = spec.split(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # an import runs the user's code: any error is theirs to see
        raise ConfigError(f"data.reward={spec}: cannot load it ({type(e).__name__}: {e})") from e
    if not callable(fn):
        raise ConfigError(f"data.reward={spec}: {name} is not a function")
    return fn


def _call(spec: str, prompts: list[str], completions: list[str], answers: list[Any]) -> Any:
    """In the sandbox: import `spec` and call it with TRL's keywords."""
    module, name = spec.split(":")
    fn = getattr(importlib.import_module(module), name)
    return fn(prompts=prompts, completions=completions, answer=answers)


@dataclass(frozen=True)
class CustomRewardTask(Task):
    """A task's problems scored by the user's reward function `spec`."""

    spec: str = ""
    timeout: float = 60.0

    def score(
        self, completions: list[str], answers: list[Any], prompts: list[str] | None = None
    ) -> list[float]:
        prompts = prompts if prompts is not None else [""] * len(completions)
        args = (self.spec, list(prompts), list(completions), list(answers))
        status, value = rewards.call_bounded(_call, args, self.timeout)
        where = f"data.reward={self.spec}"
        if status == "error":
            raise RewardError(f"{where} raised on a batch of {len(completions)}: {value}")
        if status == "timeout":
            raise RewardError(
                f"{where} did not return within data.reward_timeout={self.timeout:g} s"
            )
        if status == "crash":
            raise RewardError(f"{where}: its sandbox process died (out of memory? 4 GB at most)")
        if not isinstance(value, list) or len(value) != len(completions):
            got = f"{len(value)} values" if isinstance(value, list) else "one number"
            raise RewardError(
                f"{where} returned {got}; expected a list of {len(completions)} floats, one per "
                "completion"
            )
        wrong = [(i, v) for i, v in enumerate(value) if isinstance(v, str)]
        if wrong:
            i, kind = wrong[0]
            raise RewardError(f"{where} returned a {kind} at position {i}; expected floats")
        return [0.0 if v is None else v for v in value]


def with_custom_reward(task: Task, spec: str, timeout: float) -> CustomRewardTask:
    """`task`'s problems, scored by the function `spec` instead of its own reward."""
    load(spec)
    return CustomRewardTask(
        task.name, task.train, task.test, task.reward_fn, spec=spec, timeout=timeout
    )
