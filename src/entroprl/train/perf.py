"""A training step's throughput, model FLOPs utilisation and memory, counted as verl counts them,
so that a run's `perf/` figures compare with a verl run's.

- `perf/total_num_tokens`: the valid tokens (prompt and response) of the training batch's rows,
  over all ranks (verl's `sum(global_token_num)`); `perf/time_per_step`; `perf/throughput`: the
  first over the second and the number of ranks, tokens per second per GPU
  (`verl.trainer.ppo.metric_utils.compute_throughout_metrics`).
- `perf/mfu/actor`: the update's model FLOPs per second per GPU over the GPU's dense bfloat16 peak
  (verl's FSDP worker: `FlopsCounter.estimate_flops` x `ppo_epochs` / peak / world size), with
  verl's count of a decoder's training FLOPs (`verl.utils.flops_counter`, `FlopsModel`).
- `perf/max_memory_allocated_gb`, `perf/max_memory_reserved_gb` (a GPU's peaks since the start, as
  torch reports them) and `perf/cpu_memory_used_gb` (the machine's, as `psutil` reports it), as
  verl's actor logs them.

entroprl's own: `perf/rollout_tokens_per_s` (response tokens sampled over the generation time) and
`perf/update_tokens_per_s` (tokens in the loss, times the passes over them, over the update time),
both over all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch
from torch import Tensor

from entroprl.train import distributed

DEVICE_PEAK_TFLOPS = {
    "GB200": 2500.0,
    "B200": 2250.0,
    "MI355X": 2500.0,
    "MI350X": 2300.0,
    "MI300X": 1307.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H800": 989.0,
    "H200": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.05,
    "L40": 181.05,
    "A40": 149.7,
    "L20": 119.5,
}
"""Dense bfloat16 peaks (TFLOP/s) by a part of the name torch gives the GPU, the longest part that
matches winning: verl 0.9's table for GPUs (`verl.utils.flops_counter._DEVICE_FLOPS`), plus the
H100's PCIe and NVL parts, which verl counts as the SXM part's 989."""

DENSE_MODEL_TYPES = frozenset({"qwen2", "llama", "qwen3", "mistral", "seed_oss", "mimo"})
"""Decoders whose training FLOPs verl counts with its Qwen2 formula (SwiGLU MLP)."""
MOE_MODEL_TYPES = frozenset({"qwen2_moe", "qwen3_moe"})
"""Mixture-of-experts decoders verl counts with its Qwen2-MoE formula."""


def device_peak_tflops(device: torch.device) -> float | None:
    """The dense bfloat16 peak of GPU `device` by its name (`DEVICE_PEAK_TFLOPS`); None for a CPU
    or a GPU the table does not name."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return peak_by_name(name)


def peak_by_name(name: str) -> float | None:
    matches = [key for key in DEVICE_PEAK_TFLOPS if key in name]
    return DEVICE_PEAK_TFLOPS[max(matches, key=len)] if matches else None


@dataclass(frozen=True)
class TokenCounts:
    """A step's tokens over all ranks."""

    sampled: float
    """Response tokens the step generated (every batch of dynamic sampling's)."""
    in_loss: float
    """Tokens of the training batch that enter the loss."""
    total: float
    """Valid tokens, prompt and response, of the training batch's rows."""
    squares: float
    """The sum over those rows of their valid tokens squared (attention's FLOPs)."""

    @classmethod
    def over_ranks(
        cls, sampled: Tensor, attention_mask: Tensor, train_mask: Tensor, kept: Tensor
    ) -> TokenCounts:
        """The counts of every rank's `sampled` tokens and training batch: rows `kept` (B,) of
        `attention_mask` (B, P + R), with `train_mask` (B, R) the tokens in the loss. One
        collective and one read."""
        lengths = attention_mask.sum(-1).double() * kept
        local = torch.stack(
            [sampled.double(), train_mask.sum().double(), lengths.sum(), lengths.square().sum()]
        )
        return cls(*distributed.all_reduce_sum(local).tolist())


@dataclass(frozen=True)
class FlopsModel:
    """verl's count of a decoder's training FLOPs (forward and backward): 6 N per token for the
    matrix products, N the linear weights of the layers (the active experts' and the router's in a
    mixture of experts) plus the embedding and the output layer counted as two matrices even when
    they are tied, and 6 x length^2 x head_dim x heads x layers per sequence for the attention
    scores and their product with the values (the causal half of 12: verl 0.9)."""

    dense: int
    """N."""
    attention: int
    """head_dim x heads x layers."""

    def training_flops(self, tokens: TokenCounts) -> float:
        return 6 * self.dense * tokens.total + 6 * self.attention * tokens.squares


def flops_model(config) -> FlopsModel | None:
    """verl's FLOP count for a model of Hugging Face `config` (its `text_config` where it has one);
    None for a `model_type` verl's counter does not cover here (`DENSE_MODEL_TYPES`,
    `MOE_MODEL_TYPES`)."""
    c = getattr(config, "text_config", None) or config
    model_type = getattr(c, "model_type", None)
    if model_type not in DENSE_MODEL_TYPES | MOE_MODEL_TYPES:
        return None
    hidden, heads, layers = c.hidden_size, c.num_attention_heads, c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    # the query, key, value and output projections
    attention_linear = hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim)
    if model_type in MOE_MODEL_TYPES:  # the experts each token runs, and the router
        experts = c.num_experts_per_tok * c.moe_intermediate_size
        mlp = 3 * hidden * experts + hidden * c.num_experts
    else:
        mlp = 3 * hidden * c.intermediate_size
    dense = (mlp + attention_linear) * layers + 2 * c.vocab_size * hidden
    return FlopsModel(dense=dense, attention=head_dim * heads * layers)


@dataclass(frozen=True, kw_only=True)
class StepTimes:
    """Seconds spent in a step (on this rank)."""

    step: float
    generation: float
    update: float


def memory_metrics(device: torch.device) -> dict[str, float]:
    """The GPU's peak memory since the start (on a GPU) and the machine's used memory, in GiB."""
    gib = 2.0**30
    metrics = {"perf/cpu_memory_used_gb": psutil.virtual_memory().used / gib}
    if device.type == "cuda":
        metrics["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / gib
        metrics["perf/max_memory_reserved_gb"] = torch.cuda.max_memory_reserved(device) / gib
    return metrics


def step_metrics(
    tokens: TokenCounts,
    times: StepTimes,
    *,
    world: int,
    sweeps: int,
    flops: FlopsModel | None,
    peak_tflops: float | None,
) -> dict[str, float]:
    """The step's `perf/` figures (this module's docstring); `sweeps`: the update's passes over
    the batch (epochs, times two for Lopti). `perf/mfu/actor` where both the FLOP count and the
    peak are known."""
    tiny = 1e-9  # a step of no measurable time logs a huge rate rather than failing
    metrics = {
        "perf/total_num_tokens": tokens.total,
        "perf/time_per_step": times.step,
        "perf/throughput": tokens.total / (max(times.step, tiny) * world),
        "perf/rollout_tokens_per_s": tokens.sampled / max(times.generation, tiny),
        "perf/update_tokens_per_s": tokens.in_loss * sweeps / max(times.update, tiny),
    }
    if flops is not None and peak_tflops:
        achieved = flops.training_flops(tokens) * sweeps / max(times.update, tiny) / world
        metrics["perf/mfu/actor"] = achieved / (peak_tflops * 1e12)
    return metrics
