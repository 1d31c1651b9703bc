"""The policy's forwards over rollouts: log-probs of the response tokens and their entropies."""

from __future__ import annotations

import torch
from torch import Tensor

from entroprl.algos.entropy import logprobs_and_entropy
from entroprl.rollout.sampler import cache_keyword, position_ids


def forward_log_probs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    entropy_grad: bool = False,
    shared_prefix: bool = False,
) -> tuple[Tensor, Tensor]:
    """Log-probs of the response tokens and their entropies, from one forward pass (two with
    `shared_prefix`: `shared_prefix_logits`).

    Only the last R + 1 positions' logits are computed (`logits_to_keep`): the prompt's logits are
    never needed.
    """
    if shared_prefix:
        logits = shared_prefix_logits(model, input_ids, attention_mask, response_len)
    else:
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            logits_to_keep=response_len + 1,
            use_cache=False,
        ).logits[:, :-1]
    return logprobs_and_entropy(
        logits, input_ids[:, -response_len:], temperature=temperature, entropy_grad=entropy_grad
    )


@torch.no_grad()
def batched_log_probs(
    model, batch, micro_batch_size: int, temperature: float, *, shared_prefix: bool = False
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
            shared_prefix=shared_prefix,
        )
        for i in range(0, batch.input_ids.shape[0], micro_batch_size)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def shared_prefix_logits(
    model, input_ids: Tensor, attention_mask: Tensor, response_len: int
) -> Tensor:
    """The logits (B, R, V) that predict the response tokens, each distinct prompt of the batch
    computed once ("Prefix Grouper", arXiv 2506.05433): a forward over the distinct prompts keeps
    their keys and values, which are copied to the rows that share them, and a second forward runs
    the responses against them. Gradients reach the prompt's computation through the copied keys
    and values (summed over its rows), so logits and gradients are those of the full forward, to
    float rounding. Rows share a prompt when their prompt columns (ids and mask) are equal."""
    P = input_ids.shape[1] - response_len
    prompts = torch.cat([input_ids[:, :P], attention_mask[:, :P]], dim=-1)
    distinct, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    mask = distinct[:, P:]
    key = cache_keyword(model)
    prefix = model(
        input_ids=distinct[:, :P],
        attention_mask=mask,
        position_ids=position_ids(mask),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(prefix, key)
    cache.batch_select_indices(inverse)
    responses = model(
        input_ids=input_ids[:, P:],
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask)[:, P:],
        use_cache=True,
        **{key: cache},
    )
    return torch.cat([prefix.logits[inverse], responses.logits[:, :-1]], dim=1)
