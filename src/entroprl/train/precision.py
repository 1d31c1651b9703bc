"""Mixed precision: the policy's forwards and backward in bfloat16, its weights and AdamW in
`model.dtype` (float32).

Under `trainer.strategy=fsdp` FSDP casts the gathered weights itself (`parallel.shard`). In one
process without FSDP the forwards run through `ComputeCopy`, a copy of the model with bfloat16
parameters (its buffers, such as rotary embeddings' inv_freq, stay float32) whose gradients are
added to the float32 weights' and which an optimizer step refreshes: the arithmetic of FSDP's
`MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`, verl's default. It
is faster than `torch.autocast` on the CPU (docs/benchmarks.md), which casts every activation a
matrix product reads. Sampling from the HF
backend stays in float32: decoding's small matrix products gain nothing from bfloat16 on the CPU,
so the rollout and the update differ by bfloat16 rounding, as they do with vLLM. On a GPU the HF
backend samples from the bfloat16 copy.

bfloat16 arithmetic on a CPU is fast only where the CPU has it natively (AVX-512 BF16 or AMX, and
torch's AVX-512 kernels): under AVX2 kernels a step in bfloat16 is many times slower than in
float32 (docs/benchmarks.md), so the trainer refuses it there (`check_native_bfloat16`).

On the CPU the attention runs in float32 inside the bfloat16 forward (`float32_attention`): torch's
bfloat16 scaled-dot-product attention kernel there is slower than its float32 kernel at small
head dimensions (docs/benchmarks.md), and the attention is a small share of the arithmetic.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import Tensor

from entroprl.errors import ConfigError


def native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively, with torch's kernels that use it: AVX-512
    BF16 or AMX instructions, and torch's AVX-512 kernels (not AVX2, which convert)."""
    cpu = torch.cpu
    hardware = (
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return hardware and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def check_native_bfloat16(dtype: str | None) -> None:
    """Refuse bfloat16 training on a CPU without native bfloat16, where it is many times slower."""
    if dtype != "bfloat16" or native_bfloat16():
        return
    raise ConfigError(
        "model.compute_dtype / model.dtype: bfloat16 on this CPU (torch capability "
        f"{torch.backends.cpu.get_cpu_capability()}, no native AVX-512 BF16 or AMX) runs about 11x "
        "slower than float32: train in float32 here (model.compute_dtype=null, "
        "model.dtype=float32), or in bfloat16 on a GPU"
    )


FLOAT32_SDPA = "sdpa_float32"
"""The name under which `float32_attention` registers its attention with transformers."""


class ComputeCopy(torch.nn.Module):
    """`model`'s forwards and backward in `dtype`, through a copy of it whose parameters are cast
    to `dtype` (`cast_parameters`: its buffers stay as they are).

    `parameters()` are `model`'s own (the master weights the optimizer steps): each gradient the
    copy's backward accumulates is added to its master's in the master's dtype, summing
    micro-batches there, and the copy's is dropped. `refresh()` copies the master weights in; call
    it after every change to them (`Trainer` hooks it to the optimizer's step and to resume).
    `module` is the copy, as DistributedDataParallel's `module` is the module it runs.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.master = model
        # a tuple: not a submodule of this one
        self._copy = (cast_parameters(copy.deepcopy(model), dtype),)
        for master, low in zip(model.parameters(), self.module.parameters(), strict=True):
            if low.requires_grad:
                low.register_post_accumulate_grad_hook(partial(_add_to_master, master))

    @property
    def module(self) -> torch.nn.Module:
        return self._copy[0]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def refresh(self) -> None:
        for master, low in zip(self.master.parameters(), self.module.parameters(), strict=True):
            low.copy_(master)


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast `module`'s floating-point parameters to `dtype` in place and return it; its buffers
    keep their dtype, as under FSDP2's `MixedPrecisionPolicy(param_dtype=dtype)`, which casts
    parameters only. Rotary embeddings' `inv_freq` thus stays float32: rounded to bfloat16, the
    angle `position * inv_freq` drifts further from its float32 value the further the position.
    """
    for param in module.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    return module


def _add_to_master(master: Tensor, low: Tensor) -> None:
    grad = low.grad.to(master.dtype)
    master.grad = grad if master.grad is None else master.grad.add_(grad)
    low.grad = None


def sdpa_float32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention computed in float32, its output cast back to the query's
    dtype; signature and return value those of `transformers.integrations.sdpa_attention`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(
        module, query.float(), key.float(), value.float(), attention_mask, **kwargs
    )
    return out.to(dtype), weights


def float32_attention(model) -> bool:
    """Switch `model`'s SDPA attention to `sdpa_float32`, with SDPA's masks. Returns whether it
    did: models that do not use SDPA keep theirs, as do all under transformers < 4.53, which has
    no registry of mask functions. In float32 the switch changes nothing: the casts are
    no-ops."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return False
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(FLOAT32_SDPA, sdpa_float32)
    # without its own entry a mask function name falls through to the 2-D padding mask, which
    # SDPA would broadcast over the wrong dimensions
    AttentionMaskInterface.register(FLOAT32_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(FLOAT32_SDPA)
    else:
        config._attn_implementation = FLOAT32_SDPA
    return True
