"""entroprl.train.micro_batches: micro-batches within a row and token budget (by hand, and as
properties over random lengths), the same count on every rank (tests/test_distributed.py runs it
on two), and the no-grad pass and an update in such micro-batches equal to those without."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, strategies as st

from entroprl.config import ConfigError, config_from_dict
from entroprl.train import forward, micro_batches
from entroprl.train.micro_batches import Budget
from entroprl.train.update import update_policy
from tests.test_fused_head import _policy
from tests.test_trainer import _update_batch

R = 6


def test_split_by_hand():
    lengths, width = [8, 8, 5, 3, 3, 1], 2
    # 10, 20, 30 tokens; a fourth row would make 4 x (2 + 8) = 40
    assert micro_batches.split(lengths, width, Budget(rows=4, tokens=30)) == [3, 3]
    assert micro_batches.split(lengths, width, Budget(rows=2, tokens=30)) == [2, 2, 2]
    assert micro_batches.split(lengths, width, Budget(rows=8)) == [6]
    # a row longer than the budget runs alone; the next ones start afresh
    assert micro_batches.split([8, 1, 1], width, Budget(rows=8, tokens=5)) == [1, 1, 1]
    assert micro_batches.split([], width, Budget(rows=2, tokens=5)) == []


@given(
    st.lists(st.integers(0, 50), max_size=40),
    st.integers(0, 20),
    st.integers(1, 12),
    st.one_of(st.none(), st.integers(1, 400)),
)
def test_split_keeps_every_row_within_the_budget_and_fills_each_micro_batch(
    lengths, width, rows, tokens
):
    budget = Budget(rows=rows, tokens=tokens)
    sizes = micro_batches.split(lengths, width, budget)
    assert sum(sizes) == len(lengths) and all(size >= 1 for size in sizes)
    start = 0
    for k, size in enumerate(sizes):
        group = lengths[start : start + size]
        cost = size * (width + max(group))
        assert size <= rows and (tokens is None or cost <= tokens or size == 1)
        if k < len(sizes) - 1:  # greedy: the next row did not fit
            bigger = lengths[start : start + size + 1]
            over = tokens is not None and (size + 1) * (width + max(bigger)) > tokens
            assert size == rows or over
        start += size


def test_plan_runs_the_longest_first_and_one_micro_batch_keeps_the_order():
    lengths = [2, 6, 3, 6, 1]
    groups = micro_batches.plan(lengths, 4, Budget(rows=8, tokens=21), sort=True)
    assert groups == [[1, 3], [2, 0, 4]]  # 2 x (4 + 6) tokens, then 3 x (4 + 3)
    assert micro_batches.plan(lengths, 4, Budget(rows=2), sort=False) == [[0, 1], [2, 3], [4]]
    assert micro_batches.plan(lengths, 4, Budget(rows=8), sort=True) == [[0, 1, 2, 3, 4]]


def test_same_count_in_one_process_changes_nothing():
    assert micro_batches.same_count([3, 1, 2]) == [3, 1, 2]


def _varied_batch(tok, ends):
    """`_update_batch` with responses of `ends` tokens (the rest right padding)."""
    batch = _update_batch(tok, n=len(ends))
    P = batch.input_ids.shape[1] - R
    for i, end in enumerate(ends):
        batch.attention_mask[i, P + end :] = 0
        batch.response_mask[i, end:] = 0
        batch.input_ids[i, P + end :] = tok.pad_token_id
    return batch


ENDS = [2, 6, 1, 6, 3, 5, 2, 6]


@pytest.mark.parametrize("shared", [False, True])
def test_the_no_grad_pass_within_a_token_budget_equals_the_full_forward(shared, monkeypatch):
    model, tok = _policy()
    batch = _varied_batch(tok, ENDS)
    ids, attention, mask = batch.input_ids, batch.attention_mask, batch.response_mask
    want = forward.forward_log_probs(model, ids, attention, R, shared_prefix=shared)
    seen = []
    real = forward.forward_log_probs

    def spy(model, ids, attention, R, **kwargs):
        if "columns" in kwargs:
            seen.append((ids.shape[0], kwargs["columns"]))
        return real(model, ids, attention, R, **kwargs)

    monkeypatch.setattr(forward, "forward_log_probs", spy)
    budget = 30  # the prompt is 6 columns wide
    got = forward.batched_log_probs(
        model, SimpleNamespace(**vars(batch)), Budget(rows=8, tokens=budget), 1.0,
        shared_prefix=shared,
    )  # fmt: skip
    held = mask.bool()
    for have, full in zip(got, want, strict=True):
        torch.testing.assert_close(have[held], full[held].detach(), rtol=0, atol=1e-12)
    assert all(rows * (6 + columns) <= budget or rows == 1 for rows, columns in seen)
    assert sum(rows for rows, _ in seen) == len(ENDS) and len(seen) > 2


@pytest.mark.parametrize("loss, scope", [("ppo", "minibatch"), ("clip_cov", "minibatch")])
def test_an_update_within_a_token_budget_equals_one_without(loss, scope, monkeypatch):
    """Micro-batches by tokens (a varying number of rows each) make the same update, to float
    rounding, as micro-batches of a fixed number of rows: each loss has the mini-batch's
    denominators and selection."""
    model, tok = _policy()
    model.float()
    batch = _varied_batch(tok, ENDS)

    def run(**optim):
        config = config_from_dict(
            {
                "algorithm": {"policy_loss": loss, "cov_scope": scope, "entropy_coef": 0.01},
                "optim": {"mini_batch_size": 8, "micro_batch_size": 8, "lr": 1e-2, "epochs": 2}
                | optim,
                "rollout": {"max_new_tokens": R},
            }
        )
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        result = update_policy(
            trained, optimizer, copy.deepcopy(batch), config, generator=generator
        )
        return trained, result.metrics

    rows = []
    real = forward.forward_log_probs

    def spy(model, ids, *args, **kwargs):
        rows.append(ids.shape[0])
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(forward, "forward_log_probs", spy)
    budgeted, budgeted_metrics = run(micro_batch_tokens=40)
    assert len(set(rows)) > 1  # micro-batches of different sizes
    fixed, fixed_metrics = run(micro_batch_size=2)
    for a, b in zip(budgeted.parameters(), fixed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert budgeted_metrics.keys() == fixed_metrics.keys()
    for key, value in fixed_metrics.items():
        assert budgeted_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_a_token_budget_below_one_is_refused():
    with pytest.raises(ConfigError, match=r"optim\.micro_batch_tokens"):
        config_from_dict({"optim": {"micro_batch_tokens": 0}})
    with pytest.raises(ConfigError, match=r"optim\.log_prob_micro_batch_tokens"):
        config_from_dict({"optim": {"log_prob_micro_batch_tokens": -1}})
