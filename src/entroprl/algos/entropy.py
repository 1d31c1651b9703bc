"""Policy entropy: per-token log-prob and entropy from logits, and the batch entropy (algorithms.md
§1).

Logits of a 152k vocabulary take 0.6 MB per token in float32, so the full (B, T, V) softmax is never
materialised: rows of the flattened (B*T, V) logits are processed in chunks, upcast one chunk at a
time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from entroprl.algos.checks import (
    check_finite,
    check_nonempty,
    check_same_shape,
    deferring,
    fail_if,
)
from entroprl.errors import NonFiniteError
from entroprl.train import distributed


def row_slices(n_rows: int, chunk_rows: int) -> Iterator[slice]:
    """Consecutive slices of at most `chunk_rows` rows covering `range(n_rows)`."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    for start in range(0, n_rows, chunk_rows):
        yield slice(start, min(start + chunk_rows, n_rows))


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: half-precision inputs are upcast."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def row_chunk(x: Tensor, rows: slice) -> Tensor:
    """Rows `rows` of `x` flattened to (N, V) over its leading dimensions.

    A view when the leading dimensions merge; otherwise a copy of just these rows, so that a sliced
    batch such as `out.logits[:, :-1]` is never copied whole.
    """
    try:
        return x.view(-1, x.shape[-1])[rows]
    except RuntimeError:
        flat_index = torch.arange(rows.start, rows.stop, device=x.device)
        return x[torch.unravel_index(flat_index, x.shape[:-1])]


def upcast_rows(x: Tensor, rows: slice, dtype: torch.dtype) -> Tensor:
    """A fresh `dtype` copy of `row_chunk(x, rows)`, safe to modify in place."""
    return row_chunk(x, rows).to(dtype, copy=True)


def log_softmax_rows(
    x: Tensor, rows: slice, dtype: torch.dtype, temperature: float = 1.0
) -> Tensor:
    """log softmax over the last dim of `row_chunk(x, rows) / temperature`, in `dtype`.

    One fused kernel when the temperature is 1.
    """
    z = row_chunk(x, rows) if temperature == 1.0 else upcast_rows(x, rows, dtype).div_(temperature)
    return torch.log_softmax(z, dim=-1, dtype=dtype)


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product of two (R, V) tensors, as a batched matmul (no (R, V) temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


def blocks(batch: int, length: int, chunk_rows: int) -> Iterator[tuple[slice, slice]]:
    """(batch rows, positions) blocks of at most `chunk_rows` tokens covering a (batch, length)
    grid: whole rows of the batch when a row fits, else slices of one row. A block of a sliced
    (B, T, V) tensor such as `logits[:, :-1]` is a view, never a copy, since each row's positions
    are contiguous."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if length <= chunk_rows:
        for rows in row_slices(batch, chunk_rows // max(length, 1)):
            yield rows, slice(0, length)
        return
    for row in range(batch):
        for positions in row_slices(length, chunk_rows):
            yield slice(row, row + 1), positions


def _scaled_log_softmax(z: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """log softmax over the last dim of `z / temperature`, in `dtype` (one fused kernel at
    temperature 1)."""
    if temperature != 1.0:
        z = z.to(dtype, copy=True).div_(temperature)
    return torch.log_softmax(z, dim=-1, dtype=dtype)


def _logp_entropy(log_q: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The sampled tokens' log-probs and the entropies of one block from its log-softmax `log_q`
    (..., V): log_q[y] and -sum_v exp(log_q_v) * log_q_v."""
    logp = log_q.gather(-1, tokens[..., None]).squeeze(-1)
    flat = log_q.view(-1, log_q.shape[-1])
    return logp, -rowdot(flat.exp(), flat).view(log_q.shape[:-1])


def _logit_grad(
    log_q: Tensor,
    tokens: Tensor,
    g_logp: Tensor,
    g_ent: Tensor,
    entropy: Tensor,
    entropy_grad: bool,
) -> Tensor:
    """The gradient of one block's scaled logits z from its log-softmax `log_q` (..., V), which it
    overwrites: g_logp * (onehot(y) - p) - g_ent * p * (log p + H), with the upstream gradients
    `g_logp`, `g_ent` (..., 1) already divided by the temperature."""
    if entropy_grad:
        # -p * (g_logp + g_ent * (log p + H)), as one addcmul and one product
        coef = torch.addcmul(-(g_logp + g_ent * entropy[..., None]), log_q, -g_ent)
    else:
        coef = -g_logp
    gz = log_q.exp_().mul_(coef)
    return gz.scatter_add_(-1, tokens[..., None], g_logp)


def _keep(ctx, saved: tuple, entropy: Tensor, temperature, chunk_rows, entropy_grad) -> None:
    """What the backward of a chunked pass needs: `saved` and the entropies, and its settings; the
    entropies non-differentiable unless `entropy_grad`."""
    ctx.save_for_backward(*saved, entropy)
    ctx.temperature, ctx.chunk_rows, ctx.entropy_grad = temperature, chunk_rows, entropy_grad
    if not entropy_grad:
        ctx.mark_non_differentiable(entropy)


def _upstream(
    grad_logp: Tensor, grad_entropy: Tensor, dtype: torch.dtype, temperature: float
) -> tuple[Tensor, Tensor]:
    """The upstream gradients as (..., 1) columns in `dtype`, with the 1/temperature of
    dz/dlogits folded in."""
    return (
        grad_logp.to(dtype)[..., None] / temperature,
        grad_entropy.to(dtype)[..., None] / temperature,
    )


class _ChunkedLogpEntropy(torch.autograd.Function):
    """Chunked forward, and a backward that recomputes the log-softmax chunk by chunk.

    With z = logits / temperature, p = softmax(z), y the sampled token:
        d logp / dz = onehot(y) - p
        d H / dz    = -p * (log p + H)
    Only the logits (already alive), the tokens and the (B, T) entropies are saved, so autograd
    does not keep a float32 copy of every chunk alive until backward.
    """

    @staticmethod
    def forward(
        ctx, logits: Tensor, tokens: Tensor, temperature: float, chunk_rows: int, entropy_grad: bool
    ) -> tuple[Tensor, Tensor]:
        dtype = compute_dtype(logits)
        logp = torch.empty(tokens.shape, dtype=dtype, device=logits.device)
        entropy = torch.empty_like(logp)
        for rows, positions in blocks(*tokens.shape, chunk_rows):
            log_q = _scaled_log_softmax(logits[rows, positions], dtype, temperature)
            logp[rows, positions], entropy[rows, positions] = _logp_entropy(
                log_q, tokens[rows, positions]
            )
            del log_q  # before the next block allocates its own
        _keep(ctx, (logits, tokens), entropy, temperature, chunk_rows, entropy_grad)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp: Tensor, grad_entropy: Tensor):
        logits, tokens, entropy = ctx.saved_tensors
        dtype, temperature = entropy.dtype, ctx.temperature
        g_logp, g_ent = _upstream(grad_logp, grad_entropy, dtype, temperature)
        grad = logits.new_empty(logits.shape)
        for rows, positions in blocks(*tokens.shape, ctx.chunk_rows):
            block = rows, positions
            log_q = _scaled_log_softmax(logits[block], dtype, temperature)
            grad[block] = _logit_grad(
                log_q, tokens[block], g_logp[block], g_ent[block], entropy[block], ctx.entropy_grad
            )
            del log_q
        return grad, None, None, None, None


def logprobs_and_entropy(
    logits: Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    chunk_rows: int = 1024,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Log-prob of the sampled tokens and the token entropy, in one chunked pass (algorithms.md §1).

    With z = logits / temperature over the vocabulary:

        logp = z_y - logsumexp(z)
        H    = logsumexp(z) - sum_v softmax(z)_v * z_v

    `logits` (B, T, V) of any float dtype, `tokens` (B, T) integer ids. Returns (logp, H), each
    (B, T) in float32 (float64 for float64 logits, so the formulas can be checked tightly).

    Memory. The flattened (B*T, V) rows are processed `chunk_rows` at a time; the working memory is
    a few chunk-sized float32 buffers (`chunk_rows * V * 4` bytes each; 0.6 GB per buffer at the
    default 1024 rows and a 152k vocabulary), independent of B*T. The gradient path keeps that
    bound: the backward recomputes the softmax chunk by chunk from the saved logits instead of
    autograd saving every upcast chunk. What it cannot avoid is the gradient of the logits itself,
    a (B, T, V) tensor in the logits' dtype, as with any autograd through the logits.

    Gradient. `logp` carries gradient when the logits require it and grad mode is on (the policy
    loss). `H` is detached unless `entropy_grad=True`, the entropy bonus of algorithms.md §4, which
    must not reuse a no-grad measurement.
    """
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating (B, T, V) tensor, got {logits.dtype} {list(logits.shape)}"
        )
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"shape mismatch: tokens{list(tokens.shape)} must be logits{list(logits.shape)}[:2]"
        )
    _check_tokens(tokens, logits.shape[-1], temperature)
    logp, entropy = _ChunkedLogpEntropy.apply(
        logits, tokens.long(), float(temperature), chunk_rows, entropy_grad
    )
    return _checked(logp, entropy)


class _LinearLogpEntropy(torch.autograd.Function):
    """`_ChunkedLogpEntropy` through the output layer: each chunk's logits are made from its hidden
    states, used and freed, and made again in the backward, whose logit gradient is multiplied out
    into the gradients of the hidden states and of the weight (verl's `FusedLinearForPPOFunction`).
    No (N, V) tensor outlives its chunk, in either direction."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk_rows, entropy_grad, shape):
        # made in their final `shape` and filled through flat views: returned as views, they
        # would trip FSDP2's warning about a root module's outputs that are views
        dtype = compute_dtype(hidden, weight)
        logp = hidden.new_empty(shape, dtype=dtype)
        entropy = torch.empty_like(logp)
        flat_logp, flat_entropy = logp.view(-1), entropy.view(-1)
        for rows in row_slices(tokens.shape[0], chunk_rows):
            log_q = _scaled_log_softmax(F.linear(hidden[rows], weight, bias), dtype, temperature)
            flat_logp[rows], flat_entropy[rows] = _logp_entropy(log_q, tokens[rows])
            del log_q
        _keep(ctx, (hidden, weight, bias, tokens), entropy, temperature, chunk_rows, entropy_grad)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp: Tensor, grad_entropy: Tensor):
        hidden, weight, bias, tokens, entropy = ctx.saved_tensors
        entropy, grad_logp, grad_entropy = (
            t.reshape(-1) for t in (entropy, grad_logp, grad_entropy)
        )
        dtype, temperature = entropy.dtype, ctx.temperature
        g_logp, g_ent = _upstream(grad_logp, grad_entropy, dtype, temperature)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # summed over chunks in float32 (at least), rounded to the weight's dtype once, as the one
        # product of an unchunked backward would be
        grad_weight = weight.new_zeros(weight.shape, dtype=dtype) if need_weight else None
        grad_bias = bias.new_zeros(bias.shape, dtype=dtype) if need_bias else None
        for rows in row_slices(tokens.shape[0], ctx.chunk_rows):
            log_q = _scaled_log_softmax(F.linear(hidden[rows], weight, bias), dtype, temperature)
            gz = _logit_grad(
                log_q, tokens[rows], g_logp[rows], g_ent[rows], entropy[rows], ctx.entropy_grad
            ).to(hidden.dtype)
            del log_q
            if need_hidden:
                grad_hidden[rows] = gz @ weight
            if need_weight and gz.dtype == dtype:
                grad_weight.addmm_(gz.T, hidden[rows])
            elif need_weight:
                grad_weight += (gz.T @ hidden[rows]).to(dtype)
            if need_bias:
                grad_bias += gz.sum(0, dtype=dtype)
            del gz
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def linear_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_rows: int = 1024,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """`logprobs_and_entropy` of the logits `hidden @ weight.T + bias`, never made whole.

    `hidden` (B, T, H) the hidden states that predict `tokens` (B, T), `weight` (V, H) and `bias`
    (V,) the output layer's. Each chunk of `chunk_rows` tokens has its logits computed in the
    hidden states' dtype, as the model's own head computes them, then follows
    `logprobs_and_entropy` (same formulas, same float32 or float64 results). The backward
    recomputes each chunk's logits; gradients reach `hidden`, `weight` and `bias`.

    Memory. Besides a few chunk-sized buffers, nothing of size V per token exists, the logits'
    gradient included: against the logits path this saves a (B, T, V) tensor in the model's dtype
    for the logits and another for their gradient (2.3 GiB each for 8 x 1,024 tokens of a 152k
    vocabulary in bfloat16). It costs one more output-layer product per chunk in the backward.
    """
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a floating (B, T, H) tensor, got {hidden.dtype} {list(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, {hidden.shape[-1]}) for hidden{list(hidden.shape)}, "
            f"got {list(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be ({weight.shape[0]},), got {list(bias.shape)}")
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(
            f"shape mismatch: tokens{list(tokens.shape)} must be hidden{list(hidden.shape)}[:2]"
        )
    _check_tokens(tokens, weight.shape[0], temperature)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    logp, entropy = _LinearLogpEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        tokens.reshape(-1).long(),
        float(temperature),
        chunk_rows,
        entropy_grad,
        tokens.shape,
    )
    return _checked(logp, entropy)


def _check_tokens(tokens: Tensor, vocab: int, temperature: float) -> None:
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must hold integer ids, got {tokens.dtype}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    if tokens.numel() and deferring():
        fail_if(
            (tokens.min() < 0) | (tokens.max() >= vocab),
            ValueError(f"token ids must lie in [0, {vocab})"),
        )
    elif tokens.numel():
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}), got range [{low}, {high}]")


def _checked(logp: Tensor, entropy: Tensor) -> tuple[Tensor, Tensor]:
    """(logp, entropy), refused if any is not finite. Any NaN or inf logit makes its row's
    logsumexp or entropy non-finite: checking the (B, T) outputs catches bad logits without
    another pass over the vocabulary."""
    bad = ~(torch.isfinite(logp.detach()) & torch.isfinite(entropy.detach()))
    if deferring():
        fail_if(bad.any(), NonFiniteError("logits contain NaN or inf"))
    elif bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise NonFiniteError(f"logits contain NaN or inf (first at (b, t) = {where})")
    return logp, entropy


def batch_entropy(token_entropy: Tensor, mask: Tensor) -> dict[str, float]:
    """Batch policy entropy, in the two conventions (algorithms.md §1).

        seq_mean_token_mean = mean over non-empty responses i of  sum_t(H*m)[i] / sum_t(m)[i]
        token_mean          = sum(H*m) / sum(m)

    The first is the paper's H (each response weighs the same); the second is what verl and TRL log
    (each token weighs the same). Responses with no valid token are left out of the first. With
    torch.distributed running, both are over all ranks' responses.
    """
    check_same_shape(token_entropy=token_entropy, mask=mask)
    if token_entropy.dim() != 2:
        raise ValueError(f"token_entropy must be (B, T), got {list(token_entropy.shape)}")
    check_finite("token_entropy", token_entropy, mask)
    valid = mask.bool()
    m = mask.detach().to(torch.float64)
    h = torch.where(valid, token_entropy.detach().to(torch.float64), 0.0)
    row_sum, row_n = (h * m).sum(-1), m.sum(-1)
    nonempty = row_n > 0
    sums = torch.stack(
        [
            (row_sum[nonempty] / row_n[nonempty]).sum(),
            nonempty.sum().to(torch.float64),
            row_sum.sum(),
            row_n.sum(),
        ]
    )
    sums = distributed.all_reduce_sum(sums)
    check_nonempty(sums[1], "mask (for the batch entropy)")
    return {
        "seq_mean_token_mean": float(sums[0] / sums[1]),
        "token_mean": float(sums[2] / sums[3]),
    }
