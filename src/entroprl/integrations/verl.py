"""entroprl's losses and advantage estimators in verl's registries (docs/verl.md).

Importing this module registers the policy losses `entroprl_clip_cov`, `entroprl_kl_cov` and
`entroprl_ce_gppo`, and the advantage estimators `entroprl_qae` and `entroprl_passk`. verl imports
it into its workers when its model config names it:

    actor_rollout_ref.model.external_lib=entroprl.integrations.verl
    actor_rollout_ref.actor.policy_loss.loss_mode=entroprl_kl_cov
    algorithm.adv_estimator=entroprl_qae          (the driver: VERL_USE_EXTERNAL_MODULES too)

The settings are verl's own: `policy_loss.clip_cov_ratio`, `clip_cov_lb`, `clip_cov_ub`,
`kl_cov_ratio`, `ppo_kl_coef`, `actor.clip_ratio(_low|_high)`, `actor.clip_ratio_c`,
`actor.loss_agg_mode`; CE-GPPO's betas in `EntroprlPolicyLossConfig`; the estimators' in
`algorithm.quantile_k` (QAE's own flag) and `algorithm.pass_k`. EntroPIC is not offered: its
controller needs the entropy of the training forward, which verl does not pass to a policy loss.

What differs from verl's `clip_cov` / `kl_cov`:

- Scope: verl selects per micro-batch per GPU. Here the selection is made over the micro-batch of
  every data-parallel rank together (verl runs the same number of micro-batches on each), when
  verl's data-parallel group is the whole process group (no sequence, tensor or pipeline
  parallelism). verl gives its loss wrapper the group but not the policy loss; otherwise the
  selection stays per rank, as verl's, with a warning.
- The losses are entroprl's (`entroprl.algos.losses`), with verl's aggregation
(`global_batch_info`) and
  rollout importance weights: on one rank they equal verl's on the same inputs (tested), except
  where verl is arbitrary (ties in KL-Cov's top-k go to the lowest index; `ratio * N` within 1e-9 of
  an integer counts as that integer).
- KL-Cov warns once when it runs fully on-policy: its penalty |logp - old_logp| was zero over the
  first two optimizer steps, as it is when each step uses one mini-batch of a fresh rollout.
- Metrics (verl prefixes "actor/"): pg_clipfrac (PPO's clip fraction; verl's clip_cov reports the
  detached fraction there), ppo_kl (the mean log-ratio; verl's kl_cov reports its mean absolute
  value there), clip_cov_frac or kl_cov_frac (fraction selected), kl_cov_abs_diff, and the
  diagnostics cov/all, cov/top_0.02% ... cov/top_50% and dynamics/predicted_entropy_change
  (-cov/all) of the rollout policy's log-probs over the selection scope.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss
from verl.workers.config import PolicyLossConfig

from entroprl.algos import dynamics, losses
from entroprl.algos.advantages import PassKSettings, QAESettings, passk_advantages, qae_advantages
from entroprl.train import distributed

# Mean |logp - old_logp| over a mini-batch's tokens below which KL-Cov's penalty counts as zero
ON_POLICY_TOLERANCE = 1e-6


def global_scope(config) -> bool:
    """Whether the selection can span verl's data-parallel group: when that group is the default
    process group, the only one a policy loss can reach."""
    if not distributed.is_distributed():
        return False
    dp_size = config.global_batch_info.get("dp_size", 1)
    if dp_size == distributed.world_size():
        return True
    warnings.warn(
        f"verl's data-parallel group ({dp_size} ranks) is not the whole process group "
        f"({distributed.world_size()} ranks: sequence, tensor or pipeline parallelism), which a "
        "policy loss cannot reach: entroprl selects per rank, as verl does",
        stacklevel=3,
    )
    return False


# One seed per call, the same on every rank (the ranks call the loss in step): Clip-Cov's draw
# over all ranks needs the same generator everywhere.
_CALLS = itertools.count()


def _aggregation(
    loss_agg_mode: str, mask: Tensor, config
) -> tuple[str, losses.LossDenominators, int]:
    """entroprl's aggregation mode and denominators, and the factor, that give verl's `agg_loss`
    with `config.global_batch_info` (verl's sum over the data-parallel ranks is of losses already
    multiplied by dp_size, to undo the gradient average)."""
    info = config.global_batch_info
    dp_size = info.get("dp_size") or 1
    tokens = info.get("batch_num_tokens") or int(mask.sum())
    sequences = info.get("global_batch_size") or int(mask.any(dim=-1).sum())
    if loss_agg_mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        return loss_agg_mode, losses.LossDenominators(int(tokens), int(sequences)), dp_size
    if loss_agg_mode == "token-sum":
        constant = 1.0
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        constant = sequences * (info.get("loss_scale_factor") or mask.shape[-1])
    else:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")
    denominators = losses.LossDenominators(int(tokens), int(sequences), float(constant))
    return "seq-mean-token-sum-norm", denominators, dp_size


def _clip_range(config) -> tuple[float, float]:
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return low, high


def _diagnostics(old_log_prob: Tensor, advantages: Tensor, mask: Tensor, across: bool) -> dict:
    cov = dynamics.token_covariance(old_log_prob, advantages, mask, across_ranks=across)
    summary = dynamics.covariance_summary(cov, mask, across_ranks=across)
    metrics = {f"actor/cov/{group}": value for group, value in summary.items()}
    metrics["actor/dynamics/predicted_entropy_change"] = -summary["all"]
    return metrics


def _apply(
    name: str,
    settings,
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    loss_agg_mode: str,
    config,
    rollout_is_weights: Tensor | None,
    **kwargs,
) -> tuple[Tensor, dict[str, Any]]:
    """entroprl's policy loss `name` applied as the trainer applies it (`PolicyLossSpec.apply`),
    aggregated as verl's `agg_loss` (`_aggregation`) and scaled for verl's sum over the ranks;
    its metrics. The rollout importance weights multiply each token's whole loss (KL-Cov's
    penalty included), as verl's `pg_losses * rollout_is_weights`."""
    mode, denominators, dp_size = _aggregation(loss_agg_mode, mask, config)
    loss, metrics = losses.get_policy_loss(name).apply(
        log_prob,
        old_log_prob,
        advantages,
        mask,
        settings,
        loss_agg_mode=mode,
        denominators=denominators,
        weights=rollout_is_weights,
        **kwargs,
    )
    return loss * dp_size, metrics


@register_policy_loss("entroprl_clip_cov")
def compute_policy_loss_entroprl_clip_cov(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Clip-Cov (`losses.clip_cov_select`, `losses.clip_cov_loss`) with verl's signature, applied as
    the trainer applies it (`PolicyLossSpec.apply`)."""
    policy = config.policy_loss
    low, high = _clip_range(config)
    mask = response_mask.bool()
    across = global_scope(config)
    # verl draws with the global RNG, per rank; a draw over all ranks needs a shared generator
    generator = torch.Generator().manual_seed(next(_CALLS)) if across else None
    settings = losses.ClipCovSettings(
        ratio=policy.clip_cov_ratio,
        lb=policy.clip_cov_lb,
        ub=policy.clip_cov_ub,
        clip_low=low,
        clip_high=high,
    )
    loss, m = _apply(
        "clip_cov",
        settings,
        old_log_prob,
        log_prob,
        advantages,
        mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        generator=generator,
        across_ranks=across,
    )
    metrics = {
        "actor/pg_clipfrac": m["pg_clipfrac"],
        "actor/pg_clipfrac_lower": m["pg_clipfrac_lower"],
        "actor/ppo_kl": m["ppo_kl"],
        "actor/clip_cov_frac": m["clip_cov_frac"],
    }
    return loss, metrics | _diagnostics(old_log_prob, advantages, mask, across)


@register_policy_loss("entroprl_kl_cov")
def compute_policy_loss_entroprl_kl_cov(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """KL-Cov (`losses.kl_cov_select`, `losses.kl_cov_loss`) with verl's signature."""
    policy = config.policy_loss
    mask = response_mask.bool()
    across = global_scope(config)
    settings = losses.KLCovSettings(ratio=policy.kl_cov_ratio, coef=policy.ppo_kl_coef)
    loss, m = _apply(
        "kl_cov",
        settings,
        old_log_prob,
        log_prob,
        advantages,
        mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        across_ranks=across,
    )
    _ON_POLICY.observe(log_prob, old_log_prob, mask, config, across)
    metrics = {
        "actor/pg_clipfrac": m["pg_clipfrac"],
        "actor/pg_clipfrac_lower": m["pg_clipfrac_lower"],
        "actor/ppo_kl": m["ppo_kl"],
        "actor/kl_cov_abs_diff": m["kl_cov_abs_diff"],
        "actor/kl_cov_frac": m["kl_cov_selected"] / max(int(mask.sum()), 1),
    }
    return loss, metrics | _diagnostics(old_log_prob, advantages, mask, across)


@dataclass
class OnPolicyCheck:
    """Warns once when KL-Cov's penalty was zero over the first two optimizer steps.

    A mini-batch (one optimizer step) ends when the calls have covered verl's
    `global_batch_info["batch_num_tokens"]` tokens over the data-parallel ranks. The first
    mini-batch after a rollout always has logp == old_logp; a run whose second mini-batch has it
    too updates on fresh rollouts only, where |logp - old_logp| and its gradient are 0.
    """

    tokens: float = 0.0
    abs_diff: float = 0.0
    zero_steps: int = 0
    done: bool = False

    def observe(self, log_prob: Tensor, old_log_prob: Tensor, mask: Tensor, config, across: bool):
        info = config.global_batch_info
        total = info.get("batch_num_tokens")
        # counted over the same ranks as verl's total: all of them, or a single one
        if self.done or total is None or not (across or info.get("dp_size", 1) == 1):
            return
        diff = torch.where(mask, (log_prob.detach() - old_log_prob).abs(), 0.0)
        counts = torch.stack([mask.sum().to(torch.float64), diff.sum().to(torch.float64)])
        if across:
            counts = distributed.all_reduce_sum(counts)
        tokens, abs_diff = counts.tolist()
        self.tokens += tokens
        self.abs_diff += abs_diff
        if self.tokens < total:
            return
        if self.abs_diff > ON_POLICY_TOLERANCE * self.tokens:
            self.done = True
            return
        self.zero_steps, self.tokens, self.abs_diff = self.zero_steps + 1, 0.0, 0.0
        if self.zero_steps == 2:
            self.done = True
            warnings.warn(
                "KL-Cov on-policy: logp == old_logp over the first two optimizer steps, so the "
                "|logp - old_logp| penalty and its gradient are 0 and this is plain policy "
                "gradient. Use several mini-batches per step (actor.ppo_mini_batch_size < "
                "data.train_batch_size) or actor.ppo_epochs > 1 (or the learning rate was 0).",
                stacklevel=3,
            )


_ON_POLICY = OnPolicyCheck()


@dataclass
class EntroprlPolicyLossConfig(PolicyLossConfig):
    """verl's `PolicyLossConfig` with CE-GPPO's two weights, for
    ``actor.policy_loss._target_=entroprl.integrations.verl.EntroprlPolicyLossConfig``; without
    it `entroprl_ce_gppo` takes the defaults of `losses.CEGPPOSettings`."""

    ce_gppo_beta1: float = losses.CEGPPOSettings.beta1
    """CE-GPPO: gradient weight of tokens with A < 0 below 1 - clip_ratio_low."""
    ce_gppo_beta2: float = losses.CEGPPOSettings.beta2
    """CE-GPPO: gradient weight of tokens with A > 0 above 1 + clip_ratio_high."""


@register_policy_loss("entroprl_ce_gppo")
def compute_policy_loss_entroprl_ce_gppo(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """CE-GPPO (`losses.ce_gppo_loss`, algorithms.md §4.8) with verl's signature: the clip range
    and dual clip from the actor config, beta1 and beta2 from `policy_loss.ce_gppo_beta1/2`."""
    low, high = _clip_range(config)
    defaults = losses.CEGPPOSettings()
    settings = losses.CEGPPOSettings(
        clip_low=low,
        clip_high=high,
        clip_ratio_c=config.get("clip_ratio_c", defaults.clip_ratio_c),
        beta1=config.policy_loss.get("ce_gppo_beta1", defaults.beta1),
        beta2=config.policy_loss.get("ce_gppo_beta2", defaults.beta2),
    )
    mask = response_mask.bool()
    loss, m = _apply(
        "ce_gppo",
        settings,
        old_log_prob,
        log_prob,
        advantages,
        mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
    )
    keys = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "ce_gppo_low_frac", "ce_gppo_high_frac")
    return loss, {f"actor/{key}": m[key] for key in keys}


def _token_advantages(estimator, token_level_rewards: Tensor, response_mask: Tensor, index, **kw):
    """A response-level entroprl estimator in verl's advantage-estimator form: rewards summed per
    response, verl's `uid`s as groups, the value on every response token; (advantages, returns)."""
    _, groups = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    scores = token_level_rewards.sum(dim=-1)
    group_ids = torch.as_tensor(groups, device=scores.device)
    values = estimator(scores, group_ids, **kw)[:, None] * response_mask.to(scores.dtype)
    return values, values


@register_adv_est("entroprl_qae")
def compute_entroprl_qae_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index=None,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Quantile advantages (`advantages.qae_advantages`, algorithms.md §6.8): K from
    `algorithm.quantile_k` (the authors' flag, default 0.4), the std from verl's
    `algorithm.norm_adv_by_std_in_grpo`."""
    get = config.get if config is not None else (lambda key, default: default)
    defaults = QAESettings()
    return _token_advantages(
        qae_advantages,
        token_level_rewards,
        response_mask,
        index,
        quantile=float(get("quantile_k", defaults.quantile)),
        norm_by_std=bool(get("norm_adv_by_std_in_grpo", defaults.norm_by_std)),
        eps=epsilon,
    )


@register_adv_est("entroprl_passk")
def compute_entroprl_passk_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index=None,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Pass@k training's analytical advantages (`advantages.passk_advantages`, algorithms.md
    §6.9): k from `algorithm.pass_k` (default 4); rewards must be 0 or 1."""
    get = config.get if config is not None else (lambda key, default: default)
    k = get("pass_k", PassKSettings().k)
    return _token_advantages(
        passk_advantages, token_level_rewards, response_mask, index, k=int(k), eps=epsilon
    )
