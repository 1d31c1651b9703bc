"""Advantages, sampling filters and advantage shaping (algorithms.md §6, §7, §8).

Expected values are worked out by hand or by plain numpy loops written here, never by the code under
test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from entroprl.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    _iqr_inliers,
    _kept_moments,
    compute_advantages,
    dr_grpo_advantages,
    dynamic_sampling_mask,
    grpo_advantages,
    lopti_split,
    low_prob_reweight,
    overlong_penalty,
    passk_advantages,
    position_shaping,
    ppl_shaping,
    qae_advantages,
    register_advantage_estimator,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from entroprl.errors import SettingError

F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def ids(values):
    return torch.tensor(values, dtype=torch.int64)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- numpy references (loops)


def ref_group_members(gids, i):
    return [j for j in range(len(gids)) if gids[j] == gids[i]]


def ref_grpo(r, gids, eps=1e-6):
    out = np.zeros(len(r))
    for i in range(len(r)):
        vals = np.array([r[j] for j in ref_group_members(gids, i)])
        if len(vals) == 1:
            out[i] = (r[i] - 0.0) / (1.0 + eps)
        else:
            out[i] = (r[i] - vals.mean()) / (vals.std(ddof=1) + eps)
    return out


def ref_rloo(r, gids):
    out = np.zeros(len(r))
    for i in range(len(r)):
        others = [r[j] for j in ref_group_members(gids, i) if j != i]
        out[i] = r[i] - np.mean(others) if others else 0.0
    return out


def ref_centered(r, gids):
    out = np.zeros(len(r))
    for i in range(len(r)):
        vals = [r[j] for j in ref_group_members(gids, i)]
        out[i] = r[i] - (np.mean(vals) if len(vals) > 1 else 0.0)
    return out


def ref_qae(r, gids, quantile=0.4, eps=1e-6):
    """numpy's linear quantile (its default method) as the baseline, GRPO's std."""
    out = np.zeros(len(r))
    for i in range(len(r)):
        vals = np.array([r[j] for j in ref_group_members(gids, i)])
        if len(vals) == 1:
            out[i] = r[i] / (1.0 + eps)
        else:
            out[i] = (r[i] - np.quantile(vals, quantile)) / (vals.std(ddof=1) + eps)
    return out


def ref_rpp_tokens(r, gids, mask, eps=1e-8):
    s = ref_centered(r, gids)
    flat = np.concatenate([[s[i]] * int(mask[i].sum()) for i in range(len(r))])
    var = flat.var(ddof=1) if flat.size > 1 else 0.0
    out = np.zeros(mask.shape)
    for i in range(mask.shape[0]):
        for k in range(mask.shape[1]):
            if mask[i, k]:
                out[i, k] = (s[i] - flat.mean()) / math.sqrt(var + eps)
    return out


def ref_ppl(adv, old, mask, gids, alpha):
    lp = {}
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        if n:
            lp[i] = -sum(old[i, k] for k in range(mask.shape[1]) if mask[i, k]) / n
    out = adv.copy()
    for i in lp:
        vals = np.array([lp[j] for j in ref_group_members(gids, i) if j in lp])
        q1, q3 = np.quantile(vals, [0.25, 0.75])
        iqr = q3 - q1
        kept = vals[(vals >= q1 - 1.5 * iqr) & (vals <= q3 + 1.5 * iqr)]
        if kept.size == 0:
            kept = vals
        std = kept.std()
        std = 1.0 if std < 1e-6 else std
        w = (lp[i] - kept.mean()) / std
        factor = min(max(1.0 - alpha * w, 0.8), 1.2)
        for k in range(mask.shape[1]):
            if mask[i, k]:
                out[i, k] = adv[i, k] * factor
    return out


def ref_position(adv, mask, alpha):
    out = adv.copy()
    for i in range(mask.shape[0]):
        length = int(mask[i].sum())
        c = 0
        for k in range(mask.shape[1]):
            if not mask[i, k]:
                continue
            c += 1
            b = alpha * sigmoid(15.0 * ((c - 1) / length - 0.5))
            a = adv[i, k]
            b = min(b, 0.5 * abs(a))
            out[i, k] = a + (b if a > 0 else -b if a < 0 else 0.0)
    return out


# ---------------------------------------------------------------- algorithms.md §6: estimators


def test_grpo_hand_groups_unbiased_std_and_group_of_one():
    # Non-contiguous groups of sizes 4, 2 and 1.
    rewards = t([1.0, 0.0, 0.0, 1.0, 1.0, 0.7, 0.0])
    gids = ids([7, 3, 7, 7, 3, 9, 7])
    a = grpo_advantages(rewards, gids)
    # group 7 = {1, 0, 1, 0}: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3).
    s7 = math.sqrt(1 / 3) + 1e-6
    # group 3 = {0, 1}: mean 0.5, unbiased std sqrt(0.5).
    s3 = math.sqrt(0.5) + 1e-6
    expected = [0.5 / s7, -0.5 / s3, -0.5 / s7, 0.5 / s7, 0.5 / s3, 0.7 / (1 + 1e-6), -0.5 / s7]
    torch.testing.assert_close(a, t(expected), rtol=1e-12, atol=1e-12)


def test_grpo_keeps_float32_dtype_and_eps():
    a = grpo_advantages(torch.tensor([2.0, 2.0, 5.0], dtype=torch.float32), ids([0, 0, 1]), eps=0.5)
    assert a.dtype == torch.float32
    # equal rewards: 0 / (0 + eps); group of one: 5 / (1 + eps)
    torch.testing.assert_close(a, torch.tensor([0.0, 0.0, 5.0 / 1.5]))


def test_dr_grpo_hand():
    a = dr_grpo_advantages(t([3.0, 2.5, 5.0, 10.0]), ids([1, 4, 1, 1]))
    torch.testing.assert_close(a, t([-3.0, 2.5, -1.0, 4.0]))


def test_rloo_hand_group_and_group_of_one():
    rewards = t([1.0, 0.0, 3.0, 0.0, 1.0, 5.0, 10.0, 4.0])
    gids = ids([0, 0, 1, 0, 0, 1, 1, 2])
    a = rloo_advantages(rewards, gids)
    # group 0 = {1, 0, 0, 1}: 1 - 1/3, 0 - 2/3; group 1 = {3, 5, 10}: 3 - 7.5, 5 - 6.5, 10 - 4.
    expected = [2 / 3, -2 / 3, -4.5, -2 / 3, 2 / 3, -1.5, 6.0, 0.0]
    torch.testing.assert_close(a, t(expected))


def test_reinforce_pp_response_level_whitening_hand():
    rewards = t([1.0, 3.0, 2.0, 2.0, 8.0])
    gids = ids([0, 0, 1, 1, 1])
    a = reinforce_pp_baseline_advantages(rewards, gids)
    # centred scores -1, 1, -2, -2, 4: mean 0, unbiased var (1+1+4+4+16)/4 = 6.5
    expected = t([-1.0, 1.0, -2.0, -2.0, 4.0]) / math.sqrt(6.5 + 1e-8)
    torch.testing.assert_close(a, expected)
    assert a.shape == (5,)


def test_reinforce_pp_token_weighted_whitening_hand():
    rewards = t([1.0, 3.0, 2.0, 2.0, 8.0])
    gids = ids([0, 0, 1, 1, 1])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.int64)
    a = reinforce_pp_baseline_advantages(rewards, gids, mask)
    # tokens carry -1, -1, 1, -2, -2, -2, 4: mean -3/7, unbiased variance over 7 tokens
    tokens = np.array([-1, -1, 1, -2, -2, -2, 4], dtype=float)
    mean = -3 / 7
    var = ((tokens - mean) ** 2).sum() / 6
    scale = 1 / math.sqrt(var + 1e-8)
    s = [-1.0, 1.0, -2.0, -2.0, 4.0]
    expected = t([[(s[i] - mean) * scale * m for m in row] for i, row in enumerate(mask.tolist())])
    torch.testing.assert_close(a, expected)


def test_reinforce_pp_single_element_is_zero_not_nan():
    a = reinforce_pp_baseline_advantages(t([3.0]), ids([0]))
    torch.testing.assert_close(a, t([0.0]))
    mask = torch.tensor([[0, 1], [0, 0]])
    a = reinforce_pp_baseline_advantages(t([3.0, 1.0]), ids([0, 1]), mask)
    torch.testing.assert_close(a, torch.zeros(2, 2, dtype=F64))


def test_compute_advantages_broadcasts_to_valid_tokens():
    rewards = t([1.0, 0.0, 0.0, 1.0, 0.5])
    gids = ids([0, 0, 0, 0, 1])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 1]])
    for name, ref in [("grpo", ref_grpo), ("dr_grpo", ref_centered), ("rloo", ref_rloo)]:
        scalar = ref(rewards.tolist(), gids.tolist())
        expected = t([[scalar[i] * m for m in row] for i, row in enumerate(mask.tolist())])
        torch.testing.assert_close(compute_advantages(name, rewards, gids, mask), expected)
    expected = ref_rpp_tokens(rewards.tolist(), gids.tolist(), mask.numpy())
    out = compute_advantages("reinforce_pp_baseline", rewards, gids, mask)
    torch.testing.assert_close(out, torch.from_numpy(expected))
    builtin = {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "qae", "passk"}
    assert set(ADVANTAGE_ESTIMATORS) == builtin


# ---------------------------------------------------------------- algorithms.md §6.8, §6.9: QAE and
# pass@k (the authors' code is run in tests/test_method_references.py)


def test_qae_binary_groups_by_hand():
    # G = 8, K = 0.4: the quantile sits at position 0.4 * 7 = 2.8 of the sorted rewards
    rewards = t([1, 1, 0, 0, 0, 0, 0, 0] + [1, 1, 1, 1, 1, 0, 0, 0] + [1] * 7 + [0])
    gids = ids([0] * 8 + [1] * 8 + [2] * 8)
    out = qae_advantages(rewards, gids)
    std2, std5, std7 = (math.sqrt(c * (8 - c) / 56) for c in (2, 5, 7))
    # 2 right: baseline 0, failures get 0; 5 right: 0 + 0.8 * (1 - 0) = 0.8; 7 right: baseline 1
    expected = [1 / (std2 + 1e-6)] * 2 + [0.0] * 6
    expected += [0.2 / (std5 + 1e-6)] * 5 + [-0.8 / (std5 + 1e-6)] * 3
    expected += [0.0] * 7 + [-1 / (std7 + 1e-6)]
    torch.testing.assert_close(out, t(expected))
    centered = qae_advantages(rewards, gids, norm_by_std=False)
    torch.testing.assert_close(centered[8:16], t([0.2] * 5 + [-0.8] * 3))
    # a group of one: baseline 0 and std 1, as GRPO's
    torch.testing.assert_close(qae_advantages(t([0.5]), ids([3])), t([0.5 / (1 + 1e-6)]))


def test_qae_float32_and_settings_are_checked():
    out = qae_advantages(t([0.0, 1.0, 1.0], dtype=torch.float32), ids([0, 0, 0]), quantile=0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-1.7320499, 0.0, 0.0]), rtol=1e-6, atol=1e-6)
    for bad in (0.0, 1.0, math.nan):
        with pytest.raises(SettingError, match="quantile"):
            qae_advantages(t([0.0, 1.0]), ids([0, 0]), quantile=bad)


def ref_passk_enumerated(r, k):
    """The expectation the analytical form replaces: every draw of k of the group scores its best
    response; GRPO-normalise the C(G, k) scores (population std); a response's advantage is the
    mean over the draws that contain it."""
    from itertools import combinations

    draws = list(combinations(range(len(r)), k))
    scores = np.array([max(r[j] for j in d) for d in draws], dtype=float)
    mean, std = scores.mean(), scores.std()
    normalised = (scores - mean) / (std + 1e-6)
    pairs = list(zip(normalised, draws, strict=True))
    return [np.mean([a for a, d in pairs if i in d]) for i in range(len(r))]


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_passk_is_the_mean_over_all_draws_of_k(k):
    groups = [[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]]
    groups += [[0] * 8, [1] * 8]
    rewards = t([v for g in groups for v in g])
    gids = ids([i for i, g in enumerate(groups) for _ in g])
    expected = [a for g in groups for a in ref_passk_enumerated(g, k)]
    torch.testing.assert_close(passk_advantages(rewards, gids, k=k), t(expected), atol=1e-9, rtol=0)


def test_passk_k1_is_grpo_with_the_population_std():
    rewards = t([1, 0, 0, 1, 1, 0, 1, 1, 1])
    gids = ids([0, 0, 0, 0, 0, 1, 1, 1, 1])
    expected = []
    for g in (rewards[:5].numpy(), rewards[5:].numpy()):
        expected += list((g - g.mean()) / (g.std() + 1e-6))
    torch.testing.assert_close(passk_advantages(rewards, gids, k=1), t(expected))


def test_passk_rejects_non_binary_rewards_and_small_groups():
    with pytest.raises(ValueError, match="rewards must be 0 or 1"):
        passk_advantages(t([1.0, 0.5, 0.0, 0.0]), ids([0, 0, 0, 0]), k=2)
    with pytest.raises(ValueError, match="k=4 exceeds the size of a group"):
        passk_advantages(t([1.0, 0.0, 0.0]), ids([0, 0, 0]), k=4)
    with pytest.raises(SettingError, match="k"):
        passk_advantages(t([1.0, 0.0]), ids([0, 0]), k=0)
    with pytest.raises(ValueError, match="rewards must be 0 or 1"):
        compute_advantages("passk", t([0.5, 1.0]), ids([0, 0]), torch.ones(2, 2))


def test_estimator_settings_reach_the_estimator_and_plugins_register():
    rewards, gids, mask = t([1.0, 0.0, 0.0, 0.0]), ids([0] * 4), torch.ones(4, 2)
    settings = ADVANTAGE_ESTIMATORS["qae"].settings(quantile=0.9, norm_by_std=False)
    out = compute_advantages("qae", rewards, gids, mask, settings=settings)
    # the 0.9-quantile of [0, 0, 0, 1] is 0 + 0.7 * 1
    torch.testing.assert_close(out, t([[0.3] * 2, [-0.7] * 2, [-0.7] * 2, [-0.7] * 2]))
    with pytest.raises(SettingError, match="quantile"):
        compute_advantages("qae", rewards, gids, mask, settings=type(settings)(quantile=2.0))

    @register_advantage_estimator("test_constant")
    def constant(rewards, group_ids):
        return torch.full_like(rewards, 2.0)

    try:
        torch.testing.assert_close(
            compute_advantages("test_constant", rewards, gids, mask), 2.0 * mask.to(F64)
        )
        with pytest.raises(ValueError, match="already registered"):
            register_advantage_estimator("grpo")(constant)
    finally:
        del ADVANTAGE_ESTIMATORS["test_constant"]


# ---------------------------------------------------------------- algorithms.md §6: sampling and
# overlong


def test_dynamic_sampling_ties_and_groups_of_one():
    rewards = t([1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    gids = ids([0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 4])
    keep = dynamic_sampling_mask(rewards, gids)
    assert keep.dtype == torch.bool
    # group 0 all 1, group 2 single, group 3 all 0: dropped; groups 1 and {1, 1, 0} kept
    assert keep.tolist() == [False, False, True, True, False, False, False, False, True, True, True]


def test_dynamic_sampling_non_contiguous_groups():
    keep = dynamic_sampling_mask(t([0.0, 2.0, 1.0, 2.0]), ids([5, 8, 5, 8]))
    assert keep.tolist() == [True, False, True, False]


def test_overlong_penalty_boundaries():
    lengths = torch.tensor([0, 15, 16, 17, 18, 20])
    p = overlong_penalty(lengths, max_length=20, buffer=4)
    # expected length 16: 0 up to it, then -1/4 per extra token, -1 at 20
    torch.testing.assert_close(p, torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -1.0]))
    p = overlong_penalty(lengths.to(F64), max_length=20, buffer=4, factor=2.0)
    assert p.dtype == F64
    torch.testing.assert_close(p, t([0.0, 0.0, 0.0, -0.5, -1.0, -2.0]))
    # buffer equal to max_length is allowed: the penalty starts at length 0
    p = overlong_penalty(torch.tensor([0, 2, 4]), max_length=4, buffer=4)
    torch.testing.assert_close(p, torch.tensor([0.0, -0.5, -1.0]))


@pytest.mark.parametrize("buffer", [0, -1, 21])
def test_overlong_penalty_rejects_bad_buffer(buffer):
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([3]), max_length=20, buffer=buffer)


def test_overlong_penalty_rejects_bad_lengths():
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty(t([3.0, math.nan]), max_length=20, buffer=4)
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty(torch.tensor([-1]), max_length=20, buffer=4)


# ---------------------------------------------------------------- algorithms.md §7: PPL shaping


def make_ppl_batch(lps, lengths, pad_value=0.0):
    """old_log_prob whose valid tokens average to -lp, with a zero-mean wiggle, right-padded."""
    width = max(max(lengths), 1)
    old = torch.full((len(lps), width), pad_value, dtype=F64)
    mask = torch.zeros(len(lps), width, dtype=torch.int64)
    for i, (lp, n) in enumerate(zip(lps, lengths, strict=True)):
        wiggle = [0.25 * (-1) ** k for k in range(n)]
        if n % 2:
            wiggle[-1] = 0.0
        old[i, :n] = t([-lp + w for w in wiggle])
        mask[i, :n] = 1
    return old, mask


def test_ppl_outlier_excluded_from_stats_but_weighted_both_signs():
    lps = [1.0, 1.1, 1.2, 1.3, 10.0]
    old, mask = make_ppl_batch(lps, [2, 3, 4, 1, 2])
    adv_scalar = [1.0, -1.0, 2.0, -2.0, 1.0]
    adv = t(adv_scalar)[:, None] * mask
    out = ppl_shaping(adv, old, mask, ids([0] * 5), alpha=0.001)
    # q1 = 1.1, q3 = 1.3, fences [0.8, 1.6]: 10 is out. Inliers: mean 1.15, population std
    # sqrt((0.15^2 + 0.05^2) * 2 / 4) = sqrt(0.0125).
    std = math.sqrt(0.0125)
    factors = [1 - 0.001 * (lp - 1.15) / std for lp in lps]
    assert 0.8 < factors[4] < 0.95  # the outlier's own weight, (10 - 1.15)/std = 79.2 std away
    expected = t([[adv_scalar[i] * factors[i] * m for m in row] for i, row in enumerate(mask)])
    torch.testing.assert_close(out, expected)
    # low perplexity -> larger |A| for both signs
    assert out[0, 0] > 1.0 and out[1, 0] < -1.0 and abs(out[3, 0]) < 2.0


def test_ppl_std_below_floor_replaced_by_one():
    lps = [2.0, 2.0, 2.0, 2.0, 5.0, 3.0, 3.0, 3.0]
    old, mask = make_ppl_batch(lps, [1, 2, 3, 2, 1, 2, 2, 2])
    adv = mask.to(F64)
    out = ppl_shaping(adv, old, mask, ids([0, 0, 0, 0, 0, 1, 1, 1]), alpha=0.01)
    # group 0: q1 = q3 = 2, fences [2, 2]; kept std 0 -> 1, mean 2; w(5) = 3 -> factor 0.97.
    # group 1: constant, w = 0 everywhere.
    expected = mask.to(F64).clone()
    expected[4] *= 0.97
    torch.testing.assert_close(out, expected)


def test_ppl_clamps_at_08_and_12():
    old, mask = make_ppl_batch([0.0, 1.0], [2, 2])
    adv = t([[-3.0, -3.0], [-3.0, -3.0]])
    out = ppl_shaping(adv, old, mask, ids([4, 4]), alpha=1.0)
    # mean 0.5, population std 0.5: w = -1, 1 -> 1 - w = 2 and 0, clamped to 1.2 and 0.8
    torch.testing.assert_close(out, t([[-3.6, -3.6], [-2.4, -2.4]]))


def test_ppl_groups_of_different_sizes_empty_response_and_padding():
    # group 2: {1, 3, empty}; group 0: {0.5}; the empty response's junk old_logp must not count.
    old, mask = make_ppl_batch([1.0, 0.5, 3.0, 0.0], [2, 1, 3, 0])
    old[3] = -100.0
    adv = t([[1.0, 1.0, 7.0], [2.0, 7.0, 7.0], [-1.0, -1.0, -1.0], [7.0, 7.0, 7.0]])
    out = ppl_shaping(adv, old, mask, ids([2, 0, 2, 2]), alpha=0.01)
    # group 2 over {1, 3}: q1 1.5, q3 2.5, fences [0, 4]; mean 2, std 1; w = -1, +1.
    # group 0 single: std 0 -> 1, w = 0. Padding (7.0) unchanged.
    expected = t([[1.01, 1.01, 7.0], [2.0, 7.0, 7.0], [-0.99, -0.99, -0.99], [7.0, 7.0, 7.0]])
    torch.testing.assert_close(out, expected)


def test_ppl_matches_numpy_reference_on_random_groups():
    gen = torch.Generator().manual_seed(0)
    b, width = 40, 9
    old = -torch.rand(b, width, generator=gen, dtype=F64) * 4
    old[::7] *= 6  # a few high-perplexity outliers
    mask = (torch.rand(b, width, generator=gen) < 0.8).to(torch.int64)
    mask[5] = 0
    adv = torch.randn(b, width, generator=gen, dtype=F64) * mask
    gids = torch.randint(0, 6, (b,), generator=gen)
    out = ppl_shaping(adv, old, mask, gids, alpha=0.05)
    expected = ref_ppl(adv.numpy(), old.numpy(), mask.numpy().astype(bool), gids.tolist(), 0.05)
    torch.testing.assert_close(out, torch.from_numpy(expected))


def test_kept_moments_all_excluded_falls_back_to_all():
    nan = math.nan
    padded = t([[1.0, 3.0, nan], [1.0, 3.0, nan], [4.0, 4.0, 4.0], [nan, nan, nan]])
    keep = torch.tensor(
        [[False, False, False], [True, False, False], [True, True, False], [False] * 3]
    )
    mean, std = _kept_moments(padded, keep)
    # row 0 keeps nothing -> all of {1, 3}: mean 2, population std 1; row 1: {1}, std 0 -> 1;
    # row 2: {4, 4} std 0 -> 1; row 3 has no entry at all: mean 0, std 1.
    torch.testing.assert_close(mean, t([2.0, 1.0, 4.0, 0.0]))
    torch.testing.assert_close(std, t([1.0, 1.0, 1.0, 1.0]))


def test_iqr_inliers_hand():
    nan = math.nan
    padded = t([[1.0, 1.1, 1.2, 1.3, 10.0], [2.0, 2.0, 2.0, 2.0, 5.0], [0.0, 1.0, nan, nan, nan]])
    keep = _iqr_inliers(padded)
    assert keep.tolist() == [
        [True, True, True, True, False],
        [True, True, True, True, False],
        [True, True, False, False, False],
    ]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(-40, 40), min_size=1, max_size=9))
def test_iqr_fences_always_keep_someone(values):
    # Why algorithms.md §7's "all left out" fallback cannot trigger on finite values (see
    # _iqr_inliers).
    padded = t([[v / 8 for v in values] + [math.nan]])
    assert bool(_iqr_inliers(padded).any())


# ---------------------------------------------------------------- algorithms.md §7: position
# shaping


def test_position_shaping_hand_left_pad_holes_zero_advantage_and_cap():
    a = 0.05
    b = [a * sigmoid(15 * (p - 0.5)) for p in (0.0, 0.25, 0.5, 0.75)]
    mask = torch.tensor(
        [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]]
    )
    adv = t(
        [
            [1.0, 1.0, 1.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, -1.0, -1.0, -1.0, -1.0],
            [0.02, 5.0, 0.0, 5.0, -0.02, 0.3],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    out = position_shaping(adv, mask, alpha=a)
    expected = t(
        [
            [1 + b[0], 1 + b[1], 1 + b[2], 1 + b[3], 0.0, 0.0],
            [0.0, 0.0, -1 - b[0], -1 - b[1], -1 - b[2], -1 - b[3]],
            # holes keep 5.0; A = 0 unchanged; b[2] = 0.025 capped at 0.5*0.02 = 0.01
            [0.02 + b[0], 5.0, 0.0, 5.0, -0.02 - 0.01, 0.3 + b[3]],
            [0.0] * 6,
        ]
    )
    assert b[2] > 0.01 and b[0] < 0.01  # the cap binds only where claimed
    torch.testing.assert_close(out, expected)


def test_position_shaping_single_token_and_rejects_negative_alpha():
    out = position_shaping(t([[0.0, 2.0]]), torch.tensor([[0, 1]]), alpha=0.1)
    torch.testing.assert_close(out, t([[0.0, 2.0 + 0.1 * sigmoid(-7.5)]]))
    with pytest.raises(ValueError, match="alpha"):
        position_shaping(t([[1.0]]), torch.tensor([[1]]), alpha=-0.1)


# ---------------------------------------------------------------- algorithms.md §8


def test_low_prob_reweight_hand():
    old = t([[math.log(0.5), 0.0, math.log(0.1)]])
    adv = t([[2.0, -1.0, 3.0]])
    torch.testing.assert_close(low_prob_reweight(adv, old, alpha=0.3), t([[1.7, -1.0, 3 * 0.73]]))
    torch.testing.assert_close(low_prob_reweight(adv, old, alpha=0.1), t([[1.9, -1.0, 3 * 0.91]]))
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            low_prob_reweight(adv, old, alpha=alpha)


def test_lopti_split_hand():
    old = torch.log(t([[0.9, 0.4, 0.6, 0.1], [0.2, 0.7, 0.3, 0.55]]))
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    low, rest = lopti_split(old, mask)
    assert low.tolist() == [[False, True, False, False], [False, False, True, False]]
    assert rest.tolist() == [[True, False, True, False], [False, True, False, True]]
    low, _ = lopti_split(old, mask, eta=0.65)
    assert low.tolist() == [[False, True, True, False], [False, False, True, True]]
    # strict: a token with probability exactly eta is not low
    low, rest = lopti_split(t([[0.0, -0.1]]), torch.tensor([[1, 1]]), eta=1.0)
    assert low.tolist() == [[False, True]] and rest.tolist() == [[True, False]]


# ---------------------------------------------------------------- properties


@st.composite
def batches(draw):
    b = draw(st.integers(1, 6))
    width = draw(st.integers(1, 5))
    mask = draw(
        st.lists(st.lists(st.booleans(), min_size=width, max_size=width), min_size=b, max_size=b)
    )
    gids = draw(st.lists(st.integers(0, 3), min_size=b, max_size=b))
    rewards = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.25]), min_size=b, max_size=b))
    logp = draw(st.lists(st.integers(-80, 0), min_size=b * width, max_size=b * width))
    adv = draw(st.lists(st.integers(-24, 24), min_size=b * width, max_size=b * width))
    mask_t = torch.tensor(mask, dtype=torch.int64)
    adv_t = t(adv).reshape(b, width) / 8 * mask_t
    return t(rewards), ids(gids), mask_t, t(logp).reshape(b, width) / 8, adv_t


@settings(max_examples=120, deadline=None)
@given(batches())
def test_estimators_property_finite_zero_padding_match_reference(batch):
    rewards, gids, mask, _, _ = batch
    refs = {"grpo": ref_grpo, "dr_grpo": ref_centered, "rloo": ref_rloo, "qae": ref_qae}
    for name in ADVANTAGE_ESTIMATORS:
        if name == "passk":  # needs 0/1 rewards and groups of k: test_passk_*
            continue
        if name == "reinforce_pp_baseline" and not mask.any():
            with pytest.raises(ValueError, match="response_mask"):
                compute_advantages(name, rewards, gids, mask)
            continue
        out = compute_advantages(name, rewards, gids, mask)
        assert out.shape == mask.shape
        assert torch.isfinite(out).all()
        assert (out[mask == 0] == 0).all()
        if name in refs:
            scalar = refs[name](rewards.tolist(), gids.tolist())
            expected = torch.from_numpy(np.asarray(scalar))[:, None] * mask
        else:
            expected = torch.from_numpy(ref_rpp_tokens(rewards.tolist(), gids.tolist(), mask))
        torch.testing.assert_close(out, expected)


@settings(max_examples=120, deadline=None)
@given(batches())
def test_shaping_property_finite_padding_unchanged_match_reference(batch):
    rewards, gids, mask, old, adv = batch
    valid = mask.bool()
    out = ppl_shaping(adv, old, mask, gids, alpha=0.05)
    assert torch.isfinite(out).all() and (out[~valid] == 0).all()
    expected = ref_ppl(adv.numpy(), old.numpy(), valid.numpy(), gids.tolist(), 0.05)
    torch.testing.assert_close(out, torch.from_numpy(expected))

    out = position_shaping(adv, mask, alpha=0.1)
    assert torch.isfinite(out).all() and (out[~valid] == 0).all()
    assert (torch.sign(out) == torch.sign(adv)).all()
    assert (out.abs() >= adv.abs()).all() and (out.abs() <= 1.5 * adv.abs() + 1e-12).all()
    torch.testing.assert_close(out, torch.from_numpy(ref_position(adv.numpy(), valid.numpy(), 0.1)))

    low, rest = lopti_split(old, mask, eta=0.5)
    assert not (low & rest).any() and ((low | rest) == valid).all()
    assert (old[low] < math.log(0.5)).all() and (old[rest] >= math.log(0.5)).all()

    keep = dynamic_sampling_mask(rewards, gids)
    for i in range(len(rewards)):
        group = [rewards[j].item() for j in ref_group_members(gids.tolist(), i)]
        assert bool(keep[i]) == (len(set(group)) > 1)


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    r, g = t([1.0, 0.0]), ids([0, 0])
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        grpo_advantages(r, ids([0, 0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        grpo_advantages(t([1.0, math.nan]), g)
    with pytest.raises(ValueError, match="NaN"):
        rloo_advantages(t([math.inf, 0.0]), g)
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'.*grpo"):
        compute_advantages("ppo", r, g, mask)
    with pytest.raises(ValueError, match="rows"):
        compute_advantages("grpo", r, g, torch.ones(3, 3))
    with pytest.raises(ValueError, match="0 and 1"):
        compute_advantages("grpo", r, g, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="integer"):
        dr_grpo_advantages(r, t([0.0, 0.0]))
    with pytest.raises(ValueError, match="float"):
        dynamic_sampling_mask(ids([1, 0]), g)
    with pytest.raises(ValueError, match="empty"):
        grpo_advantages(t([]), ids([]))
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantages(t([[1.0, 0.0]]), ids([[0, 0]]))
    with pytest.raises(ValueError, match="response_mask"):
        reinforce_pp_baseline_advantages(r, g, torch.zeros(2, 3))
    old = t([[-1.0, math.nan, -1.0], [-1.0, -1.0, -1.0]])
    adv = torch.ones(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="old_log_prob"):
        ppl_shaping(adv, old, mask, g)
    # NaN at padding is ignored
    ppl_shaping(adv, old, t([[1, 0, 1], [1, 1, 1]]), g)
    with pytest.raises(ValueError, match="shape mismatch"):
        ppl_shaping(adv, old[:, :2], mask, g)
    with pytest.raises(ValueError, match="group_ids"):
        ppl_shaping(adv, old, mask, ids([0, 0, 0]))
    with pytest.raises(ValueError, match="shape mismatch"):
        position_shaping(adv, torch.ones(2, 2))
    with pytest.raises(ValueError, match="advantages"):
        position_shaping(t([[math.nan]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="shape mismatch"):
        low_prob_reweight(adv, old[:1])
    with pytest.raises(ValueError, match="eta"):
        lopti_split(adv, mask, eta=0.0)
