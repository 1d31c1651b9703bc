"""Policy entropy: per-token log-prob and entropy from logits, and the batch entropy (algorithms.md
§1).

Logits of a 152k vocabulary take 0.6 MB per token in float32, so the full (B, T, V) softmax is never
materialised: rows of the flattened (B*T, V) logits are processed in chunks, upcast one chunk at a
time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
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
            logp[rows, positions] = log_q.gather(-1, tokens[rows, positions, None]).squeeze(-1)
            flat = log_q.view(-1, log_q.shape[-1])
            entropy[rows, positions] = -rowdot(flat.exp(), flat).view(log_q.shape[:-1])
            del log_q, flat  # before the next block allocates its own
        ctx.save_for_backward(logits, tokens, entropy)
        ctx.temperature, ctx.chunk_rows, ctx.entropy_grad = temperature, chunk_rows, entropy_grad
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp: Tensor, grad_entropy: Tensor):
        logits, tokens, entropy = ctx.saved_tensors
        dtype, temperature = entropy.dtype, ctx.temperature
        # The 1/temperature of dz/dlogits is folded into the per-token coefficients.
        g_logp = grad_logp.to(dtype)[..., None] / temperature
        g_ent = grad_entropy.to(dtype)[..., None] / temperature
        grad = logits.new_empty(logits.shape)
        for rows, positions in blocks(*tokens.shape, ctx.chunk_rows):
            block = rows, positions
            log_q = _scaled_log_softmax(logits[block], dtype, temperature)
            if ctx.entropy_grad:
                # -p * (g_logp + g_ent * (log p + H)), as one addcmul and one product
                offset = -(g_logp[block] + g_ent[block] * entropy[block][..., None])
                coef = torch.addcmul(offset, log_q, -g_ent[block])
            else:
                coef = -g_logp[block]
            gz = log_q.exp_().mul_(coef)
            gz.scatter_add_(-1, tokens[block][..., None], g_logp[block])
            grad[block] = gz
            del log_q, coef, gz
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
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must hold integer ids, got {tokens.dtype}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    vocab = logits.shape[-1]
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
    logp, entropy = _ChunkedLogpEntropy.apply(
        logits, tokens.long(), float(temperature), chunk_rows, entropy_grad
    )
    # Any NaN or inf logit makes its row's logsumexp or entropy non-finite: checking the (B, T)
    # outputs catches bad logits without another pass over the vocabulary.
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
