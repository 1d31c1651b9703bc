"""The policy's forwards over rollouts: log-probs of the response tokens and their entropies."""

from __future__ import annotations

import torch
from torch import Tensor

from entroprl.entropy import logprobs_and_entropy
from entroprl.sampler import position_ids


def forward_log_probs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Log-probs of the response tokens and their entropies, from one forward pass.

    Only the last R + 1 positions' logits are computed (`logits_to_keep`): the prompt's logits are
    never needed.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=response_len + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]
    return logprobs_and_entropy(
        logits, input_ids[:, -response_len:], temperature=temperature, entropy_grad=entropy_grad
    )


@torch.no_grad()
def batched_log_probs(
    model, batch, micro_batch_size: int, temperature: float
) -> tuple[Tensor, Tensor]:
    """`forward_log_probs` over a whole batch in micro-batches, without gradient."""
    R = batch.response_mask.shape[1]
    parts = [
        forward_log_probs(
            model,
            batch.input_ids[i : i + micro_batch_size],
            batch.attention_mask[i : i + micro_batch_size],
            R,
            temperature=temperature,
        )
        for i in range(0, batch.input_ids.shape[0], micro_batch_size)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
