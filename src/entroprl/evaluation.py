"""Held-out evaluation: sampled accuracy (pass@1 as the mean over samples), unbiased pass@k, maj@k."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from math import comb
from typing import Any

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021):

        pass@k = 1 - C(n - c, k) / C(n, k)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def maj_at_k(answers: Sequence[Any], correct: Sequence[bool]) -> float:
    """1.0 if the most frequent answer among the samples is a correct one (ties: first seen)."""
    if len(answers) != len(correct) or not answers:
        raise ValueError("maj@k needs one correctness flag per answer, and at least one answer")
    top, _ = Counter(answers).most_common(1)[0]
    return float(correct[list(answers).index(top)])


def score_samples(
    correct: np.ndarray, ks: Sequence[int] = (1,)
) -> dict[str, float]:
    """Summaries of a (problems, samples) 0/1 matrix: `mean@n` (pass@1) and `pass@k` for each k."""
    correct = np.asarray(correct, dtype=bool)
    problems, n = correct.shape
    counts = correct.sum(1)
    out = {f"mean@{n}": float(correct.mean())}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in counts]))
    return out


def evaluate(
    backend,
    prompts: list[str],
    answers: list[Any],
    score: Callable[[list[str], list[Any]], list[float]],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    top_p: float = 1.0,
) -> tuple[dict[str, float], np.ndarray]:
    """Sample `samples` responses per prompt (temperature 0 is greedy) and score them with
    `score(completions, answers)` (for example `Task.score`).

    Returns the summaries (`mean@n`, which is pass@1, and `pass@n`) and the (problems, samples)
    0/1 matrix.
    """
    batch = backend.generate(
        prompts, n=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
    )
    rewards = score(batch.texts, [answers[g] for g in batch.group_ids.tolist()])
    correct = (np.asarray(rewards) >= 1.0).reshape(len(prompts), samples)
    return score_samples(correct, ks=[samples] if samples > 1 else []), correct
