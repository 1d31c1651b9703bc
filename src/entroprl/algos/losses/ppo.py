"""PPO/GRPO's clipped surrogate with dual clip (algorithms.md §4.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from entroprl.algos.losses.aggregation import LossDenominators, aggregate_loss
from entroprl.algos.losses.common import (
    LOG_RATIO_CLAMP,
    check_clip_range,
    check_loss_inputs,
    token_means,
)
from entroprl.algos.losses.registry import register_policy_loss
from entroprl.errors import SettingError


@dataclass
class PPOSettings:
    clip_low: float = 0.2
    """Lower clip: the ratio is clamped to [1 - clip_low, ...]; in [0, 1]."""
    clip_high: float = 0.2
    """Upper clip: [..., 1 + clip_high]; DAPO's clip-higher is 0.28."""
    clip_ratio_c: float = 3.0
    """Dual clip for negative advantages: the loss is at most -A*clip_ratio_c; > 1."""

    def validate(self) -> None:
        check_clip_range(self.clip_low, self.clip_high)
        if not (math.isfinite(self.clip_ratio_c) and self.clip_ratio_c > 1):
            raise SettingError(
                "clip_ratio_c", f"(dual clip) must be a finite number > 1, got {self.clip_ratio_c}"
            )


@register_policy_loss("ppo", settings=PPOSettings)
def ppo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    denominators: LossDenominators | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with dual clip, the GRPO/DAPO policy loss (algorithms.md §4).

        r  = exp(clamp(logp - old_logp, -20, 20))
        L1 = -A*r,   L2 = -A*clamp(r, 1 - clip_low, 1 + clip_high),   L = max(L1, L2)
        L  = min(L, -A*clip_ratio_c)   where A < 0   (dual clip, clip_ratio_c > 1)

    aggregated with `loss_agg_mode` (algorithms.md §5), each token's L times its `weights` when
    given. DAPO's clip-higher is `clip_high=0.28`. Metrics: pg_loss; pg_clipfrac, fraction of
    valid tokens with L2 > L1; pg_clipfrac_lower, fraction with A < 0 and max(L1, L2) > -A*c;
    ppo_kl, mean(old_logp - logp) over valid tokens.
    """
    log_prob, old_log_prob, advantages, mask = check_loss_inputs(
        log_prob, old_log_prob, advantages, response_mask, loss_agg_mode
    )
    PPOSettings(clip_low, clip_high, clip_ratio_c).validate()
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    l1 = -advantages * ratio
    l2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(l1, l2)
    l3 = -advantages * clip_ratio_c
    negative = advantages < 0
    loss_mat = torch.where(negative, torch.minimum(clipped, l3), clipped)
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode, denominators=denominators, weights=weights)
    metrics = token_means(
        mask,
        pg_clipfrac=(l2 > l1).to(torch.float64),
        pg_clipfrac_lower=(negative & (clipped > l3)).to(torch.float64),
        ppo_kl=-log_ratio,
    )
    return loss, {"pg_loss": loss.item(), **metrics}
