"""The rollout/training mismatch: how far the engine's log-probs are from the trainer's, and the
truncated importance-sampling correction of it.

Even with the weights in sync, the rollout engine (vLLM: its own kernels, its dtype, bf16 on GPU)
and the training forward give the same sampled token different log-probabilities, so an
"on-policy" update is slightly off-policy: the tokens were drawn from the engine's policy
``mu = pi_rollout``, not from the trainer's ``pi = pi_train`` (Yao et al. 2025, "Your efficient RL
framework secretly brings you off-policy RL training"). With the per-token log-ratio

    d_t = log pi(y_t) - log mu(y_t)        (rho_t = exp(d_t) = pi(y_t) / mu(y_t))

over the valid (response-mask) tokens, this module measures the gap (`mismatch_metrics`) and
gives the truncated importance-sampling weights that correct it (`rollout_is_weights`), as verl's
``algorithm.rollout_correction`` does (``rollout_is``, ``rollout_is_threshold``; metric names
under ``rollout_corr/``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from entroprl.algos.checks import check_choice, check_finite, check_nonempty, check_same_shape

ROLLOUT_IS_LEVELS = ("token", "sequence")

RATIO_BAND = (0.5, 2.0)
"""The band of `rollout_corr/ratio_fraction_low|high`: a token outside it is off by a factor of
two or more between the engine and the trainer."""

_LOG_RATIO_CLAMP = 20.0
"""exp(+-20) keeps the weights finite in float32 (as verl's SAFETY_BOUND); the truncation at the
threshold applies after it."""


def _checked(log_prob: Tensor, rollout_log_prob: Tensor, response_mask: Tensor) -> Tensor:
    """Validate the three (B, R) tensors; return the mask as bool."""
    check_same_shape(
        log_prob=log_prob, rollout_log_prob=rollout_log_prob, response_mask=response_mask
    )
    mask = response_mask.bool()
    check_nonempty(mask)
    check_finite("log_prob", log_prob, mask)
    check_finite("rollout_log_prob", rollout_log_prob, mask)
    return mask


def mismatch_metrics(
    log_prob: Tensor, rollout_log_prob: Tensor, response_mask: Tensor
) -> dict[str, float]:
    """How far the trainer's log-probs `log_prob` are from the engine's `rollout_log_prob` on the
    same sampled tokens (all (B, R), `response_mask` 1 on valid tokens). With d_t as above, over
    the N valid tokens and the S non-empty responses (n_i valid tokens in response i):

        log_prob_abs_diff_mean  = sum_t |d_t| / N
        log_prob_abs_diff_max   = max_t |d_t|
        ratio_fraction_low      = #{t : rho_t < 1/2} / N
        ratio_fraction_high     = #{t : rho_t > 2} / N
        training_log_ppl        = sum_i [sum_t -log pi(y_t) / n_i] / S
        rollout_log_ppl         = sum_i [sum_t -log mu(y_t) / n_i] / S
        k3_kl                   = sum_t (rho_t - d_t - 1) / N      (>= 0, an estimate of KL(mu||pi))

    The two log-perplexities are the entropy computed both ways: the tokens were sampled from mu,
    so ``rollout_log_ppl`` estimates mu's entropy (sequence-mean of token-mean, the paper's H) and
    ``training_log_ppl`` estimates the cross-entropy H(mu, pi) = H(mu) + KL(mu||pi), which is what
    the trainer sees; their difference is the mismatch in entropy units. Keys are prefixed
    ``rollout_corr/``.
    """
    mask = _checked(log_prob, rollout_log_prob, response_mask)
    d = (log_prob.double() - rollout_log_prob.double()).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    valid = d[mask]
    rho = valid.exp()
    low, high = RATIO_BAND
    rows = mask.any(-1)
    counts = mask.sum(-1)[rows]

    def log_ppl(lp: Tensor) -> Tensor:
        per_row = torch.where(mask, -lp.double(), 0.0).sum(-1)[rows] / counts
        return per_row.mean()

    values = torch.stack(
        [
            valid.abs().mean(),
            valid.abs().max(),
            (rho < low).double().mean(),
            (rho > high).double().mean(),
            log_ppl(log_prob),
            log_ppl(rollout_log_prob),
            (rho - valid - 1).mean(),
        ]
    ).tolist()
    names = (
        "log_prob_abs_diff_mean",
        "log_prob_abs_diff_max",
        "ratio_fraction_low",
        "ratio_fraction_high",
        "training_log_ppl",
        "rollout_log_ppl",
        "k3_kl",
    )
    return {f"rollout_corr/{k}": v for k, v in zip(names, values, strict=True)}


def rollout_is_weights(
    log_prob: Tensor,
    rollout_log_prob: Tensor,
    response_mask: Tensor,
    *,
    level: str = "token",
    threshold: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance-sampling weights (TIS) of the trainer's policy pi over the engine's
    mu, detached, (B, R), 0 on padding:

        token:     w_t = min(exp(d_t), C)
        sequence:  w_t = min(exp(sum_{s in response} d_s), C)   for every token of the response

    C = `threshold` (verl's ``rollout_is_threshold``, default 2). The trainer multiplies each
    token's policy loss by w_t (the whole term, as verl: KL-Cov's penalty included), so that the
    expectation over tokens drawn from mu is (up to the truncation) the expectation under pi:
    E_mu[rho * g] = E_pi[g]. Token level is biased and low-variance, sequence level unbiased for
    whole-response objectives with a variance that grows with the length; truncation trades a
    bias where rho > C for bounded variance. Metrics (``rollout_corr/`` prefix): rollout_is_mean
    (mean weight over valid tokens, after truncation), rollout_is_max (before truncation) and
    rollout_is_ratio_fraction_high (fraction of valid tokens truncated, rho > C).
    """
    check_choice("rollout_is level", level, ROLLOUT_IS_LEVELS)
    if not threshold > 0:
        raise ValueError(f"rollout_is_threshold must be > 0, got {threshold}")
    mask = _checked(log_prob, rollout_log_prob, response_mask)
    d = torch.where(mask, log_prob.detach().float() - rollout_log_prob.float(), 0.0)
    if level == "sequence":
        d = d.sum(-1, keepdim=True).expand_as(d)
    rho = d.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).exp()
    weights = torch.where(mask, rho.clamp(max=threshold), 0.0)
    valid = rho[mask]
    metrics = torch.stack(
        [weights[mask].mean(), valid.max(), (valid > threshold).float().mean()]
    ).tolist()
    names = ("rollout_is_mean", "rollout_is_max", "rollout_is_ratio_fraction_high")
    return weights, {f"rollout_corr/{k}": v for k, v in zip(names, metrics, strict=True)}
