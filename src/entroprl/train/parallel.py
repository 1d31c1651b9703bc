"""How the policy is laid out over ranks, and the whole-model state that checkpoints and weight
syncs need whatever the layout.

``ddp``: DistributedDataParallel. Every rank holds the whole model, its gradient and the AdamW
state: 16 bytes per parameter in float32, about 122 GB for a 7.6B model.

``fsdp``: FSDP2 (`torch.distributed.fsdp.fully_shard`) on every decoder layer and on the root,
as verl's and TRL's FSDP paths do. Each rank holds 1/world of the parameters, gradients and AdamW
state; a layer's parameters are all-gathered for its forward and backward and freed after, and
gradients are reduce-scattered (averaged over ranks, as DDP does). With a `compute_dtype` the
gathered parameters and activations are in that dtype while the sharded master weights, the
gradient reduction and AdamW stay in the model's own dtype (mixed precision).

The state functions here give and take full state dicts keyed by parameter name (not by position
in the optimizer), so a checkpoint written whole under one strategy or world size loads under
another; a sharded model's checkpoints are written sharded (`checkpoint.save_sharded`).

A LoRA policy (a peft model) is sharded the same way, its adapters in their layers' units beside
the frozen weights (FSDP2 reduce-scatters the gradients of those that have one). Its root unit is
the peft model's base model: `generate` runs through the base model, not the peft wrapper, and
FSDP2 needs every forward to enter through the root.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from entroprl.algos.checks import check_choice
from entroprl.config import STRATEGIES
from entroprl.errors import ConfigError
from entroprl.train import distributed, lora
from entroprl.train.precision import ComputeCopy

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Full tensors on rank 0's CPU, one at a time (never a whole unsharded model on a GPU)."""
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
"""Rank 0 holds the full state; every rank keeps its shard."""


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(_root(model), FSDPModule)


def _root(model: torch.nn.Module) -> torch.nn.Module:
    """The module that is, or would be, FSDP's root unit: a peft model's base model (see the
    module docstring), any other model itself."""
    model = unwrapped(model)
    return model.get_base_model() if lora.is_lora(model) else model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks each sharded as one unit: the classes a Hugging Face model lists in
    ``_no_split_modules`` (its decoder layers), as accelerate's transformer wrap policy does;
    sharded too (FSDP2 makes each sharded module's class a subclass of its own)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]


def shard(
    model: torch.nn.Module,
    *,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> torch.nn.Module:
    """FSDP2 over the default process group: each decoder layer, then the root (embeddings, final
    norm and head, tied weights included). The model is sharded in place and returned.

    Each unit is moved to `device` (default: the current CUDA device, else the CPU) as it is
    sharded, so a model still on the CPU never needs a whole copy on the GPU."""
    if not dist.is_initialized():
        raise RuntimeError(
            "trainer.strategy=fsdp shards over torch.distributed ranks: launch with torchrun "
            "(--nproc-per-node 1 is fine) or call torch.distributed.init_process_group first"
        )
    policy = MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None
    )
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Each rank keeps its shard of the tensors it made, so ranks that made different weights (a
    # random init or adapters under other seeds) would train a mix: every rank starts from rank
    # 0's, as DDP broadcasts them (held here as references, no copy).
    several = dist.get_world_size() > 1
    rank0 = dict(_root(model).state_dict()) if several and dist.get_rank() == 0 else {}
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # By default FSDP2 keeps the root's parameters (embeddings, final norm, head) gathered after
    # a forward. After a no_grad forward (sampling, old log-probs) the next forward with grad
    # would then reuse them without the hook that reduce-scatters their gradient, and they would
    # get none: an explicit True regathers them each forward.
    fully_shard(_root(model), mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    if several:
        set_model_state_dict(_root(model), rank0, options=_SCATTER)
    return model


def wrap(
    model: torch.nn.Module,
    strategy: str,
    *,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> torch.nn.Module:
    """The module the update runs through: `model` sharded in place (``fsdp``, see `shard`), a
    DistributedDataParallel wrapper around it (``ddp`` on several ranks), with a `compute_dtype`
    in one process a `precision.ComputeCopy` of it, or `model` itself."""
    check_choice("strategy", strategy, STRATEGIES)
    if strategy == "fsdp":
        return shard(model, compute_dtype=compute_dtype, device=device)
    if distributed.world_size() > 1:
        if compute_dtype is not None:
            raise ConfigError(
                "model.compute_dtype: mixed precision on several ranks needs trainer.strategy=fsdp"
            )
        return torch.nn.parallel.DistributedDataParallel(model)
    if compute_dtype is not None and compute_dtype != next(model.parameters()).dtype:
        return ComputeCopy(model, compute_dtype)
    return model


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def model_state(model: torch.nn.Module, *, trainable_only: bool = False) -> dict[str, Tensor]:
    """The full model state dict on rank 0 (CPU tensors); other ranks of a sharded model get {}.
    `trainable_only`: the parameters that train (a LoRA policy's adapters), the frozen ones
    neither gathered nor copied. Every rank must call it when the model is sharded (it gathers)."""
    model = unwrapped(model)
    if is_sharded(model):
        options = replace(_GATHER, ignore_frozen_params=trainable_only)
        return get_model_state_dict(model, options=options)
    if trainable_only:
        return {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state dict keyed by parameter name (``{"state": {name: {slot: value}},
    "param_groups": [{..., "params": [name, ...]}]}``); {} on ranks other than 0 when sharded."""
    model = unwrapped(model)
    options = _GATHER if is_sharded(model) else StateDictOptions(full_state_dict=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_sd: dict[str, Tensor],
    optimizer_sd: dict[str, Any],
    *,
    trainable_only: bool = False,
) -> None:
    """Load full state dicts (as `model_state` and `optimizer_state` give them; with
    `trainable_only`, `model_sd` holds the trainable parameters alone). A sharded model reads them
    from rank 0 only (others may pass {}) and keeps its shard on every rank."""
    model = unwrapped(model)
    options = _SCATTER if is_sharded(model) else StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=replace(options, strict=not trainable_only))
    set_optimizer_state_dict(model, optimizer, optimizer_sd, options=options)


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block a sharded model's parameters stay gathered: one all-gather per unit for
    the whole block instead of one per forward, which in generation means one per decoded token.
    It costs a whole copy of the model in its compute dtype on every rank. Resharded after, so
    that training forwards gather (and hook) their parameters afresh. Nothing for a model that is
    not sharded."""
    units = [m for m in unwrapped(model).modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def full_tensors(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, whole tensor) for every entry of the model's state dict, gathered one at a time
    where sharded, on the model's device: what an inference engine loads. Every rank must run
    the iteration to its end when the model is sharded."""
    for name, value in unwrapped(model).state_dict().items():
        yield name, value.full_tensor() if isinstance(value, DTensor) else value


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether no element of `tensors` is NaN or inf on any rank, each rank checking its own shard
    of a sharded tensor; every rank must call it. One sum per tensor tells, without a copy of it:
    NaN and inf carry through a sum, and weights never come near float32's overflow."""
    tensors = list(tensors)
    # on the run's device: an optimizer's step counters are CPU scalars beside GPU weights
    device = distributed.run_device() or tensors[0].device
    sums = [
        (t.to_local() if isinstance(t, DTensor) else t).detach().sum(dtype=torch.float32).to(device)
        for t in tensors
    ]
    bad = (~torch.isfinite(torch.stack(sums))).sum()
    return int(distributed.all_reduce_sum(bad).item()) == 0


def global_grad_norm(norm: Tensor) -> Tensor:
    """`clip_grad_norm_`'s result as a plain tensor (a replicated DTensor over sharded grads)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
