"""Running out of memory, answered with what to lower. Each phase of a run has its own settings
that bound its memory: loading the policy (its dtype, its layout over ranks), the rollout (the
rows sampled together, the vLLM engine's share of the GPU), the no-grad log-prob passes and the
update (their micro-batches), the evaluation (its samples). An allocation that fails inside a
phase (`phase`) becomes an `OutOfMemory` error that names that phase's settings with their values
("lower ..."), and the options that save memory without changing what is computed (a token
budget per micro-batch, the fused head, gradient checkpointing, FSDP over several ranks) where
they are off ("save memory with ..."), instead of a CUDA traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from entroprl.config import Config
from entroprl.errors import TrainingError
from entroprl.train import distributed


class OutOfMemory(TrainingError):
    """An allocation failed in a phase of the run; the message names the settings to lower."""


def allocation_failed(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: Python's MemoryError, torch's on a GPU
    (OutOfMemoryError), or on the CPU (a RuntimeError from its allocator)."""
    return (
        isinstance(error, MemoryError)
        or type(error).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in str(error)
    )


def _policy(c: Config) -> tuple[list[str], list[str]]:
    lower = [f"model.dtype={c.model.dtype}"] if c.model.dtype == "float32" else []
    several = distributed.world_size() > 1 and c.trainer.strategy != "fsdp"
    return lower, ["trainer.strategy=fsdp (weights and AdamW state sharded)"] if several else []


def _rollout(c: Config) -> tuple[list[str], list[str]]:
    r = c.rollout
    if r.backend == "vllm":
        return [f"rollout.gpu_memory_utilization={r.gpu_memory_utilization}"], []
    return [f"rollout.generation_batch_size={r.generation_batch_size}"], []


def _log_probs(c: Config) -> tuple[list[str], list[str]]:
    o = c.optim
    lower = [f"optim.log_prob_micro_batch_size={o.log_prob_rows}"]
    if o.log_prob_tokens is not None:
        lower.append(f"optim.log_prob_micro_batch_tokens={o.log_prob_tokens}")
    return lower, [] if c.model.fused_head else ["model.fused_head=true"]


def _update(c: Config) -> tuple[list[str], list[str]]:
    o, m = c.optim, c.model
    lower = [f"optim.micro_batch_size={o.micro_batch_size}"]
    savers = []
    if o.micro_batch_tokens is None:
        savers.append("optim.micro_batch_tokens=N (a token budget per micro-batch)")
    else:
        lower.append(f"optim.micro_batch_tokens={o.micro_batch_tokens}")
    if c.rollout.backend == "vllm":  # the engine keeps its share while the policy trains
        lower.append(f"rollout.gpu_memory_utilization={c.rollout.gpu_memory_utilization}")
    if not m.fused_head:
        savers.append("model.fused_head=true")
    if not (m.gradient_checkpointing or o.shared_prefix):
        savers.append("model.gradient_checkpointing=true")
    return lower, savers


def _eval(c: Config) -> tuple[list[str], list[str]]:
    lower, savers = _rollout(c)
    return [f"trainer.eval_samples={c.trainer.eval_samples}", *lower], savers


PHASES: dict[str, tuple[str, Callable[[Config], tuple[list[str], list[str]]]]] = {
    "policy": ("loading the policy", _policy),
    "rollout": ("the rollout", _rollout),
    "log_probs": ("the no-grad log-prob passes (old and reference)", _log_probs),
    "update": ("the update", _update),
    "eval": ("the evaluation", _eval),
}
"""Each phase: its name in the message, and its settings (what to lower; the options that save
memory without changing what is computed, where they are off)."""


def advice(phase: str, config: Config) -> str:
    """The message of an allocation that failed in `phase` of a run of `config`."""
    what, settings = PHASES[phase]
    lower, savers = settings(config)
    parts = [f"out of memory in {what}"]
    if lower:
        parts.append(f"lower {', '.join(lower)}")
    if savers:
        parts.append(f"or save memory with {', '.join(savers)}")
    return "; ".join(parts)


def phase(name: str) -> Callable:
    """Decorate a method of an object with a `config`: an allocation that fails inside it raises
    `OutOfMemory` with `advice(name, ...)`, torch's message after it."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}: one of {', '.join(PHASES)}")

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except (MemoryError, RuntimeError) as e:
                if isinstance(e, OutOfMemory) or not allocation_failed(e):
                    raise  # not memory, or a phase inside this one has named its settings
                cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise OutOfMemory(f"{advice(name, self.config)} ({cause})") from e

        return run

    return decorate
