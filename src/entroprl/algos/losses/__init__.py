"""Policy losses, their aggregation, and the entropy-control terms (algorithms.md §3, §4, §5), one
module each: `aggregation`, `registry`, `ppo`, `cov` (Clip-Cov, KL-Cov), `ce_gppo`, `entropic`
and `terms` (the entropy bonus, the reference KL, high-entropy masking); `common` holds what they
share. Importing the package registers every loss, in this order.

Every loss takes per-token tensors of shape (B, T): `log_prob` (current policy, with gradient),
`old_log_prob` (rollout policy), `advantages` and a 0/1 `response_mask`, and returns
`(loss, metrics)`. Values at padding positions are ignored (they may hold anything, NaN included);
NaN or inf at a valid position raises `ValueError`.

Split invariance (algorithms.md §5). A trainer that accumulates gradients over micro-batches passes
`denominators=loss_denominators(minibatch_mask)` and, for Clip-Cov and KL-Cov, the `selected` mask
computed once over the whole mini-batch (`clip_cov_select` / `kl_cov_select`, `across_ranks=True`);
the sum of the micro-batch losses then equals the mini-batch loss, gradient included, however the
mini-batch is split. Without them, each call uses the tensors passed as its own scope: the reference
(verl) per-micro-batch behaviour.

Clip-Cov's bounds `lb`, `ub` are absolute values of an unnormalised product
`(logp - mean) * (A - mean)`: they depend on the advantage scale (algorithms.md §3), so changing the
advantage estimator (e.g. GRPO vs Dr. GRPO) changes which tokens are candidates.
"""

# isort: off
# the losses register in this order, which the configuration keeps for their settings
from entroprl.algos.losses import ppo, cov, ce_gppo, entropic  # noqa: F401

# isort: on
from entroprl.algos.losses.aggregation import (
    LOSS_AGG_MODES,
    LossDenominators,
    aggregate_loss,
    loss_denominators,
)
from entroprl.algos.losses.ce_gppo import CEGPPOSettings, ce_gppo_loss
from entroprl.algos.losses.cov import (
    ClipCovSettings,
    KLCovSettings,
    clip_cov_loss,
    clip_cov_select,
    kl_cov_loss,
    kl_cov_select,
    top_fraction,
)
from entroprl.algos.losses.entropic import (
    ENTROPIC_ENTROPIES,
    EntroPICController,
    EntroPICSettings,
    entropic_loss,
    high_prob_select,
)
from entroprl.algos.losses.ppo import PPOSettings, ppo_loss
from entroprl.algos.losses.registry import (
    POLICY_LOSSES,
    LossController,
    NoSettings,
    PolicyLoss,
    PolicyLossSpec,
    Selection,
    get_policy_loss,
    register_policy_loss,
)
from entroprl.algos.losses.terms import (
    KL_ESTIMATORS,
    AdaptiveEntropyCoef,
    entropy_bonus,
    high_entropy_mask,
    kl_penalty,
)

# what a loss's settings raise (`PolicyLossSpec.settings`), as a plug-in loss writes it
from entroprl.errors import SettingError

__all__ = [
    "ENTROPIC_ENTROPIES",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "AdaptiveEntropyCoef",
    "CEGPPOSettings",
    "ClipCovSettings",
    "EntroPICController",
    "EntroPICSettings",
    "KLCovSettings",
    "LossController",
    "LossDenominators",
    "NoSettings",
    "PPOSettings",
    "PolicyLoss",
    "PolicyLossSpec",
    "Selection",
    "SettingError",
    "aggregate_loss",
    "ce_gppo_loss",
    "clip_cov_loss",
    "clip_cov_select",
    "entropic_loss",
    "entropy_bonus",
    "get_policy_loss",
    "high_entropy_mask",
    "high_prob_select",
    "kl_cov_loss",
    "kl_cov_select",
    "kl_penalty",
    "loss_denominators",
    "ppo_loss",
    "register_policy_loss",
    "top_fraction",
]
