"""The four methods of algorithms.md §4.8, §4.9, §6.8 and §6.9 against their authors' code.

Each reference below is the authors' function, copied into this test as the yardstick (verl's
helpers it calls, `masked_mean` and `agg_loss`, copied from the same repositories; `print` and
config plumbing removed, nothing else changed). entroprl's implementations are written from the
formulas, not from these copies; the tests check that both give the same numbers.

- CE-GPPO: Kwai-Klear/CE-GPPO at 10558fe, verl/trainer/ppo/core_algos.py,
  `compute_gppo_loss_general_beta`.
- EntroPIC: yk7333/EntroPIC at 2470730, core_algos.py `compute_policy_loss_entropic` and the PI
  update of dp_actor.py `EntroPICDataParallelPPOActor.update_policy`.
- QAE: junkangwu/QAE, verl/trainer/ppo/core_algos.py (the lines its README quotes) inside verl's
  `compute_grpo_outcome_advantage`.
- Pass@k training: RUCAIBox/Passk_Training at 00474d7, code/passk_adv.py.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import comb

from entroprl.algos.advantages import passk_advantages, qae_advantages
from entroprl.algos.losses import EntroPICController, EntroPICSettings, ce_gppo_loss, entropic_loss

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


# --------------------------------------------------------------------------------------------------
# The authors' code (reference data)


def masked_mean(values, mask, axis=None):
    """verl.utils.torch_functional.masked_mean."""
    return (values * mask).sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def agg_loss(loss_mat, loss_mask, loss_agg_mode):
    """verl's agg_loss, as in EntroPIC's core_algos.py."""
    if loss_agg_mode == "token-mean":
        loss = masked_mean(loss_mat, loss_mask)
    elif loss_agg_mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        loss = masked_mean(seq_losses, seq_mask)
    elif loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).float()
        loss = masked_mean(seq_losses, seq_mask)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        loss = torch.sum(seq_losses) / loss_mask.shape[-1]
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return loss


def compute_gppo_loss_general_beta(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    cliprange=None,
    cliprange_low=None,
    cliprange_high=None,
    clip_ratio_c=3.0,
    loss_agg_mode="token-mean",
    gppo_loss_beta1=0.25,
    gppo_loss_beta2=1.0,
):
    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)
    ratio_detached = ratio.detach()

    pg_losses1 = -advantages * ratio
    if cliprange_low is None:
        cliprange_low = cliprange
    if cliprange_high is None:
        cliprange_high = cliprange

    # case masks
    low_mask = (ratio < (1 - cliprange_low)) & (advantages < 0)
    high_mask = (ratio > (1 + cliprange_high)) & (advantages > 0)
    other_mask = ~(low_mask | high_mask)

    beta1 = gppo_loss_beta1
    beta2 = gppo_loss_beta2

    # three cases
    clip_pg_losses1 = torch.zeros_like(advantages)
    clip_pg_losses1[low_mask] = (
        -beta1
        * (1 - cliprange_low)
        / ratio_detached[low_mask]
        * ratio[low_mask]
        * advantages[low_mask]
    )
    clip_pg_losses1[high_mask] = (
        -beta2
        * (1 + cliprange_high)
        / ratio_detached[high_mask]
        * ratio[high_mask]
        * advantages[high_mask]
    )
    clip_pg_losses1[other_mask] = -ratio[other_mask] * advantages[other_mask]

    pg_clipfrac = masked_mean((low_mask | high_mask).float(), response_mask)

    pg_losses3 = -advantages * clip_ratio_c

    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )

    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode)

    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower, pg_losses1


def compute_policy_loss_entropic(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    high_prob_thresh=0.95,
    control_alpha=None,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    clip_ratio = config.clip_ratio
    clip_ratio_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio
    clip_ratio_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio
    clip_ratio_c = config.get("clip_ratio_c", 3.0)

    cliprange = clip_ratio
    cliprange_low = clip_ratio_low
    cliprange_high = clip_ratio_high

    negative_approx_kl = log_prob - old_log_prob
    # Clamp negative_approx_kl for stability
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)

    pg_losses1 = -advantages * ratio
    if cliprange_low is None:
        cliprange_low = cliprange
    if cliprange_high is None:
        cliprange_high = cliprange
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)

    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(
        torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask
    )

    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)

    # Apply rollout importance sampling weights if provided
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights

    pg_loss = agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode)
    # EntroPIC Adjust Loss
    prob_high = log_prob > torch.log(torch.tensor(high_prob_thresh, device=log_prob.device))
    prob_mask = response_mask * prob_high
    pg_loss_adjust = control_alpha * agg_loss(
        -ratio * advantages.abs(), loss_mask=prob_mask, loss_agg_mode=loss_agg_mode
    )
    pg_loss = pg_loss + pg_loss_adjust
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


class EntroPICActorControl:
    """The PI update of EntroPIC's dp_actor.py, per micro-batch of a mini-batch."""

    def __init__(self, target_entropy, entropy_control_p, entropy_control_i, ppo_mini_batch_size):
        self.config = SimpleNamespace(
            target_entropy=target_entropy,
            entropy_control_p=entropy_control_p,
            entropy_control_i=entropy_control_i,
            ppo_mini_batch_size=ppo_mini_batch_size,
        )
        self.accumulate_entropy_error = 0.0

    def control_alpha(self, entropy_loss_item, rows):
        K_p = self.config.entropy_control_p
        K_i = self.config.entropy_control_i
        if self.config.target_entropy >= 0:
            control_alpha_i = self.accumulate_entropy_error * K_i
            control_alpha_p = (entropy_loss_item - self.config.target_entropy) * K_p
            control_alpha = control_alpha_i + control_alpha_p
            control_alpha = np.clip(control_alpha, -1.0, 1.0)
            self.accumulate_entropy_error += (
                (entropy_loss_item - self.config.target_entropy)
                * rows
                / self.config.ppo_mini_batch_size
            )
        else:
            control_alpha = 0.0
        return control_alpha


def compute_grpo_outcome_advantage_qae(
    token_level_rewards,
    response_mask,
    index,
    epsilon=1e-6,
    norm_adv_by_std_in_grpo=True,
    config=None,
):
    """verl's compute_grpo_outcome_advantage with QAE's quantile baseline."""
    scores = token_level_rewards.sum(dim=-1)

    id2score = defaultdict(list)
    id2mean = {}
    id2std = {}

    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
                id2std[idx] = torch.tensor(1.0)
            elif len(id2score[idx]) > 1:
                scores_tensor = torch.stack(id2score[idx])
                quantile_k = config.get("quantile_k", -1.0) if config else -1.0
                if 0 < quantile_k < 1:
                    id2mean[idx] = torch.quantile(scores_tensor, quantile_k)
                else:
                    id2mean[idx] = torch.mean(scores_tensor)
                id2std[idx] = torch.std(scores_tensor)
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            if norm_adv_by_std_in_grpo:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
            else:
                scores[i] = scores[i] - id2mean[index[i]]
        scores = scores.unsqueeze(-1) * response_mask

    return scores, scores


def calc_adv(val, k):
    c = len(np.where(val == 1)[0])
    n = len(val)
    rho = 1 - comb(n - c, k) / comb(n, k)
    sigma = np.sqrt(rho * (1 - rho))
    adv_p = (1 - rho) / (sigma + 1e-6)
    adv_n = (1 - rho - comb(n - c - 1, k - 1) / comb(n - 1, k - 1)) / (sigma + 1e-6)
    new_val = np.where(val == 1, adv_p, val)
    new_val = np.where(new_val == 0, adv_n, new_val)
    return new_val


def compute_advantage(token_level_rewards, response_mask, index, K):
    scores = token_level_rewards.sum(dim=-1)

    id2score = defaultdict(list)
    uid2sid = defaultdict(list)

    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i].detach().item())
            uid2sid[index[i]].append(i)
        for uid in id2score:
            reward = np.array(id2score[uid])
            adv = calc_adv(reward, K)
            for i in range(len(uid2sid[uid])):
                scores[uid2sid[uid][i]] = adv[i]

    scores = scores.unsqueeze(-1) * response_mask

    return scores, scores


# --------------------------------------------------------------------------------------------------
# Batches


def loss_batch(seed, *, spread=0.5):
    """(B, T) float64 log-probs with gradient, old log-probs at a log-ratio of about `spread`,
    GRPO-like advantages (one per row, some 0), a mask with an empty row; padding holds 0, as
    verl's tensors do."""
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 7
    log_prob = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2.5
    log_prob[0, :3] = -torch.rand(3, generator=g, dtype=torch.float64) * 0.04  # p > 0.95
    old = log_prob + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).clone()
    adv[2] = 0.0
    mask = (torch.rand(b, t, generator=g) < 0.8).to(torch.float64)
    mask[3] = 0.0
    mask[0, :3] = 1.0
    return log_prob.requires_grad_(), old * mask, adv * mask, mask


def grad_of(loss, log_prob):
    (grad,) = torch.autograd.grad(loss, log_prob)
    return grad


# --------------------------------------------------------------------------------------------------
# CE-GPPO


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("beta1", "beta2", "low", "high", "c"),
    [(0.75, 1.0, 0.2, 0.2, 3.0), (0.5, 1.5, 0.2, 0.28, 10.0)],
)
def test_ce_gppo_matches_the_authors_loss_and_gradient(mode, beta1, beta2, low, high, c):
    for seed in range(4):
        log_prob, old, adv, mask = loss_batch(seed)
        ref, clipfrac, kl, lower, _ = compute_gppo_loss_general_beta(
            old, log_prob, adv, mask, 0.2, low, high, c, mode, beta1, beta2
        )
        ours, metrics = ce_gppo_loss(
            log_prob,
            old,
            adv,
            mask,
            clip_low=low,
            clip_high=high,
            clip_ratio_c=c,
            beta1=beta1,
            beta2=beta2,
            loss_agg_mode=mode,
        )
        assert metrics["ce_gppo_low_frac"] + metrics["ce_gppo_high_frac"] > 0  # both paths run
        torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(grad_of(ours, log_prob), grad_of(ref, log_prob))
        assert metrics["pg_clipfrac"] == pytest.approx(clipfrac.item(), rel=1e-7)
        assert metrics["pg_clipfrac_lower"] == pytest.approx(lower.item(), rel=1e-7)
        assert metrics["ppo_kl"] == pytest.approx(kl.item(), rel=1e-7)


# --------------------------------------------------------------------------------------------------
# EntroPIC


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alpha", [0.7, -0.4, 1.0])
def test_entropic_matches_the_authors_loss_and_gradient(mode, alpha):
    config = {
        "clip_ratio": 0.2,
        "clip_ratio_low": 0.2,
        "clip_ratio_high": 0.28,
        "clip_ratio_c": 3.0,
    }
    namespace = SimpleNamespace(**config, get=config.get)
    for seed in range(4):
        log_prob, old, adv, mask = loss_batch(seed, spread=0.3)
        ref, clipfrac, kl, lower = compute_policy_loss_entropic(
            old, log_prob, adv, mask, control_alpha=alpha, loss_agg_mode=mode, config=namespace
        )
        ours, metrics = entropic_loss(
            log_prob,
            old,
            adv,
            mask,
            alpha=alpha,
            clip_high=0.28,
            loss_agg_mode=mode,
        )
        assert metrics["entropic_high_prob_frac"] > 0
        torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(grad_of(ours, log_prob), grad_of(ref, log_prob))
        assert metrics["pg_clipfrac"] == pytest.approx(clipfrac.item(), rel=1e-7)
        assert metrics["pg_clipfrac_lower"] == pytest.approx(lower.item(), rel=1e-7, abs=1e-12)
        assert metrics["ppo_kl"] == pytest.approx(kl.item(), rel=1e-7)


def test_entropic_with_no_high_probability_token_is_ppo_as_the_authors():
    log_prob, old, adv, mask = loss_batch(0)
    namespace = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None)
    namespace.get = lambda key, default: default
    ref, *_ = compute_policy_loss_entropic(
        old, log_prob, adv, mask, high_prob_thresh=0.999, control_alpha=0.5, config=namespace
    )
    ours, metrics = entropic_loss(log_prob, old, adv, mask, alpha=0.5, high_prob_threshold=0.999)
    assert metrics["entropic_term"] == 0.0
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-12)


def test_entropic_controller_matches_the_authors_with_one_micro_batch_per_step():
    """Their run: one mini-batch per step (ppo_mini_batch_size = train_batch_size); with one
    micro-batch the micro-batch's entropy is the step's, and the alphas are the same."""
    entropies = [0.9, 0.7, 0.45, 0.3, 0.12, 0.05, 0.02, 0.08, 0.15, 0.11, 0.09] + [0.5] * 150
    reference = EntroPICActorControl(0.1, 1.0, 0.01, ppo_mini_batch_size=512)
    ours = EntroPICController(EntroPICSettings())
    for h in entropies:
        expected = reference.control_alpha(h, rows=512)
        ours.update({"token_mean": h, "seq_mean_token_mean": -1.0})
        assert ours.alpha == pytest.approx(float(expected), rel=1e-12, abs=1e-15)
        assert ours.integral == pytest.approx(reference.accumulate_entropy_error, rel=1e-12)
    assert ours.alpha == 1.0  # the integral has driven the signal to the clip


# --------------------------------------------------------------------------------------------------
# QAE and pass@k


def binary_groups(seed, groups=6, size=8):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 1, groups)
    rewards = (rng.uniform(size=(groups, size)) < p[:, None]).astype(float).reshape(-1)
    rewards[:size] = 0.0  # an all-wrong group
    rewards[size : 2 * size] = 1.0  # an all-right group
    return rewards, np.repeat(np.arange(groups), size)


@pytest.mark.parametrize("quantile", [0.4, 0.2, 0.75])
@pytest.mark.parametrize("norm", [True, False])
def test_qae_matches_the_authors_estimator(quantile, norm):
    for seed in range(5):
        rewards, index = binary_groups(seed)
        rewards[-1] = 0.5  # not only 0/1
        mask = torch.ones(len(rewards), 3)
        ref, _ = compute_grpo_outcome_advantage_qae(
            torch.tensor(rewards)[:, None] * torch.tensor([1.0, 0.0, 0.0]),
            mask.to(torch.float64),
            index,
            norm_adv_by_std_in_grpo=norm,
            config={"quantile_k": quantile},
        )
        ours = qae_advantages(
            torch.tensor(rewards), torch.tensor(index), quantile=quantile, norm_by_std=norm
        )
        torch.testing.assert_close(ours, ref[:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_passk_matches_the_authors_estimator(k):
    for seed in range(5):
        rewards, index = binary_groups(seed)
        mask = torch.ones(len(rewards), 2, dtype=torch.float64)
        ref, _ = compute_advantage(torch.tensor(rewards)[:, None] * mask / 2, mask, index, k)
        ours = passk_advantages(torch.tensor(rewards), torch.tensor(index), k=k)
        torch.testing.assert_close(ours, ref[:, 0], rtol=1e-9, atol=1e-9)
