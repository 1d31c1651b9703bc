"""Right padding is not computed: a forward runs only up to its rows' longest response
(`forward.response_columns`), the no-grad passes group rows of similar lengths, and nothing changes
at the tokens, their gradients or an update."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from entroprl.config import config_from_dict
from entroprl.train import forward
from entroprl.train.micro_batches import Budget
from entroprl.train.update import update_policy
from tests.test_fused_head import _forward_and_grads, _policy
from tests.test_shared_prefix import grouped_batch
from tests.test_trainer import _update_batch

R = 7


def _short_batch(tok, longest: int):
    """`grouped_batch` with every response cut to at most `longest` tokens: the columns after
    are padding in every row."""
    ids, attention, _ = grouped_batch(tok, 2, R)
    P = ids.shape[1] - R
    attention[:, P + longest :] = 0
    ids[attention == 0] = tok.pad_token_id
    return ids, attention, attention[:, P:].double()


def test_response_columns_by_hand():
    assert forward.response_columns([1, 2], 4) == 2
    assert forward.response_columns([1], 4) == 1
    assert forward.response_columns([0, 0], 4) == 1  # never 0 columns
    assert forward.response_columns([4, 4], 4) == 4


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_trimmed_forward_equals_the_full_one_at_the_tokens(shared, fused, monkeypatch):
    """Log-probs, entropies and every gradient (float64) of a forward that stops at the longest
    response equal the full forward's at the response tokens; the padding columns are 0."""
    model, tok = _policy()
    if fused:
        forward.fuse_head(model)
    ids, attention, mask = _short_batch(tok, 4)
    columns = forward.response_columns(attention[:, -R:].sum(dim=1).tolist(), R)
    assert columns == 4
    full = _forward_and_grads(model, ids, attention, R, shared=shared, fused=fused, mask=mask)
    lengths = []
    real = forward.forward_log_probs

    def spy(*args, **kwargs):
        lengths.append(args[3])  # the response length each forward computes
        return real(*args, **kwargs)

    monkeypatch.setattr(forward, "forward_log_probs", spy)
    got = _forward_and_grads(
        model, ids, attention, R, shared=shared, fused=fused, mask=mask, columns=columns
    )
    assert lengths == [R, columns]
    held = mask.bool()
    for want, have in zip(full[:2], got[:2], strict=True):
        torch.testing.assert_close(have[held], want[held], rtol=0, atol=1e-12)
        assert not have[:, columns:].any()
    assert full[2].keys() == got[2].keys()
    for name, grad in full[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("shared", [False, True])
def test_the_no_grad_pass_sorts_by_length_and_returns_the_batch_order(shared, monkeypatch):
    """`batched_log_probs` two rows at a time equals one full forward at the tokens; without the
    shared prefix each micro-batch holds rows of similar lengths and stops at their longest."""
    model, tok = _policy()
    ids, attention, mask = grouped_batch(tok, 2, R)
    batch = SimpleNamespace(input_ids=ids, attention_mask=attention, response_mask=mask)
    want = forward.forward_log_probs(model, ids, attention, R, shared_prefix=shared)
    seen = []
    real = forward.forward_log_probs

    def spy(model, ids, attention, R, **kwargs):
        if "columns" in kwargs:  # not the forward's own call on the columns it keeps
            seen.append((attention[:, -R:].sum(dim=1).tolist(), kwargs["columns"]))
        return real(model, ids, attention, R, **kwargs)

    monkeypatch.setattr(forward, "forward_log_probs", spy)
    got = forward.batched_log_probs(model, batch, Budget(rows=2), 1.0, shared_prefix=shared)
    held = mask.bool()
    for have, full in zip(got, want, strict=True):
        torch.testing.assert_close(have[held], full[held].detach(), rtol=0, atol=1e-12)
    for lengths, columns in seen:
        assert columns == max(lengths)
    if shared:  # the batch's order
        assert [n for lengths, _ in seen for n in lengths] == mask.sum(dim=1).int().tolist()
    else:
        order = [n for lengths, _ in seen for n in lengths]
        assert order == sorted(mask.sum(dim=1).int().tolist(), reverse=True)
        assert sum(columns for _, columns in seen) < R * len(seen)  # some were trimmed


def test_an_update_with_trimmed_micro_batches_equals_one_without(monkeypatch):
    """The same update (gradients, weights and every logged value, to float rounding) whether
    each micro-batch's forward stops at its longest response or runs over all columns, and some
    did stop early."""
    model, tok = _policy()
    model.float()
    batch = _update_batch(tok)
    # every response ends by column 4, the first four by column 3
    batch.response_mask[:, 4:] = 0
    batch.attention_mask[:, -2:] = 0
    batch.response_mask[:4, 3:] = 0
    batch.attention_mask[:4, -3:] = 0
    config = config_from_dict(
        {
            "algorithm": {"policy_loss": "clip_cov", "entropy_coef": 0.01},
            "optim": {"mini_batch_size": 8, "micro_batch_size": 4, "lr": 1e-2},
            "rollout": {"max_new_tokens": 6},
        }
    )

    def run():
        trained = copy.deepcopy(model)
        # plain SGD: AdamW's normalised step would magnify rounding in near-zero gradients
        optimizer = torch.optim.SGD(trained.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        result = update_policy(
            trained, optimizer, copy.deepcopy(batch), config, generator=generator, entropy_coef=0.01
        )
        return trained, result.metrics

    columns = []
    real = forward.forward_log_probs

    def spy(*args, **kwargs):
        columns.append(kwargs.get("columns"))
        return real(*args, **kwargs)

    monkeypatch.setattr(forward, "forward_log_probs", spy)
    trimmed, trimmed_metrics = run()
    assert any(c is not None and c < 6 for c in columns)
    monkeypatch.setattr(forward, "response_columns", lambda lengths, R: R)
    full, full_metrics = run()
    for a, b in zip(trimmed.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert trimmed_metrics.keys() == full_metrics.keys()
    for key, value in full_metrics.items():
        assert trimmed_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize(
    "loss, scope, ordered",
    [
        ("ppo", "minibatch", True),  # no selection
        ("clip_cov", "minibatch", True),  # selected over the mini-batch, beforehand
        ("clip_cov", "micro", False),  # the reference scope: each micro-batch's own
    ],
)
def test_micro_batches_take_rows_of_similar_lengths_where_no_selection_minds(loss, scope, ordered):
    from entroprl.train.micro_batches import Budget
    from entroprl.train.update import loss_setup, micro_batch_plan

    config = config_from_dict({"algorithm": {"policy_loss": loss, "cov_scope": scope}})
    setup = loss_setup(config, torch.Generator(), 0.0, None)
    batch = _update_batch(_policy()[1])
    batch.attention_mask[[0, 2, 5], -3:] = 0  # three shorter responses
    plan = micro_batch_plan(batch, setup, Budget(rows=3))
    index = torch.cat([part.rows for part in plan]).tolist()
    assert [len(part.rows) for part in plan] == [3, 3, 2]
    assert index == ([1, 3, 4, 6, 7, 0, 2, 5] if ordered else list(range(8)))
    R = batch.response_mask.shape[1]
    for part in plan:
        assert part.columns == batch.attention_mask[part.rows, -R:].sum(dim=1).max()
        assert part.tokens == batch.response_mask[part.rows].sum()
    # one micro-batch keeps the rows' order: a selection over it draws over them in that order
    (whole,) = micro_batch_plan(batch, setup, Budget(rows=8))
    assert whole.rows.tolist() == list(range(8))
