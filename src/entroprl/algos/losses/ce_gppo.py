"""CE-GPPO (algorithms.md §4.8)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from entroprl.algos.losses.aggregation import LossDenominators, aggregate_loss
from entroprl.algos.losses.common import LOG_RATIO_CLAMP, check_loss_inputs, token_means
from entroprl.algos.losses.ppo import PPOSettings
from entroprl.algos.losses.registry import register_policy_loss
from entroprl.errors import SettingError

# --------------------------------------------------------------------------------------------------
# CE-GPPO (algorithms.md §4.8)


@dataclass
class CEGPPOSettings:
    clip_low: float = 0.2
    """PPO's clip range [1 - clip_low, 1 + clip_high]; outside it the bounded gradient applies."""
    clip_high: float = 0.2
    """The upper end of that range, 1 + clip_high."""
    clip_ratio_c: float = 3.0
    """Dual clip for negative advantages, as PPO's; > 1 (the authors' scripts set 10)."""
    beta1: float = 0.75
    """Gradient weight of tokens with A < 0 below 1 - clip_low (the authors' README value)."""
    beta2: float = 1.0
    """Gradient weight of tokens with A > 0 above 1 + clip_high."""

    def validate(self) -> None:
        PPOSettings(self.clip_low, self.clip_high, self.clip_ratio_c).validate()
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SettingError(name, f"must be a finite number >= 0, got {value}")


@register_policy_loss(
    "ce_gppo",
    settings=CEGPPOSettings,
    on_policy_note=(
        "CE-GPPO with one mini-batch and one epoch is PPO: on the first update logp == old_logp, "
        "so no token lies outside the clip range for its bounded gradient (algorithms.md §4.8). "
        "Use several mini-batches or epochs."
    ),
)
def ce_gppo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    beta1: float = 0.75,
    beta2: float = 1.0,
    loss_agg_mode: str = "token-mean",
    denominators: LossDenominators | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """CE-GPPO of Su et al. (algorithms.md §4.8): PPO whose clipped tokens keep a bounded gradient.

        r    = exp(clamp(logp - old_logp, -20, 20)),   s = r / sg(r)   (value 1, gradient of logp)
        low  = A < 0 and r < 1 - clip_low,   high = A > 0 and r > 1 + clip_high
        L    = -beta1 * (1 - clip_low) * s * A    on low
               -beta2 * (1 + clip_high) * s * A   on high
               -r * A                             elsewhere
        L    = min(L, -A*clip_ratio_c)   where A < 0   (dual clip)

    On low and high tokens PPO's value, (1 - clip_low) or (1 + clip_high) times -A, is kept up to
    the factor beta, and the gradient is beta times that value's times grad logp. Aggregated with
    `loss_agg_mode`, each token's L times its `weights` when given. Metrics: pg_loss;
    pg_clipfrac, fraction of valid tokens on low or high (PPO's clip fraction); pg_clipfrac_lower,
    fraction with A < 0 whose loss the dual clip caps; ppo_kl; ce_gppo_low_frac, ce_gppo_high_frac.
    """
    log_prob, old_log_prob, advantages, mask = check_loss_inputs(
        log_prob, old_log_prob, advantages, response_mask, loss_agg_mode
    )
    CEGPPOSettings(clip_low, clip_high, clip_ratio_c, beta1, beta2).validate()
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    kept_gradient = ratio / ratio.detach()
    low = (advantages < 0) & (ratio < 1 - clip_low)
    high = (advantages > 0) & (ratio > 1 + clip_high)
    unclipped = -advantages * ratio
    loss_mat = torch.where(
        low,
        -beta1 * (1 - clip_low) * kept_gradient * advantages,
        torch.where(high, -beta2 * (1 + clip_high) * kept_gradient * advantages, unclipped),
    )
    l3 = -advantages * clip_ratio_c
    negative = advantages < 0
    capped = negative & (loss_mat > l3)
    loss_mat = torch.where(negative, torch.minimum(loss_mat, l3), loss_mat)
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode, denominators=denominators, weights=weights)
    metrics = token_means(
        mask,
        pg_clipfrac=(low | high).to(torch.float64),
        pg_clipfrac_lower=capped.to(torch.float64),
        ppo_kl=-log_ratio,
        ce_gppo_low_frac=low.to(torch.float64),
        ce_gppo_high_frac=high.to(torch.float64),
    )
    return loss, {"pg_loss": loss.item(), **metrics}
