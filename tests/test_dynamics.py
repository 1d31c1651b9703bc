"""algorithms.md §2 and 3: first-order entropy change, covariance groups, response and token
covariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings, strategies as st

from entroprl.algos.dynamics import (
    covariance_summary,
    first_order_entropy_change,
    response_covariance,
    response_mean_logp,
    token_covariance,
)
from entroprl.train import distributed


def softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def entropy_np(z: np.ndarray) -> float:
    p = softmax_np(z)
    return float(-(p * np.log(p)).sum())


def neg_cov_np(z: np.ndarray, dz: np.ndarray) -> float:
    """-Cov_pi(log pi, dz) in the uncentred form of the issue, as an explicit sum over actions."""
    p = softmax_np(z)
    log_p = np.log(p)
    e_lp_dz = sum(p[a] * log_p[a] * dz[a] for a in range(len(z)))
    e_lp = sum(p[a] * log_p[a] for a in range(len(z)))
    e_dz = sum(p[a] * dz[a] for a in range(len(z)))
    return -(e_lp_dz - e_lp * e_dz)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# first_order_entropy_change


def assert_first_order_convergence(z: np.ndarray, dz: np.ndarray) -> None:
    """Forward difference of H along dz tends to the first-order change with an O(eta) error."""
    predicted = first_order_entropy_change(torch.tensor(z), torch.tensor(dz)).item()
    etas = [1e-2 / 2**k for k in range(5)]
    errors = [abs((entropy_np(z + eta * dz) - entropy_np(z)) / eta - predicted) for eta in etas]
    ratios = [errors[k] / errors[k + 1] for k in range(len(etas) - 1)]
    assert errors[-1] < 1e-3 * max(abs(predicted), 1e-3)
    for ratio in ratios:
        assert 1.9 < ratio < 2.1, (errors, ratios)


def test_finite_difference_converges_linearly_for_a_generic_direction():
    r = rng(1)
    assert_first_order_convergence(r.normal(size=9) * 2, r.normal(size=9))


def test_vanilla_policy_gradient_direction():
    r = rng(2)
    z = r.normal(size=7) * 1.5
    adv = r.normal(size=7)
    pi = softmax_np(z)
    adv = adv - (pi * adv).sum()  # an advantage: zero mean under the policy
    # A real gradient-ascent step on J(z) = E_pi[A] moves the logits by eta * pi * A ...
    z_t = torch.tensor(z, requires_grad=True)
    (torch.softmax(z_t, -1) * torch.tensor(adv)).sum().backward()
    np.testing.assert_allclose(z_t.grad.numpy(), pi * adv, rtol=1e-12, atol=1e-14)
    # ... and the entropy then moves by -eta * Cov(log pi, pi * A).
    dz = pi * adv
    value = first_order_entropy_change(torch.tensor(z), torch.tensor(dz)).item()
    assert value == pytest.approx(neg_cov_np(z, dz), rel=1e-10, abs=1e-14)
    assert_first_order_convergence(z, dz)


def test_natural_policy_gradient_direction():
    r = rng(3)
    z, adv = r.normal(size=6), r.normal(size=6)
    value = first_order_entropy_change(torch.tensor(z), torch.tensor(adv)).item()
    assert value == pytest.approx(neg_cov_np(z, adv), rel=1e-10, abs=1e-14)
    assert_first_order_convergence(z, adv)


def test_entropy_falls_when_likely_actions_get_positive_advantage():
    z = torch.tensor([3.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    adv = torch.tensor([1.0, 0.0, -0.5, -1.0], dtype=torch.float64)
    assert first_order_entropy_change(z, adv).item() < 0
    assert first_order_entropy_change(z, -adv).item() > 0
    # A logit shift common to all actions leaves the policy, hence the entropy, unchanged.
    assert first_order_entropy_change(z, torch.full_like(z, 4.0)).item() == pytest.approx(0.0)


@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_leading_dimensions_and_chunking(chunk_rows):
    r = rng(4)
    z, dz = r.normal(size=(2, 3, 11)), r.normal(size=(2, 3, 11))
    out = first_order_entropy_change(torch.tensor(z), torch.tensor(dz), chunk_rows=chunk_rows)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    expected = np.array([[neg_cov_np(z[i, j], dz[i, j]) for j in range(3)] for i in range(2)])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-14)
    permuted = first_order_entropy_change(
        torch.tensor(z).permute(1, 0, 2), torch.tensor(dz).permute(1, 0, 2), chunk_rows=chunk_rows
    )
    np.testing.assert_allclose(permuted.numpy(), expected.T, rtol=1e-10, atol=1e-14)
    out32 = first_order_entropy_change(
        torch.tensor(z, dtype=torch.bfloat16), torch.tensor(dz, dtype=torch.float32)
    )
    assert out32.dtype == torch.float32


def test_first_order_bad_input():
    with pytest.raises(ValueError, match="shape mismatch"):
        first_order_entropy_change(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="action dimension"):
        first_order_entropy_change(torch.zeros(2, 0), torch.zeros(2, 0))
    with pytest.raises(ValueError, match="NaN"):
        first_order_entropy_change(torch.zeros(2, 3), torch.tensor([[0.0, float("nan"), 0.0]] * 2))
    with pytest.raises(ValueError, match="chunk_rows"):
        first_order_entropy_change(torch.zeros(2, 3), torch.zeros(2, 3), chunk_rows=0)


# covariance_summary

PAD = 100.0  # padding entries are large so that including one would show


def test_covariance_summary_hand_example_with_ties_and_padding():
    valid = [5.0, -1.0, 2.0, 5.0, 0.0, 3.0, -4.0, 2.0, 1.0, -1.0]  # N = 10
    cov = torch.tensor([[*valid[:6], PAD, PAD], [*valid[6:], PAD, PAD, PAD, PAD]])
    mask = torch.tensor([[1] * 6 + [0, 0], [1] * 4 + [0] * 4])
    out = covariance_summary(cov, mask)
    assert list(out) == ["top_0.02%", "top_0.2%", "top_2%", "top_20%", "top_50%", "all"]
    # sorted: 5 5 3 2 2 1 0 -1 -1 -4; k = ceil(p*10) at least 1
    assert out["top_0.02%"] == out["top_0.2%"] == out["top_2%"] == 5.0  # k = 1
    assert out["top_20%"] == 5.0  # k = 2, the tie at 5
    assert out["top_50%"] == pytest.approx((5 + 5 + 3 + 2 + 2) / 5)  # k = 5, cuts inside no tie
    assert out["all"] == pytest.approx(12 / 10)
    custom = covariance_summary(cov, mask, fractions=(0.35, 1.0))
    assert custom["top_35%"] == pytest.approx(15 / 4)  # k = ceil(3.5) = 4, one of the tied 2s
    assert custom["top_100%"] == pytest.approx(custom["all"])


def test_covariance_summary_float_error_does_not_add_a_token():
    cov = torch.arange(1.0, 26.0).view(5, 5)
    out = covariance_summary(cov, torch.ones(5, 5), fractions=(0.28,))
    assert 0.28 * 25 > 7  # 7.000000000000001 in floating point
    assert out["top_28%"] == pytest.approx(sum(range(19, 26)) / 7)  # k = 7, not 8


def test_covariance_summary_matches_numpy_ranking():
    r = rng(5)
    cov = r.normal(size=(40, 50)).round(1)  # rounding makes many ties
    mask = r.random((40, 50)) < 0.7
    out = covariance_summary(torch.tensor(cov), torch.tensor(mask), fractions=(0.002, 0.02, 0.2))
    ranked = np.sort(cov[mask])[::-1]
    n = ranked.size
    for p, key in [(0.002, "top_0.2%"), (0.02, "top_2%"), (0.2, "top_20%")]:
        k = max(math.ceil(p * n - 1e-9), 1)
        assert out[key] == pytest.approx(ranked[:k].mean(), rel=1e-12)
    assert out["all"] == pytest.approx(cov[mask].mean(), rel=1e-12)


def test_covariance_summary_bad_input():
    with pytest.raises(ValueError, match="selects no token"):
        covariance_summary(torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        covariance_summary(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="fractions"):
        covariance_summary(torch.ones(2, 3), torch.ones(2, 3), fractions=(0.0,))
    with pytest.raises(ValueError, match="fractions"):
        covariance_summary(torch.ones(2, 3), torch.ones(2, 3), fractions=(1.5,))
    with pytest.raises(ValueError, match="NaN"):
        covariance_summary(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2))
    # NaN at padding is ignored
    assert covariance_summary(torch.tensor([[1.0, float("nan")]]), torch.tensor([[1, 0]]))[
        "all"
    ] == pytest.approx(1.0)


# response_covariance and response_mean_logp


def test_response_covariance_hand_groups_with_a_group_of_one():
    # group 3: x = (-1, -2), A = (1, -1): means -1.5 and 0, cov = (0.5*1 + (-0.5)*(-1)) / 2 = 0.5
    # group 7: x = (-1, -1, -4), A = (2, 0, -2): means -2 and 0, cov = (2 + 0 + 4) / 3 = 2
    # group 9: one response, cov 0
    group = torch.tensor([7, 3, 7, 9, 3, 7])  # interleaved on purpose
    x = torch.tensor([-1.0, -1.0, -1.0, -0.5, -2.0, -4.0])
    adv = torch.tensor([2.0, 1.0, 0.0, 5.0, -1.0, -2.0])
    assert response_covariance(x, adv, group) == pytest.approx((0.5 + 2.0 + 0.0) / 3)


def test_response_covariance_matches_numpy_plain_and_weighted():
    r = rng(6)
    group = np.repeat(np.arange(5), [4, 1, 8, 2, 3])
    r.shuffle(group)
    x = -r.random(group.size) * 3
    adv = r.normal(size=group.size)
    for weighted in (False, True):
        y = np.exp(x) * adv if weighted else adv
        per_group = [
            np.cov(x[group == g], y[group == g], bias=True)[0, 1] if (group == g).sum() > 1 else 0.0
            for g in range(5)
        ]
        got = response_covariance(
            torch.tensor(x), torch.tensor(adv), torch.tensor(group), weighted=weighted
        )
        assert got == pytest.approx(np.mean(per_group), rel=1e-12)


def test_response_covariance_bad_input():
    ones = torch.ones(4)
    ids = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="shape mismatch"):
        response_covariance(ones, torch.ones(3), ids)
    with pytest.raises(ValueError, match="integer"):
        response_covariance(ones, ones, ids.float())
    with pytest.raises(ValueError, match=r"\(B,\)"):
        response_covariance(torch.ones(2, 2), torch.ones(2, 2), ids.view(2, 2))
    with pytest.raises(ValueError, match="no token"):
        response_covariance(torch.ones(0), torch.ones(0), torch.ones(0, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        response_covariance(ones, torch.tensor([1.0, float("inf"), 0, 0]), ids)


def test_response_mean_logp():
    logp = torch.tensor([[-1.0, -2.0, -3.0, float("nan")], [-4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    torch.testing.assert_close(response_mean_logp(logp, mask), torch.tensor([-2.0, -4.0]).double())
    with pytest.raises(ValueError, match=r"responses \[1\]"):
        response_mean_logp(logp, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))


# token_covariance


def token_cov_loops(logp: np.ndarray, adv: np.ndarray, mask: np.ndarray) -> np.ndarray:
    cells = [(i, t) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    mean_lp = sum(logp[c] for c in cells) / len(cells)
    mean_a = sum(adv[c] for c in cells) / len(cells)
    out = np.zeros_like(logp)
    for c in cells:
        out[c] = (logp[c] - mean_lp) * (adv[c] - mean_a)
    return out


def test_token_covariance_padded_batch():
    r = rng(7)
    logp = -r.random((3, 5)) * 4
    adv = np.repeat(r.normal(size=(3, 1)), 5, axis=1)  # one scalar per response, as GRPO gives
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=bool)
    logp_pad = np.where(mask, logp, -50.0)  # padding that would move the means if counted
    out = token_covariance(torch.tensor(logp_pad), torch.tensor(adv), torch.tensor(mask))
    np.testing.assert_allclose(out.numpy(), token_cov_loops(logp, adv, mask), rtol=1e-12)
    assert (out.numpy()[~mask] == 0).all()


def test_token_covariance_bad_input():
    with pytest.raises(ValueError, match="selects no token"):
        token_covariance(torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        token_covariance(torch.ones(2, 3), torch.ones(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        token_covariance(torch.ones(1, 2), torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2))


# properties on masks with empty rows and single tokens


@st.composite
def padded_batch(draw):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 6))
    n = b * t
    finite = st.floats(-5, 5, allow_nan=False)
    logp = np.array(draw(st.lists(finite, min_size=n, max_size=n))).reshape(b, t)
    adv = np.array(draw(st.lists(finite, min_size=n, max_size=n))).reshape(b, t)
    mode = draw(st.sampled_from(["random", "single", "empty_rows"]))
    if mode == "single":
        mask = np.zeros(n, dtype=bool)
        mask[draw(st.integers(0, n - 1))] = True
    else:
        mask = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        mask[draw(st.integers(0, n - 1))] = True
    mask = mask.reshape(b, t)
    if mode == "empty_rows" and b > 1:
        mask[draw(st.integers(0, b - 1))] = False
        if not mask.any():
            mask[0, 0] = True
    return logp, adv, mask


@settings(max_examples=80, deadline=None)
@given(padded_batch())
def test_token_covariance_property(batch):
    logp, adv, mask = batch
    out = token_covariance(torch.tensor(logp), torch.tensor(adv), torch.tensor(mask)).numpy()
    np.testing.assert_allclose(out, token_cov_loops(logp, adv, mask), rtol=1e-9, atol=1e-9)
    assert (out[~mask] == 0).all()
    if mask.sum() == 1:
        assert (out == 0).all()
    # The mean over the scope is the population covariance of the valid (logp, A) pairs.
    expected = np.cov(logp[mask], adv[mask], bias=True)[0, 1] if mask.sum() > 1 else 0.0
    assert out[mask].mean() == pytest.approx(expected, abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(padded_batch())
def test_covariance_summary_property(batch):
    cov, _, mask = batch
    fractions = (0.0002, 0.002, 0.02, 0.2, 0.5)
    out = covariance_summary(torch.tensor(np.where(mask, cov, PAD)), torch.tensor(mask))
    ranked = sorted(cov[mask].tolist(), reverse=True)
    values = [out[f"top_{100 * p:g}%"] for p in fractions]
    for p, value in zip(fractions, values, strict=True):
        k = max(math.ceil(p * len(ranked) - 1e-9), 1)
        assert value == pytest.approx(sum(ranked[:k]) / k, abs=1e-9)
    # A larger group reaches further down the ranking, so its mean cannot be larger.
    assert all(a >= b - 1e-12 for a, b in zip(values, [*values[1:], out["all"]], strict=False))
    if len(ranked) == 1:
        assert set(out.values()) == {ranked[0]}


def _across_ranks_worker(rank, init_file, logp, adv, mask, expected_cov, expected_summary):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = slice(0, 1) if rank == 0 else slice(1, None)
        cov = token_covariance(logp[rows], adv[rows], mask[rows])
        torch.testing.assert_close(cov, expected_cov[rows], rtol=1e-12, atol=1e-12)
        summary = covariance_summary(cov, mask[rows], fractions=(0.2, 0.5))
        assert summary == pytest.approx(expected_summary, rel=1e-12)
        distributed.shutdown()  # every rank at once: see distributed.shutdown
    finally:
        distributed.shutdown(wait_for_all=False)


@pytest.mark.distributed
def test_token_covariance_and_summary_are_global_across_ranks(tmp_path):
    r = rng(8)
    logp = torch.tensor(-r.random((3, 4)) * 3)
    adv = torch.tensor(r.normal(size=(3, 4)))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])  # ranks hold 2 and 5 tokens
    expected_cov = token_covariance(logp, adv, mask)
    expected_summary = covariance_summary(expected_cov, mask, fractions=(0.2, 0.5))
    # The top 20% (k = 2) and 50% (k = 4) of 7 tokens cannot be taken on either rank alone.
    mp.spawn(
        _across_ranks_worker,
        args=(str(tmp_path / "init"), logp, adv, mask, expected_cov, expected_summary),
        nprocs=2,
        join=True,
    )


def test_token_covariance_ignores_nan_at_padding():
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("inf"), 0.0]])
    adv = torch.tensor([[1.0, 1.0, float("nan")], [-1.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    cov = token_covariance(logp, adv, mask)
    # three valid tokens: logp (-1, -2, -0.5), A (1, 1, -1); means -7/6 and 1/3
    expected = torch.tensor(
        [[(1 / 6) * (2 / 3), (-5 / 6) * (2 / 3), 0.0], [(2 / 3) * (-4 / 3), 0.0, 0.0]]
    )
    torch.testing.assert_close(cov, expected)
