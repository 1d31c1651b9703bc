"""The policy a run trains or evaluates: its checkpoint (a folder or a Hugging Face hub id, or the
demo's warm start), its device.

A folder of LoRA adapters (peft's `adapter_config.json` and weights, as a LoRA run's checkpoint
holds them) is a checkpoint too: its base model (`base_model_name_or_path`, a folder or a hub id)
with the adapters merged into its weights (peft's `merge_and_unload`), a plain model that runs as
fast as the base and that vLLM and `save_pretrained` take as it is. The merged model is named for
the adapters' folder, so that a LoRA run started from it saves adapters whose base is that folder:
a base may itself be adapters, merged in the same way first."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from entroprl.config import Config
from entroprl.errors import ConfigError
from entroprl.train import distributed


def load_policy(config: Config) -> tuple[PreTrainedModel, Any]:
    """The model and tokenizer to train: a local HF checkpoint, or the demo's warm start."""
    dtype = getattr(torch, config.model.dtype)
    if config.model.path is None:
        if config.data.task != "countdown":
            raise ConfigError(
                "model.path: required for tasks other than the built-in countdown (a local "
                "Hugging Face model directory)"
            )
        from entroprl.demo.warmstart import WarmStartConfig, default_cache_dir, warm_start

        path = warm_start(WarmStartConfig(), default_cache_dir())
    else:
        path = model_dir(config.model.path)
    model, tokenizer = load_pretrained(path, dtype)
    if config.model.path is not None and not Path(config.model.path).expanduser().is_dir():
        _name(model, config.model.path)  # a hub id as the user gave it, not its cache folder
    if config.model.gradient_checkpointing:
        # non-reentrant: the reentrant form breaks FSDP's per-layer parameter gathering
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: Path) -> bool:
    """Whether folder `path` holds LoRA adapters rather than a whole model."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def load_pretrained(path: Path, dtype: torch.dtype | str = "auto") -> tuple[PreTrainedModel, Any]:
    """The model and tokenizer of local folder `path`: a Hugging Face model, or LoRA adapters
    merged into their base model (the module docstring), whose tokenizer is the adapters' folder's
    where it has one (a LoRA run saves it there), else the base model's."""
    return _load(path, dtype, below=())


def _load(path: Path, dtype, below: tuple[Path, ...]) -> tuple[PreTrainedModel, Any]:
    """`load_pretrained`, `below` the adapter folders whose bases led here (a loop is refused)."""
    if path.resolve() in below:
        raise ConfigError(
            f"model.path={below[0]}: LoRA adapters whose chain of base models "
            f"(base_model_name_or_path) comes back to {path}"
        )
    if is_adapter(path):
        model, tokenizer = _merged(path, dtype, (*below, path.resolve()))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return _name(model, str(path.resolve())), tokenizer


def _name(model: PreTrainedModel, name: str) -> PreTrainedModel:
    """`model` named `name`: what a LoRA run's adapters record as their base model (peft reads it
    off the model), so that they load on top of this model wherever they are loaded from."""
    model.name_or_path = model.config.name_or_path = name
    return model


def _merged(path: Path, dtype, below: tuple[Path, ...]) -> tuple[PreTrainedModel, Any]:
    """The adapters of folder `path` merged into their base model (itself loaded by `_load`)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(
            f"model.path={path}: LoRA adapters; loading them needs peft: "
            "pip install 'entroprl[lora]'"
        ) from None
    base_name = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ConfigError(
            f"model.path={path}: LoRA adapters whose {ADAPTER_CONFIG} names no base model "
            "(base_model_name_or_path)"
        )
    try:
        base_path = model_dir(base_name)
    except ConfigError as e:
        raise ConfigError(
            f"model.path={path}: LoRA adapters whose base model ({ADAPTER_CONFIG}'s "
            f"base_model_name_or_path) cannot be loaded: {e}"
        ) from None
    base, base_tokenizer = _load(base_path, dtype, below)
    model = PeftModel.from_pretrained(base, path).merge_and_unload()
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    return model, AutoTokenizer.from_pretrained(path) if has_tokenizer else base_tokenizer


def write_merged(adapters: Path, out: Path, dtype: torch.dtype | str = "auto") -> Path:
    """A Hugging Face model folder at `out` (weights and tokenizer): LoRA adapters folder
    `adapters` merged into their base model (`load_pretrained`), for what loads a whole model."""
    model, tokenizer = load_pretrained(adapters, dtype)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
"""A Hugging Face hub repository id: `org/name` (or a bare `name`)."""
WEIGHT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
"""What a model needs from a hub repository: config, weights, tokenizer, chat template."""


def model_dir(name: str) -> Path:
    """`model.path` as a local folder: a directory as given, or a Hugging Face hub id resolved
    through huggingface_hub's cache (downloaded when missing, unless HF_HUB_OFFLINE=1)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not is_adapter(path):
            raise ConfigError(
                f"model.path={name}: not a Hugging Face model directory (no config.json) nor "
                f"LoRA adapters (no {ADAPTER_CONFIG})"
            )
        return path
    if not HUB_ID.fullmatch(name):
        raise ConfigError(f"model.path={name}: no such directory, and not a hub id (org/name)")
    from huggingface_hub import constants, snapshot_download

    try:
        local = Path(snapshot_download(name, allow_patterns=WEIGHT_FILES))
    except Exception as e:  # not found, offline without a copy, no network, a gated repo...
        offline = " (HF_HUB_OFFLINE is set: only the local cache was searched)"
        raise ConfigError(
            f"model.path={name}: no such directory, and the Hugging Face hub id could not be "
            f"resolved{offline if constants.HF_HUB_OFFLINE else ''}: {type(e).__name__}: {e}"
        ) from None
    if not (local / "config.json").is_file() and not is_adapter(local):
        raise ConfigError(
            f"model.path={name}: the hub repository has no config.json (nor {ADAPTER_CONFIG})"
        )
    return local


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
