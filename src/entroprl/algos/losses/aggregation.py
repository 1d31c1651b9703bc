"""Loss aggregation over a whole mini-batch (algorithms.md §5): the denominators and the modes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from entroprl.algos.checks import check_choice, check_finite, check_mask, check_same_shape
from entroprl.train import distributed

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def zero_padding(values: Tensor, mask: Tensor) -> Tensor:
    """`values` with padding set to 0: NaN or inf there then reaches neither a sum nor a gradient
    (a masked product would give 0 * NaN = NaN in the backward pass)."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


@dataclass(frozen=True)
class LossDenominators:
    """Denominators of the loss aggregation over one whole optimizer mini-batch (algorithms.md §5).

    tokens: number of valid tokens (token-mean).
    sequences: number of non-empty responses (the seq-mean-* modes).
    norm_constant: C of seq-mean-token-sum-norm; None means the padded length T of the mask given
        to `aggregate_loss`.
    """

    tokens: int
    sequences: int
    norm_constant: float | None = None

    def __post_init__(self) -> None:
        if self.tokens <= 0 or self.sequences <= 0:
            raise ValueError(
                f"LossDenominators needs tokens > 0 and sequences > 0, got tokens={self.tokens}, "
                f"sequences={self.sequences} (is the mini-batch mask empty?)"
            )
        if self.norm_constant is not None and not (
            math.isfinite(self.norm_constant) and self.norm_constant > 0
        ):
            raise ValueError(f"norm_constant must be a finite number > 0, got {self.norm_constant}")


def loss_denominators(
    response_mask: Tensor,
    *,
    norm_constant: float | None = None,
    across_ranks: bool = True,
    allow_empty: bool = False,
) -> LossDenominators | None:
    """Denominators of algorithms.md §5 for the whole mini-batch `response_mask` (B, T).

        tokens = sum(m),   sequences = #{i : sum_t m[i,t] > 0},   norm_constant = C or T

    With `across_ranks` and torch.distributed running, tokens and sequences are summed over ranks.
    A `norm_constant` of None is resolved to this mask's padded length T, so that micro-batches
    trimmed to shorter padding keep the mini-batch's constant (the trainer should pass the
    configured maximum response length instead, which makes the loss independent of padding).
    A mask with no token (on any rank) raises, or gives None with `allow_empty`: a trainer skips
    such a mini-batch, and since the count is global every rank skips it together.
    """
    mask = check_mask(response_mask)
    counts = torch.stack([mask.sum(), mask.any(dim=-1).sum()])
    if across_ranks:
        counts = distributed.all_reduce_sum(counts)
    tokens, sequences = (int(c) for c in counts.tolist())
    if tokens == 0 and allow_empty:
        return None
    if tokens == 0:
        raise ValueError(
            "response_mask selects no token over the whole mini-batch: nothing to average"
        )
    constant = float(mask.shape[-1]) if norm_constant is None else float(norm_constant)
    return LossDenominators(tokens=tokens, sequences=sequences, norm_constant=constant)


def aggregate_loss(
    loss_mat: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str,
    *,
    denominators: LossDenominators | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Aggregate a per-token loss `l` (B, T) over the mask `m` into a scalar (algorithms.md §5
    table), `l` first multiplied by `weights` (B, T) when given (the rollout importance weights,
    as verl's ``pg_losses * rollout_is_weights``; the denominators stay token and sequence counts):

        token-mean               sum(l*m) / tokens
        seq-mean-token-mean      sum_i [sum_t(l*m) / sum_t(m)] / sequences   (empty rows add 0)
        seq-mean-token-sum       sum_i sum_t(l*m) / sequences
        seq-mean-token-sum-norm  sum(l*m) / C

    `denominators` (from `loss_denominators` over the whole mini-batch) makes the sum over
    micro-batches equal the mini-batch value; None computes them from this mask alone (the reference
    per-micro-batch behaviour), which needs a non-empty mask. Padding values of `loss_mat` are
    ignored, even NaN.
    """
    check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    check_same_shape(loss_mat=loss_mat, response_mask=response_mask)
    mask = check_mask(response_mask)
    if denominators is None:
        denominators = loss_denominators(mask, across_ranks=False)
    if weights is not None:
        check_same_shape(loss_mat=loss_mat, weights=weights)
        check_finite("weights", weights, mask)
        loss_mat = loss_mat * zero_padding(weights, mask)
    masked = torch.where(
        mask, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device)
    )
    if loss_agg_mode == "token-mean":
        return masked.sum() / denominators.tokens
    if loss_agg_mode == "seq-mean-token-mean":
        row_tokens = mask.sum(dim=-1).clamp(min=1).to(loss_mat.dtype)
        return (masked.sum(dim=-1) / row_tokens).sum() / denominators.sequences
    if loss_agg_mode == "seq-mean-token-sum":
        return masked.sum() / denominators.sequences
    constant = denominators.norm_constant
    return masked.sum() / (float(mask.shape[-1]) if constant is None else constant)
