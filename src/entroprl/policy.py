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
    """`trainer.device`: as named, or with `auto` this rank's GPU if there is one, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        # torchrun's LOCAL_RANK: this node's GPU for this rank, also when several nodes train
        local = int(os.environ.get("LOCAL_RANK", distributed.rank()))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")
