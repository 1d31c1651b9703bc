"""LoRA through `peft` (`pip install 'entroprl[lora]'`): `model.lora_rank > 0` trains low-rank
adapters on the policy's linear layers while its weights stay frozen, as verl's `lora_rank`.

The entropy diagnostics are unchanged: they read the adapted policy's forwards like any other.
The reference policy of `algorithm.kl_coef` is the same model with its adapters switched off
(`reference`), not a second copy. Checkpoints hold the adapter (peft's `adapter_model.safetensors`
and `adapter_config.json`), which `entroprl eval --model` and Hugging Face load on top of the base
model. The vLLM backend samples from the adapted policy's merged weights (`merged_tensors`), as
TRL's GRPO trainer syncs a peft model to vLLM. One process, DDP or FSDP (`entroprl.train.parallel`
shards the adapters with their layers; a checkpoint gathers the adapters alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from entroprl.errors import ConfigError, TrainingError

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def attach(model: torch.nn.Module, rank: int, alpha: float, targets: str) -> torch.nn.Module:
    """`model` with LoRA adapters of `rank` on the modules `targets` names (peft's
    `target_modules`: `all-linear`, or comma-separated module names such as `q_proj,v_proj`),
    only the adapters trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError(
            "model.lora_rank: LoRA needs peft: pip install 'entroprl[lora]'"
        ) from None
    modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # target modules not found in the model
        raise ConfigError(f"model.lora_target_modules={targets}: {e}") from None


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def merged_tensors(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for every weight of the adapted policy `model` under the base model's names,
    as a checkpoint of the merged model holds them (what an inference engine loads): each adapted
    layer's weight plus its active adapters' update (peft's `get_delta_weight`, scale x B A),
    one layer at a time; the adapters' own tensors left out. `model` is not changed: peft's
    `merge_adapter` / `unmerge_adapter`, which TRL syncs through, would round the base weights on
    the way back."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {
        f"{name}.base_layer.weight": module
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer)
    }
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            if ".lora_" in name:
                continue
            layer = adapted.get(name)
            if layer is not None:
                for adapter in layer.active_adapters:
                    tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
            # sharded (FSDP): the sum is computed on the shards, then gathered whole
            yield name.replace(".base_layer.", "."), _whole(tensor)


def _whole(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def reference(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` with its adapters off inside the block: the frozen base policy."""
    with model.disable_adapter():
        yield model


def adapter_state(model: torch.nn.Module, folder: Path) -> dict[str, Tensor]:
    """The adapter weights saved in checkpoint folder `folder` (its `model/`) under `model`'s own
    parameter names, ready for `set_model_state_dict` (sharded or not). peft saves them without the
    adapter's name; which saved name is which parameter is read off peft's own renaming
    (`get_peft_model_state_dict` passes the tensors through). Raises TrainingError when the
    checkpoint's adapters are not this model's."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    saved = get_peft_model_state_dict(model, state_dict=params)
    own = {id(p): name for name, p in params.items()}
    names = {key: own[id(p)] for key, p in saved.items()}
    stored = load_file(folder / ADAPTER_WEIGHTS)
    if stored.keys() != names.keys():
        differing = sorted(names.keys() ^ stored.keys())
        raise TrainingError(
            f"{folder / ADAPTER_WEIGHTS}: its adapters are not this model's "
            f"({len(differing)} names differ, e.g. {differing[0]}): resume with the same "
            "model.lora_rank and model.lora_target_modules"
        )
    return {names[key]: tensor for key, tensor in stored.items()}
