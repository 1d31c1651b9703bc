"""Advantage estimators, sampling filters and advantage shaping.

algorithms.md §6 (advantages and sampling), §7 (perplexity and position shaping) and §8
(low-probability tokens).

Conventions: `rewards` is a (B,) float tensor, one reward per response; `group_ids` a (B,) integer
tensor, equal for the responses of one prompt (groups need not be contiguous nor of equal size);
token-level tensors are (B, T) with a 0/1 `response_mask`. Statistics are computed in float64 and
results returned in the dtype of the input they scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from entroprl.algos.checks import (
    check_choice,
    check_finite,
    check_mask,
    check_nonempty,
    check_same_shape,
)
from entroprl.algos.losses import NoSettings
from entroprl.errors import SettingError
from entroprl.train import distributed

# The std floor below which PPL shaping's group std is replaced by 1 (algorithms.md §7).
_PPL_MIN_STD = 1e-6


def _check_rewards(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {list(rewards.shape)}")
    check_same_shape(rewards=rewards, group_ids=group_ids)
    if rewards.numel() == 0:
        raise ValueError("rewards is empty: no response to compute advantages for")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor, got {rewards.dtype}")
    _check_group_ids(group_ids)
    check_finite("rewards", rewards)


def _check_group_ids(group_ids: Tensor) -> None:
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")


def _groups(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Dense group index of every response (0..num_groups-1) and the size of every group."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return inverse, counts


def _group_sum(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(
        0, inverse, values
    )


def _group_baseline(r: Tensor, inverse: Tensor, counts: Tensor) -> Tensor:
    """Per-response group mean, 0 for a group of one (no other sample estimates its baseline)."""
    n = counts.to(r.dtype)
    mean = _group_sum(r, inverse, len(counts)) / n
    return mean.masked_fill(counts == 1, 0.0)[inverse]


def _group_std(r: Tensor, mean: Tensor, inverse: Tensor, counts: Tensor) -> Tensor:
    """Per-response unbiased group std around the per-response group `mean`; 1 for a group of one
    (verl's convention)."""
    dev2 = _group_sum((r - mean) ** 2, inverse, len(counts))
    std = (dev2 / (counts - 1).clamp(min=1).to(r.dtype)).sqrt().masked_fill(counts == 1, 1.0)
    return std[inverse]


def grpo_advantages(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-6) -> Tensor:
    """GRPO advantages (algorithms.md §6): per group, `A = (r - mean) / (std + eps)`, std unbiased.

    A group of one gets mean 0 and std 1, so its advantage is `r / (1 + eps)` (verl's convention).
    Returns (B,).
    """
    _check_rewards(rewards, group_ids)
    inverse, counts = _groups(group_ids)
    r = rewards.detach().to(torch.float64)
    mean = _group_baseline(r, inverse, counts)
    return ((r - mean) / (_group_std(r, mean, inverse, counts) + eps)).to(rewards.dtype)


def dr_grpo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr. GRPO advantages (algorithms.md §6): `A = r - mean` per group, no std.

    A group of one has mean 0 as in GRPO, so its advantage is `r`. Returns (B,).
    """
    _check_rewards(rewards, group_ids)
    inverse, counts = _groups(group_ids)
    r = rewards.detach().to(torch.float64)
    return (r - _group_baseline(r, inverse, counts)).to(rewards.dtype)


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """RLOO advantages (algorithms.md §6): `A_i = r_i - mean_{j != i} r_j` over the other G-1 of the
    group.

    A group of one has no other response to form a baseline and gets 0. Returns (B,).
    """
    _check_rewards(rewards, group_ids)
    inverse, counts = _groups(group_ids)
    r = rewards.detach().to(torch.float64)
    total = _group_sum(r, inverse, len(counts))[inverse]
    n = counts[inverse].to(r.dtype)
    others = (total - r) / (n - 1).clamp(min=1)
    return torch.where(n > 1, r - others, 0.0).to(rewards.dtype)


def reinforce_pp_baseline_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    response_mask: Tensor | None = None,
    *,
    eps: float = 1e-8,
    across_ranks: bool = False,
) -> Tensor:
    """REINFORCE++ with baseline (algorithms.md §6): subtract the group mean, then whiten over the
    batch.

        s_i = r_i - mean_group(i)       (mean 0 for a group of one, as in GRPO)
        A   = (s - mean(s)) / sqrt(var(s) + eps),   var unbiased

    Without `response_mask` the whitening is over the B responses and the result is (B,). With it,
    as verl's `masked_whiten`, `s_i` is copied to each valid token and mean and variance are
    token-weighted over the valid tokens; the result is (B, T), 0 at padding. Rows whose mask is
    all 0 (groups filtered out by dynamic sampling) take no part in the whitening, as in verl,
    where they have left the batch before advantages are computed. With `across_ranks` and
    torch.distributed running, the mean and variance are over every rank's valid tokens, so the
    advantages do not depend on how the batch is split over ranks (group means need no collective:
    a group never spans ranks). With a single element to whiten over, the variance is taken as 0
    (instead of 0/0) and the advantage is 0.
    """
    _check_rewards(rewards, group_ids)
    inverse, counts = _groups(group_ids)
    r = rewards.detach().to(torch.float64)
    scores = r - _group_baseline(r, inverse, counts)
    if response_mask is None:
        weights = torch.ones_like(scores)
    else:
        valid = check_mask(response_mask)
        if valid.shape[0] != rewards.shape[0]:
            raise ValueError(
                f"response_mask has {valid.shape[0]} rows but rewards has {rewards.shape[0]}"
            )
        weights = valid.to(torch.float64)
        scores = scores[:, None] * weights

    def total(x: Tensor) -> Tensor:
        x = x.sum()
        return distributed.all_reduce_sum(x) if across_ranks else x

    n = check_nonempty(total(weights), "response_mask (over the whitening scope)")
    mean = total(scores * weights) / n
    var = total(((scores - mean) * weights) ** 2) / max(n - 1, 1)
    return ((scores - mean) * torch.rsqrt(var + eps) * weights).to(rewards.dtype)


@dataclass
class QAESettings:
    quantile: float = 0.4
    """K: the group baseline is the K-quantile of the group's rewards (the authors' recipe 0.4)."""
    norm_by_std: bool = True
    """Divide by the group std as GRPO (the authors' DAPO recipe); False: r - baseline."""

    def validate(self) -> None:
        if not (math.isfinite(self.quantile) and 0 < self.quantile < 1):
            raise SettingError("quantile", f"must be in (0, 1), got {self.quantile}")


def qae_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    quantile: float = 0.4,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Quantile advantage estimation of Wu et al. (algorithms.md §6.8): GRPO with the group's
    K-quantile as its baseline.

        b_g = Q_K(r_g)   (linear interpolation between order statistics, torch.quantile's)
        A_i = (r_i - b_g) / (std_g + eps)   or   r_i - b_g   without norm_by_std

    std_g is GRPO's (unbiased, around the group mean). A group of one has baseline 0 and std 1, as
    in GRPO. With 0/1 rewards and K = 0.4 in a group of 8, b_g is 0 while at most 4 responses
    are right (only successes get a signal), 0.8 with 5, and 1 from 6 on (only failures get one).
    Returns (B,).
    """
    QAESettings(quantile, norm_by_std).validate()
    _check_rewards(rewards, group_ids)
    inverse, counts = _groups(group_ids)
    r = rewards.detach().to(torch.float64)
    padded = _pad_groups(r, inverse, counts)
    q = torch.nanquantile(padded, quantile, dim=1, interpolation="linear")
    baseline = q.masked_fill(counts == 1, 0.0)[inverse]
    advantages = r - baseline
    if norm_by_std:
        std = _group_std(r, _group_baseline(r, inverse, counts), inverse, counts)
        advantages = advantages / (std + eps)
    return advantages.to(rewards.dtype)


@dataclass
class PassKSettings:
    k: int = 4
    """Responses per pass@k draw; at most the group size."""

    def validate(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise SettingError("k", f"must be an integer >= 1, got {self.k!r}")


def _choose_ratio(top: Tensor, bottom: Tensor, k: int) -> Tensor:
    """C(top, k) / C(bottom, k) for integer tensors `top <= bottom`, `k <= bottom`, as the product
    prod_{i<k} (top - i) / (bottom - i): 0 when top < k, 1 when k = 0."""
    i = torch.arange(k, dtype=torch.float64, device=top.device)
    return ((top[:, None] - i) / (bottom[:, None] - i)).prod(dim=1)


def passk_advantages(rewards: Tensor, group_ids: Tensor, *, k: int = 4, eps: float = 1e-6):
    """Pass@k training's analytical advantages of Chen et al. (algorithms.md §6.9).

    For a group of G responses with c correct (0/1 rewards):

        rho   = 1 - C(G - c, k) / C(G, k)                 the group's unbiased pass@k
        sigma = sqrt(rho * (1 - rho))
        A_pos = (1 - rho) / (sigma + eps)
        A_neg = (1 - rho - C(G - c - 1, k - 1) / C(G - 1, k - 1)) / (sigma + eps)

    the expected GRPO advantage of the response over the C(G, k) draws of k of the group (a draw
    scores its best response; a response takes the normalised scores of the draws it is in).
    k = 1 is GRPO with the population std. All-equal groups get 0. Rewards must be 0 or 1 and
    every group at least k responses; raises ValueError naming them otherwise. Returns (B,).
    """
    PassKSettings(k).validate()
    _check_rewards(rewards, group_ids)
    r = rewards.detach().to(torch.float64)
    if bool(((r != 0) & (r != 1)).any()):
        raise ValueError(
            "rewards must be 0 or 1 for pass@k advantages (a response is right or wrong), got "
            f"{sorted(set(r[(r != 0) & (r != 1)].tolist()))[:5]}"
        )
    inverse, counts = _groups(group_ids)
    if bool((counts < k).any()):
        raise ValueError(
            f"k={k} exceeds the size of a group ({int(counts.min())} responses): pass@k needs "
            "k <= rollout.n"
        )
    size = counts.to(torch.float64)
    wrong = size - _group_sum(r, inverse, len(counts))
    rho = 1 - _choose_ratio(wrong, size, k)
    sigma = (rho * (1 - rho)).sqrt()
    positive = (1 - rho) / (sigma + eps)
    negative = (1 - rho - _choose_ratio(wrong - 1, size - 1, k - 1)) / (sigma + eps)
    return torch.where(r == 1, positive[inverse], negative[inverse]).to(rewards.dtype)


TokenEstimator = Callable[..., Tensor]
"""``fn(rewards, group_ids, response_mask, *, across_ranks, **settings) -> (B, T)``: token-level
advantages, 0 at padding; the one signature `compute_advantages` calls."""


@dataclass(frozen=True)
class AdvantageEstimatorSpec:
    """A registered advantage estimator: the token-level function and its settings dataclass
    (each field a keyword argument of the function; configured as
    ``algorithm.advantage_settings.<name>.<field>``, validated by its `validate()`)."""

    name: str
    fn: TokenEstimator
    settings: type = NoSettings


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimatorSpec] = {}


def _copied_to_tokens(estimator: Callable[..., Tensor]) -> TokenEstimator:
    """A response-level estimator as a token-level one: its value on every valid token. Group
    statistics need no collective (a group never spans ranks), so `across_ranks` changes nothing."""

    def token_level(rewards, group_ids, response_mask, *, across_ranks=False, **settings):
        values = estimator(rewards, group_ids, **settings)
        return values[:, None] * response_mask.to(rewards.dtype)

    token_level.__name__ = estimator.__name__
    token_level.__doc__ = estimator.__doc__
    return token_level


def register_advantage_estimator(
    name: str, *, settings: type = NoSettings, per_response: bool = True
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator registering an advantage estimator under `name`; a name already taken raises.

    With `per_response` the function is ``fn(rewards, group_ids, **settings) -> (B,)``, one value
    per response, copied to every valid token (group statistics need no collective: a group never
    spans ranks). Otherwise it is a `TokenEstimator`, given the mask of the responses that enter
    the loss and `across_ranks` for batch statistics.
    """

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS[name].fn is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        token_level = _copied_to_tokens(fn) if per_response else fn
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimatorSpec(name, token_level, settings)
        return fn

    return register


register_advantage_estimator("grpo")(grpo_advantages)
register_advantage_estimator("dr_grpo")(dr_grpo_advantages)
register_advantage_estimator("rloo")(rloo_advantages)
register_advantage_estimator("reinforce_pp_baseline", per_response=False)(
    reinforce_pp_baseline_advantages
)
register_advantage_estimator("qae", settings=QAESettings)(qae_advantages)
register_advantage_estimator("passk", settings=PassKSettings)(passk_advantages)


def get_advantage_estimator(name: str) -> AdvantageEstimatorSpec:
    """The estimator registered as `name`; an unknown name raises, listing the known ones."""
    check_choice("advantage estimator", name, ADVANTAGE_ESTIMATORS)
    return ADVANTAGE_ESTIMATORS[name]


def compute_advantages(
    name: str,
    rewards: Tensor,
    group_ids: Tensor,
    response_mask: Tensor,
    *,
    across_ranks: bool = False,
    settings: Any = None,
) -> Tensor:
    """Token-level (B, T) advantages from the estimator `name` of `ADVANTAGE_ESTIMATORS`
    (algorithms.md §6), with its `settings` (None: their defaults).

    Response-level advantages are copied to every valid token; padding gets 0. Pass the mask of
    the responses that enter the loss (filtered groups' rows all 0): batch statistics such as
    REINFORCE++'s whitening are over those only, and with `across_ranks` over every rank's.
    """
    spec = get_advantage_estimator(name)
    settings = spec.settings() if settings is None else settings
    settings.validate()
    _check_rewards(rewards, group_ids)
    valid = check_mask(response_mask)
    if valid.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"response_mask has {valid.shape[0]} rows but rewards has {rewards.shape[0]}"
        )
    return spec.fn(rewards, group_ids, valid, across_ranks=across_ranks, **asdict(settings))


def dynamic_sampling_mask(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """DAPO dynamic sampling filter (algorithms.md §6): True for responses whose group's rewards
    differ.

    Groups whose rewards are all equal carry no GRPO signal and are dropped; a group of one is
    all-equal and dropped too. Returns a (B,) bool tensor.
    """
    _check_rewards(rewards, group_ids)
    inverse, counts = _groups(group_ids)
    r = rewards.detach()
    empty = torch.zeros(len(counts), dtype=r.dtype, device=r.device)
    hi = empty.scatter_reduce(0, inverse, r, "amax", include_self=False)
    lo = empty.scatter_reduce(0, inverse, r, "amin", include_self=False)
    return (hi != lo)[inverse]


def overlong_penalty(
    lengths: Tensor, *, max_length: int, buffer: int, factor: float = 1.0
) -> Tensor:
    """DAPO soft overlong punishment (algorithms.md §6), the term to add to each response's reward:

        min(-(len - (Lmax - Lbuf)) / Lbuf * factor, 0)

    0 up to `Lmax - Lbuf` tokens, falling linearly to `-factor` at `Lmax`. Returns a float tensor
    shaped like `lengths` (lengths' dtype if floating, else the default dtype).
    """
    if buffer <= 0:
        raise ValueError(f"buffer must be > 0, got {buffer}")
    if buffer > max_length:
        raise ValueError(f"buffer ({buffer}) must be <= max_length ({max_length})")
    dtype = lengths.dtype if lengths.is_floating_point() else torch.get_default_dtype()
    length = lengths.detach().to(dtype)
    check_finite("lengths", length)
    if bool((length < 0).any()):
        raise ValueError("lengths must be >= 0")
    exceed = length - (max_length - buffer)
    return (-exceed / buffer * factor).clamp(max=0.0)


def _pad_groups(values: Tensor, inverse: Tensor, counts: Tensor) -> Tensor:
    """Lay (B,) values out as (num_groups, max group size), one group per row, NaN-padded."""
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(inverse)
    slot[order] = torch.arange(len(inverse), device=inverse.device) - starts[inverse[order]]
    padded = values.new_full((len(counts), int(counts.max())), math.nan)
    padded[inverse, slot] = values
    return padded


def _iqr_inliers(padded: Tensor) -> Tensor:
    """Entries of each row inside `[q1 - 1.5 IQR, q3 + 1.5 IQR]` (NaN entries are not).

    q1 and q3 are the 25% and 75% quantiles of the row's non-NaN entries, with linear
    interpolation (numpy's and torch's default). A row with entries always keeps at least one:
    with three or more, the order statistic just above q1 lies in [q1, q3]; with two, the fences
    reach half the gap beyond both; with one, q1 = q3 = it.
    """
    probs = torch.tensor([0.25, 0.75], dtype=padded.dtype, device=padded.device)
    q1, q3 = torch.nanquantile(padded, probs, dim=1, interpolation="linear")
    iqr = q3 - q1
    return (padded >= (q1 - 1.5 * iqr)[:, None]) & (padded <= (q3 + 1.5 * iqr)[:, None])


def _kept_moments(padded: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row mean and population std over the kept entries, std below 1e-6 replaced by 1.

    A row that keeps nothing uses all its non-NaN entries (algorithms.md §7); a row with none gets
    mean 0.
    """
    keep = torch.where(keep.any(dim=1, keepdim=True), keep, ~torch.isnan(padded))
    n = keep.sum(dim=1).clamp(min=1)
    mean = torch.where(keep, padded, 0.0).sum(dim=1) / n
    var = (torch.where(keep, padded - mean[:, None], 0.0) ** 2).sum(dim=1) / n
    std = var.sqrt()
    return mean, torch.where(std < _PPL_MIN_STD, 1.0, std)


def ppl_shaping(
    advantages: Tensor,
    old_log_prob: Tensor,
    response_mask: Tensor,
    group_ids: Tensor,
    *,
    alpha: float = 0.01,
) -> Tensor:
    """Perplexity-based advantage shaping of Deng et al. (algorithms.md §7).

        lp_i  = -mean_t old_logp[i,t]                  (log-perplexity over valid tokens)
        w_i   = (lp_i - mean) / std                    (per group, robust statistics below)
        A'    = A * clamp(1 - alpha * w_i, 0.8, 1.2)   (weight detached)

    Per group, responses outside `[q1 - 1.5 IQR, q3 + 1.5 IQR]` (linear-interpolation quartiles of
    lp) are left out of the mean and the population std, all are used if all are left out, and a
    std below 1e-6 is replaced by 1. Outliers still get their own weight. Empty responses have no
    perplexity: they are left out of the statistics and get weight 1. Padding is returned unchanged.
    """
    check_same_shape(advantages=advantages, old_log_prob=old_log_prob, response_mask=response_mask)
    valid = check_mask(response_mask)
    if group_ids.shape != (valid.shape[0],):
        raise ValueError(
            f"group_ids must have shape [{valid.shape[0]}], got {list(group_ids.shape)}"
        )
    _check_group_ids(group_ids)
    if valid.shape[0] == 0:
        raise ValueError("advantages is empty: no response to shape")
    check_finite("advantages", advantages, valid)
    check_finite("old_log_prob", old_log_prob, valid)

    m = valid.to(torch.float64)
    lengths = m.sum(dim=1)
    nonempty = lengths > 0
    logp = torch.where(valid, old_log_prob.detach().to(torch.float64), 0.0)
    lp = -logp.sum(dim=1) / lengths.clamp(min=1)

    inverse, counts = _groups(group_ids)
    padded = _pad_groups(torch.where(nonempty, lp, math.nan), inverse, counts)
    mean, std = _kept_moments(padded, _iqr_inliers(padded))
    w = (lp - mean[inverse]) / std[inverse]
    weight = torch.where(nonempty, (1.0 - alpha * w).clamp(0.8, 1.2), 1.0)
    return torch.where(valid, advantages * weight[:, None].to(advantages.dtype), advantages)


def position_shaping(advantages: Tensor, response_mask: Tensor, *, alpha: float = 0.05) -> Tensor:
    """Position-based advantage shaping of Deng et al. for the plateau stage (algorithms.md §7).

        c_t = number of valid tokens at positions <= t,   L = number of valid tokens
        p_t = (c_t - 1) / L                               (0 at the first response token)
        b_t = min(alpha * sigmoid(15 * (p_t - 0.5)), 0.5 * |A[t]|)
        A'  = A + sign(A) * b_t

    Positions count valid tokens only, so left padding and holes in the mask are handled. Tokens
    with A = 0 and padding are returned unchanged.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (the bonus is capped at 0.5*|A|), got {alpha}")
    check_same_shape(advantages=advantages, response_mask=response_mask)
    valid = check_mask(response_mask)
    check_finite("advantages", advantages, valid)
    m = valid.to(torch.float64)
    count = torch.cumsum(m, dim=1)
    length = m.sum(dim=1, keepdim=True).clamp(min=1)
    p = (count - 1) / length
    adv = advantages.detach().to(torch.float64)
    bonus = torch.minimum(alpha * torch.sigmoid(15.0 * (p - 0.5)), 0.5 * adv.abs())
    shift = (torch.sign(adv) * bonus).to(advantages.dtype)
    return torch.where(valid, advantages + shift, advantages)


def low_prob_reweight(advantages: Tensor, old_log_prob: Tensor, *, alpha: float = 0.3) -> Tensor:
    """Low-probability token advantage reweighting of Yang et al. (algorithms.md §8).

        A'[i,t] = (alpha * exp(old_logp[i,t]) + 1 - alpha) * A[i,t]

    Tokens the rollout policy found unlikely get a smaller weight (down to `1 - alpha`), so they
    stop dominating the update. alpha = 0.3 (logic puzzles) or 0.1 (math). Padding with A = 0 stays
    0, so no mask is needed; every position must be finite.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    check_same_shape(advantages=advantages, old_log_prob=old_log_prob)
    check_finite("advantages", advantages)
    check_finite("old_log_prob", old_log_prob)
    weight = alpha * torch.exp(old_log_prob.detach()) + (1.0 - alpha)
    return advantages * weight.to(advantages.dtype)


def lopti_split(
    old_log_prob: Tensor, response_mask: Tensor, *, eta: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Lopti's token split (algorithms.md §8): (low, rest) bool masks within the response mask.

    `low` holds the valid tokens with `exp(old_logp) < eta` (updated first), `rest` the other valid
    tokens (updated second); together they partition the valid tokens.
    """
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    check_same_shape(old_log_prob=old_log_prob, response_mask=response_mask)
    valid = check_mask(response_mask)
    check_finite("old_log_prob", old_log_prob, valid)
    low = valid & (torch.exp(old_log_prob.detach()) < eta)
    return low, valid & ~low
