"""Tests of entroprl.algos.losses against hand values and numpy loops written here (algorithms.md
§3, §4, 5)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings, strategies as st

from entroprl.algos.dynamics import token_covariance
from entroprl.algos.losses import (
    POLICY_LOSSES,
    AdaptiveEntropyCoef,
    EntroPICController,
    EntroPICSettings,
    LossDenominators,
    SettingError,
    aggregate_loss,
    ce_gppo_loss,
    clip_cov_loss,
    clip_cov_select,
    entropic_loss,
    entropy_bonus,
    get_policy_loss,
    high_entropy_mask,
    kl_cov_loss,
    kl_cov_select,
    kl_penalty,
    loss_denominators,
    ppo_loss,
    register_policy_loss,
)
from entroprl.train import distributed

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSSES = ["ppo", "clip_cov", "kl_cov", "ce_gppo", "entropic"]
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def assert_values(tensor: torch.Tensor, expected) -> None:
    torch.testing.assert_close(tensor, t64(expected), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Independent references: numpy loops over rows and tokens


def np_agg(loss, mask, mode, norm_constant=None):
    loss, mask = np.asarray(loss, float), np.asarray(mask, bool)
    rows = [[loss[i, t] for t in range(mask.shape[1]) if mask[i, t]] for i in range(mask.shape[0])]
    nonempty = [r for r in rows if r]
    if mode == "token-mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in nonempty) / len(nonempty)
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in nonempty) / len(nonempty)
    c = mask.shape[1] if norm_constant is None else norm_constant
    return sum(sum(r) for r in rows) / c


def np_ppo_token(lp, old, a, lo=0.2, hi=0.2, c=3.0):
    """One token's PPO loss and its (clipped, dual-clipped) flags."""
    r = math.exp(min(max(lp - old, -20.0), 20.0))
    l1, l2 = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
    loss = max(l1, l2)
    lower = a < 0 and loss > -a * c
    if a < 0:
        loss = min(loss, -a * c)
    return loss, l2 > l1, lower


def np_cov(lp, adv, mask):
    lp, adv, mask = np.asarray(lp, float), np.asarray(adv, float), np.asarray(mask, bool)
    mean_lp, mean_a = lp[mask].mean(), adv[mask].mean()
    return np.where(mask, (lp - mean_lp) * (adv - mean_a), 0.0)


def np_clip_cov_candidates(lp, old, adv, mask, lb, ub, *, slack=0.0):
    """Valid, not PPO-clipped tokens with lb - slack < cov < ub + slack (slack < 0 shrinks)."""
    ratio = np.exp(lp - old)
    l1, l2 = -adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)
    cov = np_cov(lp, adv, mask)
    return mask & ~(l2 > l1) & (cov > lb - slack) & (cov < ub + slack)


def floor_count(fraction, n):
    return math.floor(Fraction(str(fraction)) * n)


def np_top(scores, mask, k):
    """Flat indices of the k largest valid scores, ties to the lowest flat index."""
    flat = np.flatnonzero(np.asarray(mask, bool))
    values = np.asarray(scores, float).reshape(-1)[flat]
    order = np.argsort(-values, kind="stable")
    out = np.zeros(np.asarray(mask).size, bool)
    out[flat[order[:k]]] = True
    return out.reshape(np.asarray(mask).shape)


# --------------------------------------------------------------------------------------------------
# Strategies and batches


@st.composite
def masks(draw, max_rows: int = 6, max_len: int = 7) -> np.ndarray:
    """0/1 masks with at least one valid token: random, with empty rows, one token, or one row."""
    b, t = draw(st.integers(1, max_rows)), draw(st.integers(1, max_len))
    kind = draw(st.sampled_from(["random", "empty_rows", "one_token", "one_row"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "one_token":
        mask = np.zeros((b, t), bool)
        mask[rng.integers(b), rng.integers(t)] = True
        return mask
    mask = rng.random((b, t)) < 0.7
    if kind == "empty_rows":
        mask[rng.random(b) < 0.5] = False
    elif kind == "one_row":
        keep = rng.integers(b)
        mask[np.arange(b) != keep] = False
    if not mask.any():
        mask[rng.integers(b), rng.integers(t)] = True
    return mask


def random_batch(mask: np.ndarray, seed: int, *, noise: float = 0.3):
    """log_prob, old_log_prob, advantages (float64 numpy), one advantage per response as in GRPO,
    with NaN at padding to check that padding is ignored."""
    rng = np.random.default_rng(seed)
    b, t = mask.shape
    lp = -rng.uniform(0.01, 3.0, (b, t))
    old = lp + noise * rng.standard_normal((b, t))
    adv = np.repeat(rng.standard_normal((b, 1)), t, axis=1)
    for x in (lp, old, adv):
        x[~mask] = np.nan
    return lp, old, adv


def torch_batch(mask, lp, old, adv):
    log_prob = t64(np.nan_to_num(lp)).requires_grad_()
    return log_prob, t64(old), t64(adv), torch.tensor(mask)


FIXED_MASK = np.array(
    [
        [1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
    ],
    bool,
)


# --------------------------------------------------------------------------------------------------
# Aggregation (algorithms.md §5)


def test_aggregate_modes_by_hand():
    loss = t64([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    # 5 valid tokens summing to 27; non-empty rows 0 and 2 with sums 3 and 24, means 1.5 and 8.
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(27 / 5)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(9.5 / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(27 / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(27 / 3)
    fixed_c = LossDenominators(tokens=5, sequences=2, norm_constant=10.0)
    assert aggregate_loss(
        loss, mask, "seq-mean-token-sum-norm", denominators=fixed_c
    ).item() == pytest.approx(2.7)


def test_loss_denominators_by_hand():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.float32)
    assert loss_denominators(mask) == LossDenominators(tokens=5, sequences=2, norm_constant=4.0)
    assert loss_denominators(mask, norm_constant=8192).norm_constant == 8192.0


@PROPERTY
@given(mask=masks(), seed=st.integers(0, 10_000), mode=st.sampled_from(MODES))
def test_aggregate_matches_numpy(mask, seed, mode):
    loss = np.random.default_rng(seed).standard_normal(mask.shape)
    loss[~mask] = np.nan
    got = aggregate_loss(t64(loss), torch.tensor(mask), mode).item()
    assert got == pytest.approx(np_agg(loss, mask, mode), rel=1e-12, abs=1e-12)


@PROPERTY
@given(mask=masks(), seed=st.integers(0, 10_000), mode=st.sampled_from(MODES))
def test_aggregate_micro_batches_sum_to_mini_batch(mask, seed, mode):
    loss = t64(np.random.default_rng(seed).standard_normal(mask.shape))
    m = torch.tensor(mask)
    whole = aggregate_loss(loss, m, mode)
    den = loss_denominators(m)
    for parts in (2, 3):
        chunks = zip(loss.tensor_split(parts), m.tensor_split(parts), strict=True)
        total = sum(aggregate_loss(lc, mc, mode, denominators=den) for lc, mc in chunks)
        assert total.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# PPO (algorithms.md §4)


def test_ppo_by_hand():
    # Tokens: unclipped A>0; clipped high A>0; clipped low A<0; dual clip A<0; log-ratio > 20; pad.
    log_ratio = [0.1, math.log(1.5), math.log(0.5), math.log(5.0), 25.0, 0.0]
    adv = [1.0, 1.0, -1.0, -1.0, -2.0, 7.0]
    old = t64([[-1.0] * 6])
    log_prob = (old + t64([log_ratio])).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    loss, metrics = ppo_loss(log_prob, old, t64([adv]), mask)
    # Per token: -1*e^0.1; -1*1.2 (clip high wins); -(-1)*0.8 (clip low wins); min(5, 3) = 3;
    # ratio clamped to e^20, -(-2)*e^20 = 2e^20 > 6, so the dual clip gives 6.
    per_token = [-math.exp(0.1), -1.2, 0.8, 3.0, 6.0]
    assert loss.item() == pytest.approx(sum(per_token) / 5)
    assert metrics["pg_clipfrac"] == pytest.approx(2 / 5)  # tokens 2 and 3 (L2 > L1)
    assert metrics["pg_clipfrac_lower"] == pytest.approx(2 / 5)  # tokens 4 and 5
    assert metrics["ppo_kl"] == pytest.approx(-sum(log_ratio[:5]) / 5)
    assert metrics["pg_loss"] == pytest.approx(loss.item())
    loss.backward()
    # Only the unclipped token has a gradient: d(-A e^x)/dx = -e^0.1, over 5 tokens.
    assert_values(log_prob.grad, [[-math.exp(0.1) / 5, 0, 0, 0, 0, 0]])


def test_ppo_clip_higher_and_dual_clip_constant():
    old = t64([[0.0, 0.0]])
    log_prob = t64([[math.log(1.25), math.log(4.0)]])
    adv = t64([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    # eps_high 0.28: ratio 1.25 stays unclipped (-1.25); dual clip c = 5: min(4, 5) = 4.
    loss, metrics = ppo_loss(log_prob, old, adv, mask, clip_high=0.28, clip_ratio_c=5.0)
    assert loss.item() == pytest.approx((-1.25 + 4.0) / 2)
    assert metrics["pg_clipfrac_lower"] == 0.0


def test_ppo_clamps_the_log_ratio_at_20():
    # clip_low = 1 lets a tiny ratio through unclipped: the loss shows the clamp at -20.
    old, log_prob = t64([[0.0]]), t64([[-25.0]])
    loss, metrics = ppo_loss(log_prob, old, t64([[-1.0]]), torch.ones(1, 1), clip_low=1.0)
    assert loss.item() == pytest.approx(math.exp(-20.0), rel=1e-9)
    assert metrics["ppo_kl"] == pytest.approx(25.0)


@PROPERTY
@given(mask=masks(), seed=st.integers(0, 10_000), mode=st.sampled_from(MODES))
def test_ppo_matches_numpy(mask, seed, mode):
    lp, old, adv = random_batch(mask, seed, noise=0.5)
    loss, metrics = ppo_loss(*torch_batch(mask, lp, old, adv), loss_agg_mode=mode)
    per_token = np.zeros(mask.shape)
    clipped, lower = [], []
    for i, t in zip(*np.nonzero(mask), strict=True):
        per_token[i, t], c, lo = np_ppo_token(lp[i, t], old[i, t], adv[i, t])
        clipped.append(c)
        lower.append(lo)
    assert loss.item() == pytest.approx(np_agg(per_token, mask, mode), rel=1e-10, abs=1e-12)
    assert metrics["pg_clipfrac"] == pytest.approx(np.mean(clipped))
    assert metrics["pg_clipfrac_lower"] == pytest.approx(np.mean(lower))
    assert metrics["ppo_kl"] == pytest.approx(np.mean((old - lp)[mask]))


# --------------------------------------------------------------------------------------------------
# Clip-Cov (algorithms.md §4)


def test_clip_cov_loss_by_hand():
    old = t64([[-1.0, -1.0, -1.0, -1.0]])
    log_prob = (old + t64([[0.1, 0.1, math.log(2.0), 0.0]])).requires_grad_()
    adv = t64([[1.0, 2.0, 1.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    selected = torch.tensor([[False, True, False, False]])
    loss, metrics = clip_cov_loss(log_prob, old, adv, mask, selected=selected)
    # Token 0: -e^0.1; token 1 detached (0, still counted); token 2: max(-2, -1.2) = -1.2.
    assert loss.item() == pytest.approx((-math.exp(0.1) + 0 - 1.2) / 3)
    assert metrics["clip_cov_frac"] == pytest.approx(1 / 3)
    assert metrics["pg_clipfrac"] == pytest.approx(1 / 3)
    assert metrics["pg_clipfrac_lower"] == 0.0
    loss.backward()
    assert_values(log_prob.grad, [[-math.exp(0.1) / 3, 0.0, 0.0, 0.0]])
    assert log_prob.grad[0, 1].item() == 0.0


def test_clip_cov_ratio_is_not_clamped_and_no_dual_clip():
    # log-ratio 25 with A < 0: PPO would clamp to e^20 and dual-clip to 3|A|; Clip-Cov does neither.
    old, log_prob = t64([[0.0, 0.0]]), t64([[25.0, 0.0]])
    adv, mask = t64([[-1.0, 1.0]]), torch.ones(1, 2)
    loss, _ = clip_cov_loss(log_prob, old, adv, mask, selected=torch.zeros(1, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx((math.exp(25.0) - 1.0) / 2)


@PROPERTY
@given(
    mask=masks(),
    seed=st.integers(0, 10_000),
    ratio=st.sampled_from([1e-3, 0.1, 0.3, 1.0]),
    lb=st.floats(-1.0, 0.5),
    width=st.floats(0.05, 3.0),
    gen_seed=st.integers(0, 100),
)
def test_clip_cov_select_properties(mask, seed, ratio, lb, width, gen_seed):
    lp, old, adv = random_batch(mask, seed)
    ub = lb + width
    g = torch.Generator().manual_seed(gen_seed)
    sel = clip_cov_select(
        *torch_batch(mask, lp, old, adv), ratio=ratio, lb=lb, ub=ub, generator=g
    ).numpy()
    # A cov within 1e-9 of lb or ub may fall either side in float (e.g. one GRPO response: A - mean
    # is 0 up to rounding), so such tokens count as possible but not sure candidates.
    args = (np.nan_to_num(lp), np.nan_to_num(old), adv, mask, lb, ub)
    sure = np_clip_cov_candidates(*args, slack=-1e-9)
    possible = np_clip_cov_candidates(*args, slack=1e-9)
    assert not (sel & ~mask).any()  # never padding
    assert not (sel & ~possible).any()  # never clipped by PPO, never outside (lb, ub)
    n = max(floor_count(ratio, int(mask.sum())), 1)
    assert min(n, sure.sum()) <= sel.sum() <= min(n, possible.sum())


def test_clip_cov_select_is_the_reference_random_draw():
    rng = np.random.default_rng(3)
    mask = rng.random((8, 30)) < 0.8
    lp, old, adv = random_batch(mask, 4)
    candidates = np_clip_cov_candidates(np.nan_to_num(lp), np.nan_to_num(old), adv, mask, -1.0, 1.0)
    flat = np.flatnonzero(candidates)
    n = floor_count(0.05, int(mask.sum()))
    assert 1 < n < len(flat)
    # The reference: torch.randperm over the candidates in row-major order, first n kept.
    torch.manual_seed(11)
    expected = np.zeros(mask.size, bool)
    expected[flat[torch.randperm(len(flat))[:n].numpy()]] = True
    torch.manual_seed(11)
    sel = clip_cov_select(*torch_batch(mask, lp, old, adv), ratio=0.05, lb=-1.0, ub=1.0)
    assert (sel.numpy().reshape(-1) == expected).all()


def test_clip_cov_select_reproducible_with_seeded_generator():
    rng = np.random.default_rng(5)
    mask = rng.random((8, 40)) < 0.9
    batch = torch_batch(mask, *random_batch(mask, 6))

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return clip_cov_select(*batch, ratio=0.02, lb=-5.0, ub=5.0, generator=g)

    assert torch.equal(draw(1), draw(1))
    draws = [draw(s) for s in range(5)]
    assert int(draws[0].sum()) == floor_count(0.02, int(mask.sum()))
    assert len({tuple(d.reshape(-1).tolist()) for d in draws}) >= 4
    # selected=None in the loss draws from the same generator the same way.
    loss_none, _ = clip_cov_loss(
        *batch, ratio=0.02, lb=-5.0, ub=5.0, generator=torch.Generator().manual_seed(3)
    )
    loss_sel, _ = clip_cov_loss(*batch, selected=draws[3])
    assert loss_none.item() == loss_sel.item()


# --------------------------------------------------------------------------------------------------
# KL-Cov (algorithms.md §4)


@PROPERTY
@given(
    mask=masks(), seed=st.integers(0, 10_000), ratio=st.sampled_from([1e-3, 0.1, 0.25, 0.5, 1.0])
)
def test_kl_cov_select_is_numpy_top_k(mask, seed, ratio):
    # Tokens draw (logp, A) from a pool of 4 pairs, so that ties in cov are common.
    rng = np.random.default_rng(seed)
    pool_lp, pool_a = -rng.uniform(0.1, 3.0, 4), rng.standard_normal(4)
    pick = rng.integers(0, 4, mask.shape)
    lp, adv = pool_lp[pick], pool_a[pick]
    k = max(floor_count(ratio, int(mask.sum())), 1)
    m = torch.tensor(mask)
    got = kl_cov_select(t64(np.where(mask, lp, np.nan)), t64(adv), m, ratio=ratio).numpy()
    assert got.sum() == k
    assert not (got & ~mask).any()
    # Against the cov computed here, every selected token ranks at least as high as every other
    # valid token, up to rounding (two different pairs can tie exactly in real arithmetic).
    cov = np_cov(lp, adv, mask)
    if (mask & ~got).any():
        assert cov[got].min() >= cov[mask & ~got].max() - 1e-12
    # Exact ties (equal cov values) go to the lowest flat index, as in a numpy stable sort.
    exact_cov = token_covariance(t64(lp), t64(adv), m, across_ranks=False).numpy()
    assert (got == np_top(exact_cov, mask, k)).all()


def test_kl_cov_select_ties_by_hand():
    lp = t64([[-1.0, -1.0, -2.0], [-1.0, -1.0, -2.0]])
    adv = t64([[1.0, 1.0, -1.0], [1.0, 1.0, -1.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    # mean logp = -4/3, mean A = 1/3: cov is 8/9 at flat indices 2 and 5, 2/9 at 0, 1, 3, 4.
    assert kl_cov_select(lp, adv, mask, ratio=1e-3).reshape(-1).nonzero().flatten().tolist() == [2]
    top3 = kl_cov_select(lp, adv, mask, ratio=0.5).reshape(-1).nonzero().flatten().tolist()
    assert top3 == [0, 2, 5]


def test_kl_cov_loss_by_hand():
    old = t64([[-1.0, -2.0, -0.5, -1.0]])
    log_prob = (old + t64([[0.2, -0.3, 0.0, 0.0]])).requires_grad_()
    adv = t64([[1.0, -1.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    selected = torch.tensor([[True, True, False, False]])
    coef = 0.5
    loss, metrics = kl_cov_loss(log_prob, old, adv, mask, coef=coef, selected=selected)
    expected = (
        (-math.exp(0.2) + coef * 0.2) + (math.exp(-0.3) + coef * 0.3) + (-2.0 * math.exp(0.0))
    ) / 3
    assert loss.item() == pytest.approx(expected)
    assert metrics["kl_cov_selected"] == 2
    assert metrics["kl_cov_abs_diff"] == pytest.approx(0.5 / 3)
    assert metrics["ppo_kl"] == pytest.approx(0.1 / 3)
    assert metrics["pg_clipfrac"] == metrics["pg_clipfrac_lower"] == 0.0
    loss.backward()
    # d/dx of -A e^x + coef |x| is -A e^x + coef * sign(x) on selected tokens.
    grad = [
        (-math.exp(0.2) + coef) / 3,
        (math.exp(-0.3) - coef) / 3,
        -2.0 / 3,
        0.0,
    ]
    assert_values(log_prob.grad, [grad])


def test_kl_cov_penalty_has_no_gradient_on_the_first_mini_batch():
    old = t64([[-1.0, -2.0]])
    log_prob = old.clone().requires_grad_()
    adv, mask = t64([[1.0, -1.0]]), torch.ones(1, 2)
    loss, _ = kl_cov_loss(log_prob, old, adv, mask, selected=torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert_values(log_prob.grad, [[-0.5, 0.5]])


# --------------------------------------------------------------------------------------------------
# All losses: split invariance (algorithms.md §5) and empty-row edge cases


# Settings that make each loss's own terms act on these batches (a loss not named: defaults):
# selections of several tokens, and EntroPIC's term switched on over 40% of the tokens.
TEST_SETTINGS = {
    "clip_cov": {"ratio": 0.3, "lb": -2.0, "ub": 2.0},
    "kl_cov": {"ratio": 0.2},
    "entropic": {"high_prob_threshold": 0.3},
}
TEST_KWARGS = {"entropic": {"alpha": 0.7, "high_prob_threshold": 0.3}}


def _call(name, log_prob, old, adv, mask, mode, selected, denominators, selected_den=None):
    spec = get_policy_loss(name)
    kwargs = {"loss_agg_mode": mode, "denominators": denominators, **TEST_KWARGS.get(name, {})}
    if spec.select is not None:
        kwargs["selected"] = selected
    if spec.selection_denominators:
        kwargs["selected_denominators"] = selected_den
    return spec.fn(log_prob, old, adv, mask, **kwargs)


def _whole_selection(name, log_prob, old, adv, mask):
    spec = get_policy_loss(name)
    if spec.select is None:
        return None
    settings = spec.settings(**TEST_SETTINGS.get(name, {}))
    g = torch.Generator().manual_seed(0)
    return spec.select(log_prob, old, adv, mask, settings, generator=g, across_ranks=False)


def _check_split_invariance(name, mode, mask, lp, old, adv, parts):
    log_prob, old_t, adv_t, m = torch_batch(mask, lp, old, adv)
    selected = _whole_selection(name, log_prob, old_t, adv_t, m)
    whole, _ = _call(name, log_prob, old_t, adv_t, m, mode, selected, None)
    (whole_grad,) = torch.autograd.grad(whole, log_prob)
    den = loss_denominators(m)
    sel_den = None
    if selected is not None:
        sel_den = loss_denominators(selected, across_ranks=False, allow_empty=True)
    chunks = [x.tensor_split(parts) for x in (log_prob, old_t, adv_t, m)]
    sel_chunks = selected.tensor_split(parts) if selected is not None else [None] * parts
    total = sum(
        _call(name, lpc, oc, ac, mc, mode, sc, den, sel_den)[0]
        for lpc, oc, ac, mc, sc in zip(*chunks, sel_chunks, strict=True)
    )
    (split_grad,) = torch.autograd.grad(total, log_prob)
    assert total.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-12, atol=1e-12)
    return selected, whole_grad


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSSES)
def test_split_into_micro_batches_gives_the_same_loss_and_gradient(name, mode, parts):
    lp, old, adv = random_batch(FIXED_MASK, 17, noise=0.4)
    selected, grad = _check_split_invariance(name, mode, FIXED_MASK, lp, old, adv, parts)
    assert grad.abs().sum() > 0
    if selected is not None:
        assert 0 < int(selected.sum()) < int(FIXED_MASK.sum())


@PROPERTY
@given(
    mask=masks(),
    seed=st.integers(0, 10_000),
    name=st.sampled_from(LOSSES),
    mode=st.sampled_from(MODES),
    parts=st.integers(2, 4),
)
def test_split_invariance_property(mask, seed, name, mode, parts):
    _check_split_invariance(name, mode, mask, *random_batch(mask, seed), parts)


@PROPERTY
@given(mask=masks(), seed=st.integers(0, 10_000), gen_seed=st.integers(0, 50))
def test_clip_cov_selected_tokens_have_zero_gradient(mask, seed, gen_seed):
    lp, old, adv = random_batch(mask, seed)
    log_prob, old_t, adv_t, m = torch_batch(mask, lp, old, adv)
    g = torch.Generator().manual_seed(gen_seed)
    sel = clip_cov_select(log_prob, old_t, adv_t, m, ratio=0.5, lb=-3.0, ub=3.0, generator=g)
    loss, metrics = clip_cov_loss(log_prob, old_t, adv_t, m, selected=sel)
    loss.backward()
    assert (log_prob.grad[sel] == 0).all()
    assert metrics["clip_cov_frac"] == pytest.approx(sel.sum().item() / mask.sum())
    # Unselected, unclipped valid tokens keep the policy-gradient term -A*r / N.
    ratio = np.exp(np.nan_to_num(lp) - np.nan_to_num(old))
    free = mask & ~sel.numpy() & (np.abs(ratio - 1) < 0.2 - 1e-9)
    expected = -adv[free] * ratio[free] / mask.sum()
    np.testing.assert_allclose(log_prob.grad.numpy()[free], expected, rtol=1e-10)


# --------------------------------------------------------------------------------------------------
# Entropy terms, reference KL


def test_entropy_bonus_value_and_gradient():
    entropy = t64([[1.0, 2.0, 3.0], [0.5, 9.0, 9.0]]).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    bonus = entropy_bonus(entropy, mask, 0.01)
    assert bonus.item() == pytest.approx(-0.01 * 6.5 / 4)
    bonus.backward()
    assert_values(entropy.grad, [[-0.0025] * 3, [-0.0025, 0, 0]])
    seq = entropy_bonus(entropy, mask, 0.01, loss_agg_mode="seq-mean-token-mean")
    assert seq.item() == pytest.approx(-0.01 * (2.0 + 0.5) / 2)


def test_entropy_bonus_rejects_an_entropy_without_gradient():
    with pytest.raises(ValueError, match="no gradient"):
        entropy_bonus(t64([[1.0]]), torch.ones(1, 1), 0.01)
    with torch.no_grad():
        assert entropy_bonus(t64([[2.0]]), torch.ones(1, 1), 0.5).item() == -1.0


def test_adaptive_entropy_coef_steps_clips_and_round_trips():
    ctl = AdaptiveEntropyCoef(alpha=0.002, target=0.5, delta=0.001, min_alpha=0.0, max_alpha=0.0035)
    assert ctl.update(0.3) == pytest.approx(0.003)  # below target: raise
    assert ctl.update(0.3) == pytest.approx(0.0035)  # clipped at max
    assert ctl.update(0.5) == pytest.approx(0.0035)  # on target: keep
    assert ctl.update(0.9) == pytest.approx(0.0025)  # above target: lower
    for _ in range(5):
        ctl.update(0.9)
    assert ctl.alpha == 0.0  # clipped at min
    state = json.loads(json.dumps(ctl.state_dict()))
    other = AdaptiveEntropyCoef(alpha=1.0, target=0.0, delta=0.0, min_alpha=1.0, max_alpha=1.0)
    other.load_state_dict(state)
    assert other == ctl
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"alpha": 0.1})
    with pytest.raises(ValueError, match="min_alpha <= alpha <= max_alpha"):
        AdaptiveEntropyCoef(alpha=1.0, target=0.5, delta=0.1, min_alpha=0.0, max_alpha=0.5)
    with pytest.raises(ValueError, match="finite"):
        ctl.update(float("nan"))


# --------------------------------------------------------------------------------------------------
# CE-GPPO and EntroPIC by hand (algorithms.md §4.8, §4.9; the authors' code: test_method_references)


def test_ce_gppo_by_hand():
    # ratios 0.5 (A < 0: below 1 - 0.2), 1.5 (A > 0: above 1.2), 1.1 (inside), 4 (A < 0: dual clip)
    log_prob = t64([[math.log(0.5), math.log(1.5), math.log(1.1), math.log(4.0)]])
    log_prob.requires_grad_()
    old = t64([[0.0, 0.0, 0.0, 0.0]])
    adv = t64([[-2.0, 1.0, 1.0, -1.0]])
    loss, metrics = ce_gppo_loss(log_prob, old, adv, torch.ones(1, 4), beta1=0.75, beta2=1.5)
    # values: -0.75*0.8*(-2) = 1.2; -1.5*1.2*1 = -1.8; -1.1; min(4, 3) = 3
    assert loss.item() == pytest.approx((1.2 - 1.8 - 1.1 + 3.0) / 4)
    loss.backward()
    # d/dlogp: beta * bound * (-A) on low and high, -A*r inside, 0 under the dual clip
    assert_values(log_prob.grad, [[0.75 * 0.8 * 2 / 4, -1.5 * 1.2 / 4, -1.1 / 4, 0.0]])
    assert metrics["pg_clipfrac"] == 0.5 and metrics["pg_clipfrac_lower"] == 0.25
    assert metrics["ce_gppo_low_frac"] == 0.25 and metrics["ce_gppo_high_frac"] == 0.25
    with pytest.raises(SettingError, match="beta1"):
        ce_gppo_loss(log_prob, old, adv, torch.ones(1, 4), beta1=-0.1)


def test_ce_gppo_with_betas_of_one_has_ppos_value_and_more_gradient():
    log_prob, old, adv, mask = torch_batch(FIXED_MASK, *random_batch(FIXED_MASK, 3, noise=0.5))
    ours, _ = ce_gppo_loss(log_prob, old, adv, mask, beta1=1.0, beta2=1.0)
    ppo, _ = ppo_loss(log_prob, old, adv, mask)
    # beta = 1: PPO's value everywhere, a gradient where PPO has none
    assert ours.item() == pytest.approx(ppo.item(), rel=1e-12)
    (g_ours,) = torch.autograd.grad(ours, log_prob)
    (g_ppo,) = torch.autograd.grad(ppo, log_prob)
    assert ((g_ppo == 0) & (g_ours != 0)).any()


def test_entropic_by_hand():
    # p = 0.99, 0.5, 0.97, 0.2: the first and third are above 0.95
    log_prob = t64([[math.log(0.99), math.log(0.5)], [math.log(0.97), math.log(0.2)]])
    log_prob.requires_grad_()
    old = log_prob.detach().clone()
    adv = t64([[1.0, 1.0], [-2.0, -2.0]])
    mask = torch.ones(2, 2)
    loss, metrics = entropic_loss(log_prob, old, adv, mask, alpha=0.5)
    ppo = (-1 - 1 + 2 + 2) / 4  # ratio 1
    term = (-1 * 1 + -1 * 2) / 2  # mean of -r|A| over the two high-probability tokens
    assert loss.item() == pytest.approx(ppo + 0.5 * term)
    assert metrics["entropic_term"] == pytest.approx(term)
    assert metrics["entropic_high_prob_frac"] == 0.5
    loss.backward()
    # PPO's -A/4 plus 0.5 * (-|A|/2) on the two selected tokens
    assert_values(log_prob.grad, [[-0.25 - 0.25, -0.25], [0.5 - 0.5, 0.5]])
    zero, _ = entropic_loss(log_prob, old, adv, mask, alpha=0.0)
    assert zero.item() == pytest.approx(ppo)
    with pytest.raises(SettingError, match="alpha"):
        entropic_loss(log_prob, old, adv, mask, alpha=math.nan)


def test_entropic_controller_by_hand_and_round_trip():
    ctl = EntroPICController(EntroPICSettings(target=0.5, kp=1.0, ki=0.1))
    metrics = ctl.update({"token_mean": 0.8, "seq_mean_token_mean": 9.0})
    # e = 0.3, no integral yet: alpha = 0.3, then I = 0.3
    assert metrics == pytest.approx(
        {
            "actor/control_alpha": 0.3,
            "actor/control_error": 0.3,
            "actor/control_integral": 0.3,
            "actor/control_target": 0.5,
        }
    )
    ctl.update({"token_mean": 0.2, "seq_mean_token_mean": 9.0})  # e = -0.3: -0.3 + 0.03
    assert ctl.alpha == pytest.approx(-0.27) and ctl.integral == pytest.approx(0.0)
    ctl.update({"token_mean": 5.0, "seq_mean_token_mean": 9.0})
    assert ctl.alpha == 1.0  # clipped
    assert ctl.loss_kwargs() == {
        "clip_low": 0.2,
        "clip_high": 0.2,
        "clip_ratio_c": 3.0,
        "high_prob_threshold": 0.95,
        "alpha": 1.0,
    }
    other = EntroPICController(EntroPICSettings(target=0.5, kp=1.0, ki=0.1))
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert (other.alpha, other.integral) == (ctl.alpha, ctl.integral)
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"alpha": 0.1})
    with pytest.raises(ValueError, match="finite"):
        ctl.update({"token_mean": math.nan, "seq_mean_token_mean": 0.0})
    seq = EntroPICController(EntroPICSettings(target=1.0, entropy="seq_mean_token_mean"))
    assert seq.update({"token_mean": 0.0, "seq_mean_token_mean": 1.5})["actor/control_error"] == 0.5


def test_entropic_target_from_the_law():
    # R = -0.046 exp(H) + 0.270 (ceiling 0.224); 90% of it at H = log((0.270 - 0.2016) / 0.046)
    settings = EntroPICSettings(target=None, law_a=0.046, law_b=0.270, law_fraction=0.9)
    expected = math.log((0.270 - 0.9 * 0.224) / 0.046)
    assert EntroPICController(settings).target == pytest.approx(expected)
    law_at = -0.046 * math.exp(expected) + 0.270
    assert law_at == pytest.approx(0.9 * 0.224)
    for bad, key in [
        ({"target": 0.1, "law_a": 0.046, "law_b": 0.27}, "target"),
        ({"target": None}, "target"),
        ({"target": None, "law_a": 0.046}, "law_a"),
        ({"target": None, "law_a": 0.3, "law_b": 0.27}, "law_a"),
        ({"target": None, "law_a": 0.046, "law_b": 0.27, "law_fraction": 1.0}, "law_a"),
        ({"target": -0.1}, "target"),
        ({"high_prob_threshold": 1.0}, "high_prob_threshold"),
        ({"entropy": "mean"}, "entropy"),
    ]:
        with pytest.raises(SettingError) as error:
            EntroPICSettings(**bad).validate()
        assert error.value.key == key, bad


def test_kl_penalty_estimators_by_hand():
    log_prob, ref = t64([0.0, -1.0, -2.0]), t64([0.0, -2.0, -1.0])
    d = [0.0, -1.0, 1.0]  # ref - logp
    assert kl_penalty(log_prob, ref, "k1").tolist() == pytest.approx([-x for x in d])
    assert kl_penalty(log_prob, ref, "k2").tolist() == pytest.approx([0.5 * x * x for x in d])
    k3 = [math.exp(x) - x - 1 for x in d]
    assert kl_penalty(log_prob, ref).tolist() == pytest.approx(k3)
    assert kl_penalty(log_prob, ref, "low_var_kl").tolist() == pytest.approx(k3)


@PROPERTY
@given(mask=masks(), seed=st.integers(0, 10_000), rho=st.sampled_from([0.01, 0.2, 0.5, 1.0]))
def test_high_entropy_mask_is_numpy_top_ceil(mask, seed, rho):
    entropy = np.round(np.random.default_rng(seed).uniform(0, 3, mask.shape), 1)  # ties
    k = math.ceil(Fraction(str(rho)) * int(mask.sum()))
    expected = np_top(entropy, mask, k)
    entropy[~mask] = np.nan
    got = high_entropy_mask(t64(entropy), torch.tensor(mask), rho=rho).numpy()
    assert (got == expected).all()


def test_high_entropy_mask_count_is_not_fooled_by_float_rounding():
    mask = torch.ones(3, 5)  # N = 15; 0.2 * 15 is 3.0000000000000004 in floating point
    entropy = t64(np.arange(15.0).reshape(3, 5))
    got = high_entropy_mask(entropy, mask, rho=0.2)
    assert got.reshape(-1).nonzero().squeeze(1).tolist() == [12, 13, 14]


# --------------------------------------------------------------------------------------------------
# Registry and bad input


def test_registry():
    builtin = {
        "ppo": ppo_loss,
        "clip_cov": clip_cov_loss,
        "kl_cov": kl_cov_loss,
        "ce_gppo": ce_gppo_loss,
        "entropic": entropic_loss,
    }
    assert {name: POLICY_LOSSES[name].fn for name in builtin} == builtin
    assert set(builtin) == set(LOSSES)  # every built-in loss gets the split tests above
    assert get_policy_loss("kl_cov").fn is kl_cov_loss
    # each loss's settings are exactly its function's keyword arguments, with the same defaults;
    # a loss with a controller is called with the controller's keyword arguments instead
    for name, fn in builtin.items():
        spec = get_policy_loss(name)
        defaults = inspect.signature(fn).parameters
        if spec.controller is not None:
            kwargs = spec.controller(spec.settings()).loss_kwargs()
            assert all(defaults[key].default == value for key, value in kwargs.items()), name
            continue
        for field in dataclasses.fields(spec.settings):
            assert defaults[field.name].default == field.default, (name, field.name)
    assert get_policy_loss("ppo").select is None
    assert get_policy_loss("kl_cov").summed_metrics == {"pg_loss", "kl_cov_selected"}
    assert get_policy_loss("kl_cov").on_policy_note and not get_policy_loss("ppo").on_policy_note
    assert get_policy_loss("ce_gppo").on_policy_note
    assert not get_policy_loss("entropic").on_policy_note
    assert get_policy_loss("entropic").selection_denominators
    with pytest.raises(ValueError, match="selection_denominators needs a selection"):
        register_policy_loss("custom_bad", selection_denominators=True)
    with pytest.raises(ValueError, match=r"unknown policy loss 'grpo'.*clip_cov.*kl_cov.*ppo"):
        get_policy_loss("grpo")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("ppo")(clip_cov_loss)

    @register_policy_loss("custom_test_loss")
    def custom(log_prob, old_log_prob, advantages, response_mask, **kwargs):
        return log_prob.sum(), {}

    try:
        assert get_policy_loss("custom_test_loss").fn is custom
        assert get_policy_loss("custom_test_loss").settings().validate() is None
    finally:
        del POLICY_LOSSES["custom_test_loss"]


def _bad_input_batch():
    log_prob = t64([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    old_log_prob = t64([[-1.1, -2.0, 0.0], [-0.4, 0.0, 0.0]])
    advantages = t64([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    return log_prob, old_log_prob, advantages, torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("name", LOSSES)
def test_losses_reject_bad_input(name):
    fn = get_policy_loss(name).fn
    lp, old, adv, mask = _bad_input_batch()
    with pytest.raises(ValueError, match="shape mismatch"):
        fn(lp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="no token"):
        fn(lp, old, adv, torch.zeros_like(mask))
    nan_adv = adv.clone()
    nan_adv[1, 0] = float("nan")
    with pytest.raises(ValueError, match="advantages contains NaN"):
        fn(lp, old, nan_adv, mask)
    nan_adv = adv.clone()
    nan_adv[1, 2] = float("nan")  # padding: ignored
    assert math.isfinite(fn(lp, old, nan_adv, mask)[0].item())
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'token-sum'"):
        fn(lp, old, adv, mask, loss_agg_mode="token-sum")
    with pytest.raises(ValueError, match="only 0 and 1"):
        fn(lp, old, adv, mask * 2)
    if get_policy_loss(name).select is not None:
        with pytest.raises(ValueError, match="selected marks padding"):
            fn(lp, old, adv, mask, selected=torch.ones_like(mask, dtype=torch.bool))


@pytest.mark.parametrize("c", [1.0, 0.5, float("nan")])
def test_ppo_rejects_clip_ratio_c_not_above_one(c):
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ppo_loss(*_bad_input_batch(), clip_ratio_c=c)


def test_other_bad_input():
    lp, old, adv, mask = _bad_input_batch()
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        aggregate_loss(lp, mask, "mean")
    with pytest.raises(ValueError, match="no token"):
        aggregate_loss(lp, torch.zeros_like(mask), "token-mean")
    with pytest.raises(ValueError, match="no token"):
        loss_denominators(torch.zeros_like(mask))
    with pytest.raises(ValueError, match="shape mismatch"):
        aggregate_loss(lp[:1], mask, "token-mean")
    with pytest.raises(ValueError, match="ratio"):
        clip_cov_select(lp, old, adv, mask, ratio=0.0)
    with pytest.raises(ValueError, match="lb < ub"):
        clip_cov_select(lp, old, adv, mask, lb=2.0, ub=1.0)
    with pytest.raises(ValueError, match="no token"):
        kl_cov_select(lp, adv, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="rho"):
        high_entropy_mask(lp, mask, rho=1.5)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(lp, old, "k4")
    with pytest.raises(ValueError, match="tokens > 0"):
        LossDenominators(tokens=0, sequences=0)


# --------------------------------------------------------------------------------------------------
# Across ranks: two gloo processes select exactly what one process selects over the whole batch


def _across_ranks_worker(rank, init_file, batch, expected):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = slice(0, 2) if rank == 0 else slice(2, None)
        lp, old, adv, mask = (x[rows] for x in batch)
        g = torch.Generator().manual_seed(9)
        got = {
            "clip": clip_cov_select(
                lp, old, adv, mask, ratio=0.3, lb=-2.0, ub=2.0, generator=g, across_ranks=True
            ),
            "kl": kl_cov_select(lp, adv, mask, ratio=0.2, across_ranks=True),
            "ent": high_entropy_mask(-lp, mask, rho=0.3, across_ranks=True),
        }
        for key, value in got.items():
            assert torch.equal(value, expected[key][rows]), key
        assert loss_denominators(mask) == expected["den"]
        distributed.shutdown()  # every rank at once: see distributed.shutdown
    finally:
        distributed.shutdown(wait_for_all=False)


@pytest.mark.distributed
def test_selection_across_ranks_matches_single_process(tmp_path):
    # Row 1 (on rank 0) is empty, and the ranks hold different numbers of rows.
    lp, old, adv = random_batch(FIXED_MASK, 23)
    lp, old, adv, mask = (x.detach() for x in torch_batch(FIXED_MASK, lp, old, adv))
    g = torch.Generator().manual_seed(9)
    expected = {
        "clip": clip_cov_select(lp, old, adv, mask, ratio=0.3, lb=-2.0, ub=2.0, generator=g),
        "kl": kl_cov_select(lp, adv, mask, ratio=0.2),
        "ent": high_entropy_mask(-lp, mask, rho=0.3),
        "den": loss_denominators(mask),
    }
    assert 0 < int(expected["clip"].sum()) < int(mask.sum())
    mp.spawn(
        _across_ranks_worker,
        args=(str(tmp_path / "init"), (lp, old, adv, mask), expected),
        nprocs=2,
        join=True,
    )
