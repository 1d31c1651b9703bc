"""Verifiable tasks: problem generators, exact verifiers and reward functions."""

from entroprl.tasks.countdown import (
    CountdownProblem,
    countdown_reward,
    generate_problems,
    load_jsonl,
    save_jsonl,
    solutions,
    verify,
)

__all__ = [
    "CountdownProblem",
    "countdown_reward",
    "generate_problems",
    "load_jsonl",
    "save_jsonl",
    "solutions",
    "verify",
]
