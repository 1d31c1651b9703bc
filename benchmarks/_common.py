"""What the benchmark scripts share: a median timer, a timer with the peak memory of its calls,
and the demo tokenizer's tiny Qwen2 config."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
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


def time_and_peak(fn, repeats: int, device) -> dict:
    """The median time of `repeats` calls of `fn` after one warm-up call, and the peak memory of
    all of them above what existed before: on CUDA `max_memory_allocated` minus the memory allocated
    then, on the CPU the peak resident set (`ru_maxrss`, never lowered: run one case per fresh
    process) minus the one then."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn()  # warm-up: first-touch page faults and kernel selection are not what is compared
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": statistics.median(times), "peak_bytes": peak}


def in_fresh_process(script: str, options: dict) -> dict:
    """Run `script --worker` with `options` ({"--flag": value}) in a fresh process, whose peak
    memory is then its own case's; the JSON its last line prints."""
    cmd = [sys.executable, script, "--worker"]
    for key, value in options.items():
        cmd += [key, str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_shape(text: str) -> tuple[int, int]:
    """`4x512` as (4, 512)."""
    b, t = text.lower().split("x")
    return int(b), int(t)


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
