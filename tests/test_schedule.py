"""The learning-rate schedule and the seeds the trainer derives, each against a computation of its
own: the formulas written out, and the values of the recipes before they had one module."""

import math

import pytest

from entroprl.train import seeds
from entroprl.train.schedule import learning_rate


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_the_schedules_after_a_linear_warm_up(schedule):
    lr, warmup, total = 3e-4, 4, 24
    for step in range(total):
        got = learning_rate(step, lr=lr, warmup_steps=warmup, total_steps=total, schedule=schedule)
        if step < warmup:
            want = lr * (step + 1) / warmup
        else:
            p = (step - warmup) / (total - warmup)
            want = {"constant": lr, "cosine": lr * (1 + math.cos(math.pi * p)) / 2}.get(
                schedule, lr * (1 - p)
            )
        assert got == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_the_schedule_ends_at_its_floor_and_stays_there():
    kw = {"lr": 1.0, "warmup_steps": 0, "total_steps": 10}
    assert learning_rate(10, **kw, schedule="cosine") == pytest.approx(0.0, abs=1e-15)
    assert learning_rate(15, **kw, schedule="linear") == 0.0


@pytest.mark.parametrize("seed", [0, 1, 7, 2**32 - 1])
def test_the_derived_seeds_are_the_earlier_releases(seed):
    """A resumed or repeated run of an earlier release draws the same prompts, samples and
    mini-batch orders: the recipes' values are those of the constants the trainer used."""
    for step in (0, 1, 250):
        assert seeds.derive("prompts", seed, step) == seed * 1_000_003 + step
        assert seeds.derive("update", seed, step) == seed * 15_485_863 + step
        for rank in (0, 3):
            for draw in (0, 2):
                want = seed * 7919 + step * 104729 + rank + draw * 1_000_033
                assert seeds.derive("rollout", seed, step, rank=rank, draw=draw) == want


def test_derived_seeds_fit_torch():
    largest = max(seeds.derive(p, 2**32 - 1, 10**6, rank=1024, draw=64) for p in seeds.RECIPES)
    assert largest < 2**63
