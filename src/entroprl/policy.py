"""The policy a run trains or evaluates: its checkpoint (or the demo's warm start), its device."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from entroprl import distributed
from entroprl.config import Config
from entroprl.errors import ConfigError


def load_policy(config: Config) -> tuple[PreTrainedModel, Any]:
    """The model and tokenizer to train: a local HF checkpoint, or the demo's warm start."""
    dtype = getattr(torch, config.model.dtype)
    if config.model.path is None:
        if config.data.task != "countdown":
            raise ConfigError(
                "model.path: required for tasks other than the built-in countdown (a local "
                "Hugging Face model directory)"
            )
        from entroprl.warmstart import WarmStartConfig, default_cache_dir, warm_start

        path = warm_start(WarmStartConfig(), default_cache_dir())
    else:
        path = Path(config.model.path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.path={path}: not a Hugging Face model directory (no config.json)"
            )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if config.model.gradient_checkpointing:
        # non-reentrant: the reentrant form breaks FSDP's per-layer parameter gathering
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def pick_device(name: str) -> torch.device:
    """`trainer.device` resolved, once, to the device every tensor of the run is made on: `auto`
    is this rank's GPU if there is one, else the CPU; a GPU named without an index (`cuda`) is
    this rank's, torchrun's LOCAL_RANK (also when several nodes train), because
    `torch.cuda.set_device` and the process group's collectives need an index."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    device = torch.device(name)
    if device.type in ("cpu", "mps") or device.index is not None:
        return device
    local = int(os.environ.get("LOCAL_RANK", distributed.rank()))
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    # with no GPU visible the index stays out of range, and the trainer says so in one line
    return torch.device(device.type, local % count if count else local)
