"""Sampling with a KV cache, each distinct prompt prefilled once, finished rows dropped.

`model.generate` on a prompt repeated G times prefills it G times and keeps decoding rows that hit
EOS until the last row stops. Here a prompt's cache is computed once and copied to its G rows, and
rows that sampled EOS leave the batch (their cache rows too) once they are an eighth of it
(`COMPACT_AT`), so each step's forward runs on the rows still going and few others.

The draw is `model.generate`'s, token for token under the same seed: the same logits processing
(`sampling_scores`: temperature, then top-p as transformers' `TopPLogitsWarper`, no top-k) and the
same random numbers. `torch.multinomial` draws one sample as argmax(p / E) with E a tensor of
Exp(1) noise the shape of p (the exponential race: P(argmax = i) = p_i); `generate` draws it for
all of its rows, finished or not, every step, so this loop draws the same (rows, vocab) tensor each
step and uses the rows still going.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from entroprl import parallel

COMPACT_AT = 1 / 8
"""Finished rows leave the batch once they are more than this share of it. Dropping them copies
the KV cache, as much as a step's growth of it; decoding them on costs their share of a step's
forward. `benchmarks/bench_sampler.py --compact-at 0 0.25 0.5 1` (16 prompts x 8, 24 tokens):
0.114 s per call at an eighth against 0.119 s dropping each row at once, 0.110 s at a quarter,
0.121 s at a half and 0.127 s never at hidden 128; 0.228 s against 0.233, 0.237, 0.268 and 0.283 s
at hidden 256. An eighth and a quarter are within the noise of each other."""


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as `generate` uses them: training must match sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_keyword(model) -> str:
    """The name of the KV cache in `model`'s forward and output: `cache` from transformers 5.2x
    on (the old name still works there, with a deprecation warning), `past_key_values` before."""
    forward = parallel.unwrapped(model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def sampling_scores(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """Float32 scores whose softmax is the sampling distribution: logits / temperature, then the
    smallest top set whose probability exceeds `top_p` kept (at least one token), the rest -inf."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        # ascending sort as transformers does it, so that ties break the same way
        ordered, order = torch.sort(scores, descending=False)
        remove = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), -float("inf"))
    return scores


def exponential_race(scores: Tensor, noise: Tensor) -> Tensor:
    """One token per row drawn from softmax(scores): argmax of p / E with E ~ Exp(1) iid
    (`noise`, the shape of `scores`), as `torch.multinomial(p, 1)` computes it."""
    return (scores.softmax(-1) / noise).argmax(-1)


def sample(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    repeats: Tensor,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
) -> Tensor:
    """Responses to left-padded distinct prompts (D, P), prompt i answered `repeats[i]` times in a
    row: (repeats.sum(), T) token ids, `pad_token_id` after each row's EOS, T the longest response
    (at most `max_new_tokens`). Greedy at `temperature=0`."""
    # Inference mode drops autograd's version counting from the loop's many small operations
    # (3-4% of a call at hidden 128); its tensors cannot enter a forward that will be
    # differentiated, so the tokens leave it as an ordinary copy.
    with torch.inference_mode():
        tokens = _decode(
            model,
            prompt_ids,
            prompt_mask,
            repeats,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
    return tokens.clone()


def _decode(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    repeats: Tensor,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
) -> Tensor:
    device = prompt_ids.device
    key = cache_keyword(model)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids(prompt_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    expand = torch.arange(len(repeats), device=device).repeat_interleave(repeats.to(device))
    cache = getattr(out, key)
    cache.batch_select_indices(expand)
    logits = out.logits[expand, -1]
    attention = prompt_mask[expand]
    rows = len(expand)
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    batch_rows = torch.arange(rows, device=device)  # the output row of each row in the batch
    live = torch.ones(rows, dtype=torch.bool, device=device)  # batch rows still sampling
    for step in range(max_new_tokens):
        if temperature > 0:
            noise = torch.empty(rows, logits.shape[-1], device=device).exponential_()
            scores = sampling_scores(logits, temperature, top_p)
            next_tokens = exponential_race(scores, noise[batch_rows])
        else:
            next_tokens = logits.argmax(-1)
        tokens[batch_rows[live], step] = next_tokens[live]
        live &= next_tokens != eos_token_id
        going = int(live.sum())
        if step == max_new_tokens - 1 or going == 0:
            return tokens[:, : step + 1]
        if len(live) - going > COMPACT_AT * len(live):
            kept = live.nonzero().squeeze(-1)
            batch_rows, live = batch_rows[kept], live[kept]
            next_tokens, attention = next_tokens[kept], attention[kept]
            cache.batch_select_indices(kept)
        position = attention.sum(-1, keepdim=True)
        attention = torch.cat([attention, attention.new_ones(len(live), 1)], dim=-1)
        logits = model(
            input_ids=next_tokens[:, None],
            attention_mask=attention,
            position_ids=position,
            use_cache=True,
            **{key: cache},
        ).logits[:, -1]
    return tokens
