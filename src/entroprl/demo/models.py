"""Tiny causal LMs built from scratch (Qwen2 or Llama architecture), saved and loaded atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from entroprl.algos.checks import check_choice

ARCHS = {"qwen2": Qwen2Config, "llama": LlamaConfig}
QWEN25_05B = {
    "vocab_size": 151_936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32_768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
"""Qwen2.5-0.5B's architecture (a `Qwen2Config`'s arguments): the GPU checks' policy, built with
random weights since nothing can be downloaded."""
QWEN25_05B_TINY = QWEN25_05B | {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
}
"""`QWEN25_05B` with 2 small layers (the same vocabulary and head layout): the GPU checks' path
run on a CPU (`--tiny`)."""


def tiny_config(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position: int = 64,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    bos_token_id: int | None = 2,
    arch: str = "qwen2",
) -> PretrainedConfig:
    """Config of a small decoder-only LM with tied input/output embeddings.

    `intermediate_size` defaults to ``4 * hidden_size``; heads use full (not grouped) key/values.
    The token ids default to those of `entroprl.demo.tokenizer.build_char_tokenizer`.
    """
    check_choice("arch", arch, ARCHS)
    if vocab_size < 1 or hidden_size < 1 or num_layers < 1 or num_heads < 1 or max_position < 1:
        raise ValueError(
            "vocab_size, hidden_size, num_layers, num_heads and max_position must be >= 1, got "
            f"{vocab_size}, {hidden_size}, {num_layers}, {num_heads}, {max_position}"
        )
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    for name, tid in (("pad", pad_token_id), ("eos", eos_token_id), ("bos", bos_token_id)):
        if tid is not None and not 0 <= tid < vocab_size:
            raise ValueError(f"{name}_token_id {tid} is outside the vocabulary [0, {vocab_size})")
    return ARCHS[arch](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
    )


def build_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A freshly initialised causal LM for `config`, its weights a function of `seed` alone."""
    # The global RNG is restored afterwards so that building a model does not shift the caller's
    # random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: str | Path
) -> Path:
    """Save model (safetensors) and tokenizer to `path`, replacing what was there.

    Everything is written to a temporary directory next to `path` and then renamed into place, so
    a reader never sees a half-written directory. An existing `path` is moved aside first and
    removed after the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        publish_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def publish_dir(tmp: Path, path: Path) -> None:
    """Rename the finished directory `tmp` to `path`, moving an existing `path` aside first."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_model(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer saved by `save_model` (or any local HF model directory)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a saved model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
