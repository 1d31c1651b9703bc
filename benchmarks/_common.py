"""What the benchmark scripts share: a median timer and the demo tokenizer's tiny Qwen2 config."""

from __future__ import annotations

import statistics
import time


def timed(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn`, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def char_model_config(
    tok, hidden: int, layers: int, *, head_dim: int = 32, max_position: int = 128
):
    """A random-init tiny Qwen2 over the demo's character tokenizer `tok`, `hidden // head_dim`
    heads (vLLM's CPU attention needs head_dim 64)."""
    from entroprl.demo.models import tiny_config

    return tiny_config(
        len(tok),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // head_dim,
        max_position=max_position,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
