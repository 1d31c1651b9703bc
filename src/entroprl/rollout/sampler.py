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

On a GPU the step's forward is the cost of a few kernels launched from Python hundreds of times, not
arithmetic; there `static_cache=True` decodes every row to the end in a cache of fixed shape (a
transformers `StaticCache` and a prepared 4-D mask), so each step is the same computation on the
same buffers, captured once as a CUDA graph and replayed (`_Replay`). The draw is the same.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from entroprl.train import parallel

COMPACT_AT = 1 / 8
"""Finished rows leave the batch once they are more than this share of it. Dropping them copies
the KV cache, as much as a step's growth of it; decoding them on costs their share of a step's
forward. `benchmarks/bench_sampler.py --compact-at` measures the trade (docs/benchmarks.md): an
eighth and a quarter are within the noise of each other, both faster than at once or never."""


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


def draw(
    logits: Tensor, temperature: float, top_p: float, rows: int, batch_rows: Tensor | None = None
) -> Tensor:
    """The next token of each row of `logits` (the rows `batch_rows` of `rows`), drawing the
    noise of all `rows` as `generate` does, or the argmax at `temperature=0`."""
    if temperature == 0:
        return logits.argmax(-1)
    noise = torch.empty(rows, logits.shape[-1], device=logits.device).exponential_()
    if batch_rows is not None:
        noise = noise[batch_rows]
    return exponential_race(sampling_scores(logits, temperature, top_p), noise)


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
    static_cache: bool = False,
) -> Tensor:
    """Responses to left-padded distinct prompts (D, P), prompt i answered `repeats[i]` times in a
    row: (repeats.sum(), T) token ids, `pad_token_id` after each row's EOS, T the longest response
    (at most `max_new_tokens`). Greedy at `temperature=0`. `static_cache`: the fixed-shape decode
    (`_decode_static`), replayed as a CUDA graph on a GPU; the same tokens."""
    # Inference mode drops autograd's version counting from the loop's many small operations
    # (3-4% of a call at hidden 128); its tensors cannot enter a forward that will be
    # differentiated, so the tokens leave it as an ordinary copy.
    decode = _decode_static if static_cache else _decode
    how = Draw(temperature, top_p, max_new_tokens, eos_token_id, pad_token_id)
    with torch.inference_mode():
        tokens = decode(model, prompt_ids, prompt_mask, repeats, how)
    return tokens.clone()


@dataclass(frozen=True)
class Draw:
    """How `sample` draws: the decoders' settings."""

    temperature: float
    top_p: float
    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int


def _decode(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    repeats: Tensor,
    how: Draw,
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
    tokens = torch.full(
        (rows, how.max_new_tokens), how.pad_token_id, dtype=torch.long, device=device
    )
    batch_rows = torch.arange(rows, device=device)  # the output row of each row in the batch
    live = torch.ones(rows, dtype=torch.bool, device=device)  # batch rows still sampling
    for step in range(how.max_new_tokens):
        next_tokens = draw(logits, how.temperature, how.top_p, rows, batch_rows)
        tokens[batch_rows[live], step] = next_tokens[live]
        live &= next_tokens != how.eos_token_id
        going = int(live.sum())
        if step == how.max_new_tokens - 1 or going == 0:
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


def _decode_static(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    repeats: Tensor,
    how: Draw,
) -> Tensor:
    """`_decode` with shapes fixed for the whole call: every row is prefilled (no prompt shared)
    and decodes to the end, finished rows padded, into a `StaticCache` of P + how.max_new_tokens
    positions, each step's forward given a prepared additive 4-D mask of the cache positions its
    row sees (its prompt's tokens and every decoded one) and its position id."""
    from transformers import StaticCache

    device = prompt_ids.device
    expand = torch.arange(len(repeats), device=device).repeat_interleave(repeats.to(device))
    ids, prompt = prompt_ids[expand], prompt_mask[expand]
    rows, P = ids.shape
    width = P + how.max_new_tokens
    key = cache_keyword(model)
    cache = StaticCache(config=parallel.unwrapped(model).config, max_cache_len=width)
    dtype = next(model.parameters()).dtype
    visible = torch.zeros(rows, width, dtype=torch.bool, device=device)
    visible[:, :P] = prompt.bool()
    causal = torch.ones(P, width, dtype=torch.bool, device=device).tril()
    out = model(
        input_ids=ids,
        attention_mask=_additive(visible[:, None, None, :] & causal, dtype),
        position_ids=position_ids(prompt),
        use_cache=True,
        logits_to_keep=1,
        **{key: cache},
    )
    logits = out.logits[:, -1]
    del out
    # the step's inputs: buffers updated in place, so that a replayed graph reads them
    step_ids = torch.empty(rows, 1, dtype=torch.long, device=device)
    step_mask = _additive(visible[:, None, None, :], dtype)
    step_position = prompt.sum(-1, keepdim=True)

    def forward() -> Tensor:
        return model(
            input_ids=step_ids,
            attention_mask=step_mask,
            position_ids=step_position,
            use_cache=True,
            **{key: cache},
        ).logits

    run = _Replay(forward) if device.type == "cuda" else forward
    tokens = torch.full(
        (rows, how.max_new_tokens), how.pad_token_id, dtype=torch.long, device=device
    )
    live = torch.ones(rows, dtype=torch.bool, device=device)
    with grouped_attention(parallel.unwrapped(model)):
        for step in range(how.max_new_tokens):
            next_tokens = draw(logits, how.temperature, how.top_p, rows)
            tokens[:, step] = torch.where(live, next_tokens, how.pad_token_id)
            live &= next_tokens != how.eos_token_id
            if step == how.max_new_tokens - 1 or not bool(live.any()):
                return tokens[:, : step + 1]
            step_ids.copy_(next_tokens[:, None])
            step_mask[..., P + step] = 0  # the new token's key, written at cache position P + step
            if step:
                step_position += 1
            logits = run()[:, -1]
    return tokens


GROUPED_SDPA = "sdpa_grouped"
"""The name under which `grouped_attention` registers its attention with transformers."""


def sdpa_grouped(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention for one query token against a masked cache, the query heads
    that share a key/value head taken as rows of one attention instead of the keys and values
    copied once per query head (`repeat_kv`, which with a mask SDPA needs): on a decode step of
    a grouped-query model the copy moves the whole cache several times over. The same numbers,
    as SDPA computes each row alone. Any other call goes to transformers' own SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if length != 1 or heads == kv_heads or attention_mask is None or dropout:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(
        rows, key, value, attn_mask=attention_mask[..., : key.shape[-2]], scale=scaling
    )
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def grouped_attention(model) -> Iterator[None]:
    """Inside the block a grouped-query model that uses SDPA attends with `sdpa_grouped`; its
    own attention is back after. Nothing for other models (or transformers < 4.53)."""
    config = model.config
    grouped = getattr(config, "num_key_value_heads", None) not in (
        None,
        getattr(config, "num_attention_heads", None),
    )
    if not (grouped and getattr(config, "_attn_implementation", None) == "sdpa"):
        yield
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        yield
        return
    AttentionInterface.register(GROUPED_SDPA, sdpa_grouped)
    AttentionMaskInterface.register(GROUPED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(GROUPED_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def _additive(visible: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive attention mask of a boolean one: 0 where visible, the dtype's lowest value
    elsewhere (as transformers builds it; not -inf, so a row that sees nothing stays finite)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, torch.finfo(dtype).min
    )


class _Replay:
    """`forward` (no arguments; it reads and writes fixed buffers) run once eagerly on a side
    stream, as torch's CUDA graph recipe warms up, then captured as a CUDA graph on the next call
    and replayed from then on: one launch per step instead of hundreds. A model whose forward
    cannot be captured runs eagerly, with a warning: a capture runs nothing, so the tokens are the
    same either way."""

    def __init__(self, forward):
        self.forward = forward
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Tensor | None = None
        self.eager = False

    def __call__(self) -> Tensor:
        if self.eager:
            return self.forward()
        if self.output is None:  # the warm-up, a real step
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.output = self.forward()
            torch.cuda.current_stream().wait_stream(side)
            return self.output
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.output = self.forward()
            except RuntimeError as e:
                warnings.warn(
                    f"the decode step could not be captured as a CUDA graph ({e}); decoding "
                    "eagerly",
                    stacklevel=2,
                )
                self.eager = True
                return self.forward()
            self.graph = graph
        self.graph.replay()
        return self.output
