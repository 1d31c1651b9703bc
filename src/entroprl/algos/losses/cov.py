"""Clip-Cov and KL-Cov (algorithms.md §3, §4): the token selections by covariance and the two
losses on them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from entroprl.algos.checks import check_finite, check_mask, check_same_shape
from entroprl.algos.dynamics import token_covariance
from entroprl.algos.losses.aggregation import LossDenominators, aggregate_loss, zero_padding
from entroprl.algos.losses.common import (
    check_bounds,
    check_clip_range,
    check_fraction,
    check_loss_inputs,
    check_selected,
    fraction_count,
    ppo_clipped,
    token_means,
    top_valid,
)
from entroprl.algos.losses.registry import register_policy_loss
from entroprl.errors import SettingError
from entroprl.train import distributed

# --------------------------------------------------------------------------------------------------
# Covariance selection (algorithms.md §3, §4)


def top_fraction(
    scores: Tensor, response_mask: Tensor, fraction: float, *, across_ranks: bool = False
) -> Tensor:
    """The `max(floor(fraction * N), 1)` valid tokens with the largest `scores`, as a bool mask
    (B, T); N is the number of valid tokens in the scope (every rank's, in rank order, with
    `across_ranks`). Ties go to the lowest row-major index; padding is never picked. A building
    block for selections (`PolicyLossSpec.select`): KL-Cov's is this over the covariance."""
    mask = check_mask(response_mask)
    check_fraction("fraction", fraction, upper=1.0)
    return top_valid(
        scores,
        mask,
        lambda n: max(fraction_count(fraction, n, round_up=False), 1),
        across_ranks=across_ranks,
    )


def clip_cov_select(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    ratio: float = 2e-4,
    lb: float = 1.0,
    ub: float = 5.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    generator: torch.Generator | None = None,
    across_ranks: bool = False,
) -> Tensor:
    """Tokens whose Clip-Cov loss term is detached (algorithms.md §4), as a bool mask (B, T).

    Candidates: valid tokens not clipped by PPO (L2 > L1 with `ratio_t = exp(logp - old_logp)`
    unclamped, as in the reference) with `lb < cov < ub` strictly, cov of algorithms.md §3 over the
    scope. Picks `n = max(floor(ratio * N), 1)` of them uniformly at random (all if fewer), N the
    valid tokens in the scope: a prefix of `torch.randperm(#candidates, generator=generator)` over
    the candidates in row-major order. The scope is the tensors passed; with `across_ranks` and
    torch.distributed running it is every rank's tensors (in rank order), and `generator` must be
    seeded identically on all ranks.
    """
    check_same_shape(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=response_mask,
    )
    mask = check_mask(response_mask)
    check_fraction("ratio", ratio, upper=1.0)
    check_clip_range(clip_low, clip_high)
    check_bounds(lb, ub)
    check_finite("log_prob", log_prob, mask)
    check_finite("old_log_prob", old_log_prob, mask)
    check_finite("advantages", advantages, mask)
    logp, old, adv = (zero_padding(t, mask) for t in (log_prob, old_log_prob, advantages))

    cov = token_covariance(logp, adv, mask, across_ranks=across_ranks)
    clipped = ppo_clipped(logp, old, adv, clip_low, clip_high)
    candidates = mask & ~clipped & (cov > lb) & (cov < ub)

    n_valid = mask.sum()
    if across_ranks:
        n_valid = distributed.all_reduce_sum(n_valid)
    n_pick = max(fraction_count(ratio, int(n_valid), round_up=False), 1)

    flat_cand = candidates.reshape(-1).nonzero().squeeze(1)
    gathered, offset = distributed.all_gather_cat(flat_cand) if across_ranks else (flat_cand, 0)
    device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(gathered.numel(), generator=generator, device=device)
    chosen = perm[: min(n_pick, gathered.numel())].to(mask.device)
    mine = chosen[(chosen >= offset) & (chosen < offset + flat_cand.numel())] - offset
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    out[flat_cand[mine]] = True
    return out.view_as(mask)


def kl_cov_select(
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    ratio: float = 2e-3,
    across_ranks: bool = False,
) -> Tensor:
    """Tokens that get KL-Cov's penalty (algorithms.md §4), as a bool mask (B, T).

    Exactly the top `k = max(floor(ratio * N), 1)` valid tokens by cov (algorithms.md §3), N the
    valid tokens in the scope; ties go to the lowest row-major index; padding is never picked. The
    scope is the tensors passed, or every rank's (in rank order) with `across_ranks` and
    torch.distributed on.
    """
    check_same_shape(log_prob=log_prob, advantages=advantages, response_mask=response_mask)
    mask = check_mask(response_mask)
    check_fraction("ratio", ratio, upper=1.0)
    check_finite("log_prob", log_prob, mask)
    check_finite("advantages", advantages, mask)
    logp, adv = zero_padding(log_prob, mask), zero_padding(advantages, mask)
    cov = token_covariance(logp, adv, mask, across_ranks=across_ranks)
    return top_fraction(cov, mask, ratio, across_ranks=across_ranks)


@dataclass
class ClipCovSettings:
    ratio: float = 2e-4
    """Fraction of the valid tokens of the scope detached: n = max(floor(ratio * N), 1)."""
    lb: float = 1.0
    """Candidates have lb < cov < ub (absolute values: they depend on the advantage scale)."""
    ub: float = 5.0
    """Upper bound of the candidates' covariance (see lb)."""
    clip_low: float = 0.2
    """PPO clip range of the loss and of the candidate filter (the authors' runs use 1 and 1)."""
    clip_high: float = 0.2
    """Upper end of that clip range: [1 - clip_low, 1 + clip_high]."""

    def validate(self) -> None:
        check_fraction("ratio", self.ratio, upper=1.0)
        check_bounds(self.lb, self.ub)
        check_clip_range(self.clip_low, self.clip_high)


@dataclass
class KLCovSettings:
    ratio: float = 2e-3
    """Fraction of the valid tokens of the scope penalised: k = max(floor(ratio * N), 1)
    (2e-3 for 7B models, 2e-4 for 32B in the paper)."""
    coef: float = 1.0
    """Weight of |logp - old_logp| on the selected tokens; >= 0."""

    def validate(self) -> None:
        check_fraction("ratio", self.ratio, upper=1.0)
        if not (math.isfinite(self.coef) and self.coef >= 0):
            raise SettingError("coef", f"must be a finite number >= 0, got {self.coef}")


def _clip_cov_selection(
    log_prob, old_log_prob, advantages, response_mask, s, *, generator, across_ranks
) -> Tensor:
    """Clip-Cov's `Selection`: `clip_cov_select` with the loss's settings."""
    return clip_cov_select(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        ratio=s.ratio,
        lb=s.lb,
        ub=s.ub,
        clip_low=s.clip_low,
        clip_high=s.clip_high,
        generator=generator,
        across_ranks=across_ranks,
    )


def _kl_cov_selection(
    log_prob, old_log_prob, advantages, response_mask, s, *, generator, across_ranks
) -> Tensor:
    """KL-Cov's `Selection`: `kl_cov_select` (deterministic, no generator)."""
    return kl_cov_select(
        log_prob, advantages, response_mask, ratio=s.ratio, across_ranks=across_ranks
    )


@register_policy_loss("clip_cov", settings=ClipCovSettings, select=_clip_cov_selection)
def clip_cov_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    ratio: float = 2e-4,
    lb: float = 1.0,
    ub: float = 5.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_agg_mode: str = "token-mean",
    generator: torch.Generator | None = None,
    selected: Tensor | None = None,
    denominators: LossDenominators | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clip-Cov policy loss of Cui et al. (algorithms.md §4).

        r = exp(logp - old_logp)   (not clamped, as in the reference)
        L = 0 on the selected tokens (no gradient; they still count in the denominators),
            max(-A*r, -A*clamp(r, 1 - clip_low, 1 + clip_high)) elsewhere;   no dual clip
        times `weights` per token when given

    `selected` is the mask from `clip_cov_select` over the trainer's scope (the whole mini-batch);
    None selects over the tensors passed with `ratio`, `lb`, `ub`, `generator` (the reference
    per-micro-batch behaviour). Metrics, over the tensors passed: pg_loss, pg_clipfrac (L2 > L1),
    pg_clipfrac_lower (0, no dual clip), ppo_kl, clip_cov_frac (fraction of valid tokens detached).
    """
    log_prob, old_log_prob, advantages, mask = check_loss_inputs(
        log_prob, old_log_prob, advantages, response_mask, loss_agg_mode
    )
    check_clip_range(clip_low, clip_high)
    if selected is None:
        selected = clip_cov_select(
            log_prob,
            old_log_prob,
            advantages,
            mask,
            ratio=ratio,
            lb=lb,
            ub=ub,
            clip_low=clip_low,
            clip_high=clip_high,
            generator=generator,
        )
    selected = check_selected(selected, mask)
    log_ratio = log_prob - old_log_prob
    r = torch.exp(log_ratio)
    l1 = -advantages * r
    l2 = -advantages * torch.clamp(r, 1 - clip_low, 1 + clip_high)
    # where (not a product with 0) keeps a selected token's term 0 even if r overflowed to inf.
    loss_mat = torch.where(selected, torch.zeros_like(l1), torch.maximum(l1, l2))
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode, denominators=denominators, weights=weights)
    metrics = token_means(
        mask,
        pg_clipfrac=(l2 > l1).to(torch.float64),
        ppo_kl=-log_ratio,
        clip_cov_frac=selected.to(torch.float64),
    )
    return loss, {
        "pg_loss": loss.item(),
        "pg_clipfrac": metrics["pg_clipfrac"],
        "pg_clipfrac_lower": 0.0,
        "ppo_kl": metrics["ppo_kl"],
        "clip_cov_frac": metrics["clip_cov_frac"],
    }


@register_policy_loss(
    "kl_cov",
    settings=KLCovSettings,
    select=_kl_cov_selection,
    summed_metrics=("kl_cov_selected",),
    on_policy_note=(
        "KL-Cov with one mini-batch and one epoch is plain policy gradient: on the first update "
        "logp == old_logp, so |logp - old_logp| and its gradient are 0 (algorithms.md §4.3). "
        "Use several mini-batches or epochs."
    ),
)
def kl_cov_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    ratio: float = 2e-3,
    coef: float = 1.0,
    loss_agg_mode: str = "token-mean",
    selected: Tensor | None = None,
    denominators: LossDenominators | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """KL-Cov policy loss of Cui et al. (algorithms.md §4).

        r = exp(logp - old_logp)   (no clipping)
        L = -A*r + coef*|logp - old_logp| on the selected tokens,   -A*r elsewhere
        times `weights` per token when given, the penalty included (as verl)

    `selected` is the mask from `kl_cov_select` over the trainer's scope; None selects the top
    `max(floor(ratio*N), 1)` tokens by cov over the tensors passed (the reference behaviour).
    The penalty and its gradient vanish while logp == old_logp (the first mini-batch of a rollout
    step). Metrics: pg_loss, pg_clipfrac and pg_clipfrac_lower (0, no clipping), ppo_kl;
    kl_cov_abs_diff, mean |logp - old_logp| over all valid tokens (not only the selected ones, as in
    the reference); kl_cov_selected, the number of selected tokens in the tensors passed.
    """
    log_prob, old_log_prob, advantages, mask = check_loss_inputs(
        log_prob, old_log_prob, advantages, response_mask, loss_agg_mode
    )
    if not (math.isfinite(coef) and coef >= 0):
        raise SettingError("coef", f"must be a finite number >= 0, got {coef}")
    if selected is None:
        selected = kl_cov_select(log_prob, advantages, mask, ratio=ratio)
    selected = check_selected(selected, mask)
    log_ratio = log_prob - old_log_prob
    pg = -advantages * torch.exp(log_ratio)
    loss_mat = torch.where(selected, pg + coef * log_ratio.abs(), pg)
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode, denominators=denominators, weights=weights)
    metrics = token_means(mask, ppo_kl=-log_ratio, kl_cov_abs_diff=log_ratio.abs())
    return loss, {
        "pg_loss": loss.item(),
        "pg_clipfrac": 0.0,
        "pg_clipfrac_lower": 0.0,
        **metrics,
        "kl_cov_selected": float(selected.sum().item()),
    }
