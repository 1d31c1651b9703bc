"""The policy's forwards over rollouts: log-probs of the response tokens and their entropies."""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from entroprl.algos.entropy import linear_logprobs_and_entropy, logprobs_and_entropy
from entroprl.errors import ConfigError
from entroprl.rollout.sampler import cache_keyword, position_ids
from entroprl.train import micro_batches


def forward_log_probs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    entropy_grad: bool = False,
    shared_prefix: bool = False,
    fused_head: bool = False,
    columns: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probs of the response tokens and their entropies, from one forward pass (two with
    `shared_prefix`: `shared_prefix_forward`).

    Only the last R + 1 positions' logits are computed (`logits_to_keep`): the prompt's logits are
    never needed. `columns` (`response_columns` of the rows' lengths, which the caller reads): only
    the first `columns` response columns hold a token in any row, the rest being right padding
    in every row, so only those are computed; the others' log-probs and entropies are 0, and a
    causal model's results at the computed positions do not depend on them. With `fused_head` (a
    model given `fuse_head`) no logits are returned at all: the model's forward computes the
    log-probs and entropies from its hidden states in chunks.
    """
    if columns is not None and columns < response_len:
        cut = input_ids.shape[1] - response_len + columns
        kept = forward_log_probs(
            model,
            input_ids[:, :cut],
            attention_mask[:, :cut],
            columns,
            temperature=temperature,
            entropy_grad=entropy_grad,
            shared_prefix=shared_prefix,
            fused_head=fused_head,
        )
        return tuple(torch.nn.functional.pad(t, (0, response_len - columns)) for t in kept)
    tokens = input_ids[:, -response_len:]
    if fused_head:
        head = HeadRequest(tokens=tokens, temperature=temperature, entropy_grad=entropy_grad)
        if shared_prefix:
            return shared_prefix_forward(model, input_ids, attention_mask, response_len, head)
        return model(**_inputs(input_ids, attention_mask), fused_head=head)
    if shared_prefix:
        logits = shared_prefix_forward(model, input_ids, attention_mask, response_len)
    else:
        inputs = _inputs(input_ids, attention_mask)
        logits = model(**inputs, logits_to_keep=response_len + 1).logits[:, :-1]
    return logprobs_and_entropy(logits, tokens, temperature=temperature, entropy_grad=entropy_grad)


def response_columns(lengths: list[int], response_len: int) -> int:
    """How many of the `response_len` response columns a forward over rows of response `lengths`
    computes: their longest (at least 1). The responses are right-padded, so the columns after it
    are padding in every row."""
    return min(max(1, *lengths), response_len)


def _inputs(input_ids: Tensor, attention_mask: Tensor) -> dict:
    """A full forward's arguments: left padding's positions, no cache kept."""
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids(attention_mask),
        "use_cache": False,
    }


@torch.no_grad()
def batched_log_probs(
    model,
    batch,
    budget: micro_batches.Budget,
    temperature: float,
    *,
    shared_prefix: bool = False,
    fused_head: bool = False,
) -> tuple[Tensor, Tensor]:
    """`forward_log_probs` over a whole batch without gradient, in micro-batches within `budget`
    (`micro_batches.plan`), each computed
    up to its longest response (the lengths read in one transfer). Without `shared_prefix` the
    rows run longest response first, so that each micro-batch holds rows of similar lengths; with
    it they keep their order, in which the rows that share a prompt are together. The results are
    in the batch's order."""
    R = batch.response_mask.shape[1]
    ids, masks = batch.input_ids, batch.attention_mask
    lengths = masks[:, -R:].sum(dim=1).tolist()
    groups = micro_batches.plan(lengths, ids.shape[1] - R, budget, sort=not shared_prefix)
    parts = []
    for group in groups:
        rows = torch.tensor(group, device=ids.device)
        parts.append(
            forward_log_probs(
                model,
                ids[rows],
                masks[rows],
                R,
                temperature=temperature,
                shared_prefix=shared_prefix,
                fused_head=fused_head,
                columns=response_columns([lengths[i] for i in group], R),
            )
        )
    log_prob, entropy = (torch.cat([p[i] for p in parts]) for i in (0, 1))
    order = [i for group in groups for i in group]
    if order == list(range(len(lengths))):
        return log_prob, entropy
    back = torch.tensor(order, device=ids.device).argsort()  # the inverse permutation
    return log_prob[back], entropy[back]


def shared_prefix_forward(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    head: HeadRequest | None = None,
):
    """The logits (B, R, V) that predict the response tokens (with `head`: the fused head's
    log-probs and entropies of them), each distinct prompt of the batch computed once ("Prefix
    Grouper", arXiv 2506.05433): a forward over the distinct prompts keeps their keys and values,
    which are copied to the rows that share them, and a second forward runs the responses against
    them. Gradients reach the prompt's computation through the copied keys and values (summed over
    its rows), so logits and gradients are those of the full forward, to float rounding. Rows share
    a prompt when their prompt columns (ids and mask) are equal."""
    P = input_ids.shape[1] - response_len
    prompts = torch.cat([input_ids[:, :P], attention_mask[:, :P]], dim=-1)
    distinct, inverse = torch.unique(prompts, dim=0, return_inverse=True)
    mask = distinct[:, P:]
    key = cache_keyword(model)
    # the prompts' last position predicts the first response token: its logits, or its hidden
    # state for the fused head
    last = {"logits_to_keep": 1} if head is None else {"fused_head": HeadRequest()}
    prefix = model(
        input_ids=distinct[:, :P],
        attention_mask=mask,
        position_ids=position_ids(mask),
        use_cache=True,
        **last,
    )
    cache = getattr(prefix, key)
    cache.batch_select_indices(inverse)
    responses = {
        "input_ids": input_ids[:, P:],
        "attention_mask": attention_mask,
        "position_ids": position_ids(attention_mask)[:, P:],
        "use_cache": True,
        key: cache,
    }
    if head is not None:
        prefix_hidden = prefix.last_hidden_state[inverse, -1:]
        return model(**responses, fused_head=replace(head, prefix=prefix_hidden))
    logits = model(**responses).logits
    return torch.cat([prefix.logits[inverse], logits[:, :-1]], dim=1)


# -- the fused head ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadRequest:
    """`model(..., fused_head=HeadRequest(...))` of a model given `fuse_head`: what its forward
    returns instead of logits."""

    tokens: Tensor | None = None
    """(B, R) the response tokens, predicted by the last R + 1 positions but one: the forward
    returns their (log-probs, entropies). None: the decoder's output (hidden states and cache)."""
    temperature: float = 1.0
    entropy_grad: bool = False
    prefix: Tensor | None = None
    """(B, 1, H) the hidden state that predicts the first response token, from an earlier forward
    over the prompts (`shared_prefix_forward`); the input is then the responses alone."""


LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2 and 3: cap * tanh(logits / cap)
    "logit_scale": 1.0,  # Cohere: logits * logit_scale
    "logits_scaling": 1.0,  # Granite: logits / logits_scaling
    "dim_model_base": None,  # MiniCPM: hidden states scaled before the head
}
"""Model config fields whose value, other than the one given, changes the logits after (or just
before) the output layer: the fused head, which multiplies the decoder's hidden states by the
output layer's weights itself, would compute other log-probs."""


def fuse_head(model) -> None:
    """Give `model` (a Hugging Face causal LM) a forward that, called with `fused_head=HeadRequest`,
    runs the decoder and computes the log-probs and entropies from its hidden states through the
    output layer in chunks (`linear_logprobs_and_entropy`): no (B, R, V) logits, nor their
    gradient. Any other call runs the model's own forward.

    The forward is replaced on the instance, as verl's `use_fused_kernels` replaces the class's:
    DistributedDataParallel, FSDP, peft and `precision.ComputeCopy` all call it as the model's
    forward, so the output layer's weights are used inside the forward that gathers (FSDP) or hooks
    them, and copies of the model (`copy.deepcopy`) keep it. Refused with a `ConfigError` naming
    model.fused_head when the model transforms its logits (`LOGIT_TRANSFORMS`) or when, on a few
    tokens, the fused head's results are not those of the model's own logits."""
    config = getattr(model, "config", None)
    for field, plain in LOGIT_TRANSFORMS.items():
        value = getattr(config, field, plain)
        if value != plain:
            raise ConfigError(
                f"model.fused_head: this model's logits are not its output layer's product "
                f"({type(config).__name__}.{field}={value}): set model.fused_head=false"
            )
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or model.base_model is model:
        raise ConfigError(
            f"model.fused_head: {type(model).__name__} has no decoder under a linear output "
            f"layer (output layer: {type(head).__name__}): set model.fused_head=false"
        )

    @functools.wraps(type(model).forward)  # its signature, which the sampler and generate read
    def forward(self, *args, fused_head: HeadRequest | None = None, **kwargs):
        return _fused_forward(self, *args, fused_head=fused_head, **kwargs)

    model.forward = types.MethodType(forward, model)
    _check_fused(model)


def _fused_forward(model, *args, fused_head: HeadRequest | None = None, **kwargs):
    if fused_head is None:
        return type(model).forward(model, *args, **kwargs)
    # the causal LM's own arguments (peft passes its Nones), which its decoder does not take
    drop = ("labels", "logits_to_keep", "return_dict")
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in drop}
    out = model.base_model(*args, **kwargs)
    if fused_head.tokens is None:
        return out
    hidden = out.last_hidden_state
    if fused_head.prefix is None:
        hidden = hidden[:, -fused_head.tokens.shape[1] - 1 : -1]
    else:
        hidden = torch.cat([fused_head.prefix.to(hidden.dtype), hidden[:, :-1]], dim=1)
    head = model.get_output_embeddings()
    return linear_logprobs_and_entropy(
        hidden,
        head.weight,
        fused_head.tokens,
        bias=head.bias,
        temperature=fused_head.temperature,
        entropy_grad=fused_head.entropy_grad,
    )


@torch.no_grad()
def _check_fused(model) -> None:
    """Refuse `model`'s fused head unless it gives the log-probs and entropies of the model's own
    logits on a few tokens (to the float rounding of its dtype), both in eval mode (a dropout would
    draw differently in each)."""
    weight = model.get_output_embeddings().weight
    ids = torch.arange(6, device=weight.device).remainder(weight.shape[0])[None]
    training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        want = logprobs_and_entropy(logits, ids[:, 1:])
        got = model(input_ids=ids, use_cache=False, fused_head=HeadRequest(tokens=ids[:, 1:]))
    finally:
        model.train(training)
    tolerance = 1e-3 if weight.dtype in (torch.float32, torch.float64) else 5e-2
    error = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
    if not error <= tolerance:
        raise ConfigError(
            f"model.fused_head: on {ids.shape[1]} tokens, the fused head's log-probs or "
            f"entropies differ from those of {type(model).__name__}'s own logits by {error:.3g} "
            f"(tolerance {tolerance}): its logits are not its output layer's product with its "
            "hidden states; set model.fused_head=false"
        )
