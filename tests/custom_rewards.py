"""Reward functions with TRL's signature, as a user writes them, for tests/test_custom_reward.py
(a module the sandbox processes can import)."""

import time


def has_a_one(prompts, completions, answer, **kwargs):
    return [float("1" in c) for c in completions]


def echoes_the_prompt(prompts, completions, answer, **kwargs):
    """1 for a completion that starts with its prompt's first character (reads the prompts)."""
    return [
        float(bool(p) and c.startswith(p[0])) for p, c in zip(prompts, completions, strict=True)
    ]


def raises(prompts, completions, answer, **kwargs):
    raise KeyError("solution")


def one_short(prompts, completions, answer, **kwargs):
    return [1.0] * (len(completions) - 1)


def strings(prompts, completions, answer, **kwargs):
    return ["1.0"] * len(completions)


def none_for_some(prompts, completions, answer, **kwargs):
    return [None if i % 2 else 2.5 for i in range(len(completions))]


def sleeps(prompts, completions, answer, **kwargs):
    time.sleep(30)
    return [0.0] * len(completions)


NOT_A_FUNCTION = 3
