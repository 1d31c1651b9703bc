"""A tiny untrained policy for tests: a 1-layer Qwen2 and the project's char-level tokenizer."""

import pytest
import torch

from entroprl.demo.models import build_model, tiny_config
from entroprl.demo.tokenizer import build_char_tokenizer
from entroprl.rollout.batch import ScoredRollout
from entroprl.train.precision import native_bfloat16

needs_native_bfloat16 = pytest.mark.skipif(
    not native_bfloat16(),
    reason="this CPU has no native bfloat16 (AVX-512 BF16 or AMX with torch's AVX-512 kernels): "
    "the trainer refuses bfloat16 here",
)


def make_tiny_policy(
    seed: int = 0, *, hidden: int = 32, layers: int = 1, heads: int = 2, kv_heads: int | None = None
):
    """The policy and tokenizer; `kv_heads` below `heads` makes it grouped-query."""
    tok = build_char_tokenizer()
    config = tiny_config(
        len(tok),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    config.num_key_value_heads = kv_heads or heads
    return build_model(config, seed=seed), tok


def alternating_scores(batch, answers):
    """A stand-in for `Trainer.score`: scores (and rewards) 0, 1, 0, 1, ... down the batch, so
    that every group of an even size holds both. The untrained tiny policy solves no problem: with
    the real verifier every reward, advantage and gradient of a step is 0, no update moves a
    weight, and a test comparing two updates compares nothing."""
    scores = (torch.arange(len(batch.texts)) % 2).float()
    return ScoredRollout(batch=batch, scores=scores, rewards=scores.clone())
