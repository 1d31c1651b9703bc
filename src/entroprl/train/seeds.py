"""Every generator's seed, derived from the run's `trainer.seed`: one place for the recipes, so that
no two purposes share a stream and a resumed run draws what an uninterrupted one draws.

Each seed is `seed * a + step * b + rank * c + draw * d` with the purpose's primes (a, b, c, d):
distinct runs, steps, ranks and draws land far apart, and every value stays inside torch's 64-bit
seed range for the accepted `trainer.seed`s (`entroprl.config.SEED_RANGE`).
"""

from __future__ import annotations

RECIPES: dict[str, tuple[int, int, int, int]] = {
    # the step's prompts: one permutation of the training set, the same on every rank
    "prompts": (1_000_003, 1, 0, 0),
    # the sampling of a rank's responses; `draw` counts dynamic sampling's further batches
    "rollout": (7919, 104_729, 1, 1_000_033),
    # the update's mini-batch order and the losses' random tie-breaks, the same on every rank
    "update": (15_485_863, 1, 0, 0),
}
"""Purpose -> the factors of (run seed, step, rank, draw)."""


def derive(purpose: str, seed: int, step: int, rank: int = 0, draw: int = 0) -> int:
    """The seed of `purpose` (a key of `RECIPES`) for the run seeded `seed` at `step`, on `rank`,
    for its `draw`-th draw of the step."""
    a, b, c, d = RECIPES[purpose]
    return seed * a + step * b + rank * c + draw * d
