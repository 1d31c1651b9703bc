"""What the losses share: input checks, fraction counts, the top tokens of a scope over ranks,
PPO's clip test."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from entroprl.algos.checks import check_choice, check_finite, check_mask, check_same_shape, fail_if
from entroprl.algos.losses.aggregation import LOSS_AGG_MODES, zero_padding
from entroprl.errors import SettingError
from entroprl.train import distributed

# PPO's log-ratio clamp (algorithms.md §4, as in verl): keeps exp() finite in float32 for any
# log-ratio.
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------------
# Input validation


def check_fraction(name: str, value: float, *, upper: float | None = None) -> None:
    if not (math.isfinite(value) and value > 0 and (upper is None or value <= upper)):
        bound = f" and <= {upper}" if upper is not None else ""
        raise SettingError(name, f"must be a finite number > 0{bound}, got {value}")


def check_loss_inputs(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate a loss's inputs; return them with padding zeroed, and the mask as bool."""
    check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    check_same_shape(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=response_mask,
    )
    mask = check_mask(response_mask)
    check_finite("log_prob", log_prob, mask)
    check_finite("old_log_prob", old_log_prob, mask)
    check_finite("advantages", advantages, mask)
    log_prob, old_log_prob, advantages = (
        zero_padding(t, mask) for t in (log_prob, old_log_prob, advantages)
    )
    return log_prob, old_log_prob, advantages, mask


def check_selected(selected: Tensor, mask: Tensor) -> Tensor:
    check_same_shape(selected=selected, response_mask=mask)
    selected = check_mask(selected, "selected")
    fail_if(
        (selected & ~mask).any(),
        ValueError(
            "selected marks padding tokens (response_mask = 0); was it built for this batch?"
        ),
    )
    return selected


def fraction_count(fraction: float, n: int, *, round_up: bool) -> int:
    """ceil or floor of `fraction * n`; a product within 1e-9 of an integer counts as that integer.

    Float rounding would otherwise give ceil(0.2 * 15) = 4 and floor(0.29 * 100) = 28.
    """
    x = fraction * n
    nearest = round(x)
    if abs(x - nearest) <= 1e-9 * max(1.0, abs(x)):
        return int(nearest)
    return math.ceil(x) if round_up else math.floor(x)


def top_valid(
    scores: Tensor, mask: Tensor, count: Callable[[int], int], *, across_ranks: bool
) -> Tensor:
    """Bool mask of the `count(N)` valid tokens with the largest `scores` (N valid in the scope).

    Ties go to the lowest flat index (row-major; across ranks, the lower rank first). Across ranks,
    every rank sorts the same gathered scores and keeps the winners that are its own.
    """
    flat_valid = mask.reshape(-1).nonzero().squeeze(1)
    local = scores.detach().reshape(-1)[flat_valid]
    gathered, offset = distributed.all_gather_cat(local) if across_ranks else (local, 0)
    if gathered.numel() == 0:
        raise ValueError(
            "response_mask selects no token over the selection scope: nothing to select"
        )
    k = min(count(gathered.numel()), gathered.numel())
    winners = torch.sort(gathered, descending=True, stable=True).indices[:k]
    mine = winners[(winners >= offset) & (winners < offset + local.numel())] - offset
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    out[flat_valid[mine.to(flat_valid.device)]] = True
    return out.view_as(mask)


def ppo_clipped(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> Tensor:
    """Tokens where PPO's clipped term wins, L2 > L1, with the unclamped ratio of Clip-Cov."""
    ratio = torch.exp(log_prob.detach() - old_log_prob.detach())
    l1 = -advantages * ratio
    l2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return l2 > l1


def check_clip_range(clip_low: float, clip_high: float) -> None:
    if not (math.isfinite(clip_low) and 0 <= clip_low <= 1):
        raise SettingError(
            "clip_low", f"must be in [0, 1] (ratio clamped to [1 - clip_low, ...]), got {clip_low}"
        )
    if not (math.isfinite(clip_high) and clip_high >= 0):
        raise SettingError("clip_high", f"must be a finite number >= 0, got {clip_high}")


def check_bounds(lb: float, ub: float) -> None:
    if not (math.isfinite(lb) and math.isfinite(ub) and lb < ub):
        raise SettingError("lb", f"and ub: need finite lb < ub, got lb={lb}, ub={ub}")


def token_means(mask: Tensor, **per_token: Tensor) -> dict[str, float]:
    """Means over the valid tokens passed (0 when there are none: an empty micro-batch)."""
    n = mask.sum().clamp(min=1)
    values = torch.stack(
        [torch.where(mask, v.detach(), 0).sum().to(torch.float64) / n for v in per_token.values()]
    )
    return dict(zip(per_token, values.tolist(), strict=True))
