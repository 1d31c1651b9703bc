"""Progress where a person watches it: bars on a terminal; where the output goes to a file (a
redirected log, CI, a job scheduler) a bar's refreshes would fill it, so a run prints one line
per step there instead."""

from __future__ import annotations

import sys
from typing import Any


def on_terminal() -> bool:
    return sys.stderr.isatty()


def bars(requested: bool) -> bool:
    """Whether to draw progress bars: asked for (`trainer.progress`) and on a terminal."""
    return requested and on_terminal()


def step_line(step: int, total: int, metrics: dict[str, Any]) -> str:
    """The one line a step prints where no bar is drawn."""
    parts = [f"step {step}/{total}"]
    for label, key, form in (
        ("entropy", "actor/entropy_seq_mean", ".3f"),
        ("acc", "train/acc", ".3f"),
        ("score", "critic/score/mean", ".3f"),
        ("time", "timing_s/step", ".1f"),
    ):
        if isinstance(metrics.get(key), int | float):
            parts.append(f"{label} {metrics[key]:{form}}{'s' if label == 'time' else ''}")
    held_out = [k for k in metrics if k.startswith("val-core/") and "/acc/mean@" in k]
    parts += [f"val {metrics[k]:.3f}" for k in held_out[:1]]
    return " | ".join(parts)


def quiet_libraries_off_terminal() -> None:
    """transformers' and huggingface_hub's own bars (loading weights, writing shards) off a
    terminal too."""
    if on_terminal():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    logging.disable_progress_bar()
    disable_progress_bars()
