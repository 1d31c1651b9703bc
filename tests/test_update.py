"""The update's micro-batches read nothing back from the device but their metrics: their value
checks are deferred to the end of the mini-batch (`checks.deferred`), where they still raise."""

import pytest
import torch

from entroprl.algos import checks, losses
from entroprl.config import config_from_dict
from entroprl.errors import NonFiniteError
from entroprl.train.update import UpdateBatch, update_policy
from tests.policies import make_tiny_policy

READS = ("item", "tolist", "__bool__", "__int__", "__float__")
"""The ways a tensor's values reach the host: each one a synchronisation on a GPU."""


def _batch(seed: int = 0) -> UpdateBatch:
    g = torch.Generator().manual_seed(seed)
    rows, prompt, response = 16, 4, 6
    ids = torch.randint(3, 20, (rows, prompt + response), generator=g)
    mask = torch.ones(rows, response)
    mask[::3, 4:] = 0
    return UpdateBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_mask=mask,
        old_log_prob=-torch.rand(rows, response, generator=g),
        advantages=torch.randn(rows, response, generator=g),
    )


def _update(loss: str, micro: int, batch: UpdateBatch) -> None:
    model, _ = make_tiny_policy()
    config = config_from_dict(
        {
            "algorithm": {"policy_loss": loss},
            "optim": {"mini_batch_size": 16, "micro_batch_size": micro},
            "rollout": {"max_new_tokens": 6},
        }
    )
    spec = losses.get_policy_loss(loss)
    controller = spec.controller(config.loss_settings()) if spec.controller else None
    update_policy(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        batch,
        config,
        generator=torch.Generator().manual_seed(0),
        loss_kwargs=controller.loss_kwargs() if controller else None,
    )


@pytest.mark.parametrize("loss", sorted(losses.POLICY_LOSSES))
def test_a_micro_batch_reads_only_its_metrics(loss, monkeypatch):
    """Reads per extra micro-batch: 12 to 17 when every check read its result at once (the mask,
    three finite checks, the token range and the logits of the forward, the selection, the
    loss); now the loss's logged values alone (3 to 6)."""
    count = [0]
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            count[0] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    reads = {}
    for micro in (16, 4):
        count[0] = 0
        _update(loss, micro, _batch())
        reads[micro] = count[0]
    per_micro_batch = (reads[4] - reads[16]) / 3
    assert per_micro_batch <= 6, reads


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("advantages", float("nan"), NonFiniteError, "advantages contains NaN"),
        ("old_log_prob", float("inf"), NonFiniteError, "old_log_prob contains NaN"),
        ("response_mask", 2.0, ValueError, "response_mask must hold only 0 and 1"),
    ],
)
def test_deferred_checks_still_raise_before_the_optimizer_step(field, value, error, match):
    """A bad value in the last micro-batch raises its own error, and no weight moves."""
    batch = _batch()
    getattr(batch, field)[-2, -1] = value  # a valid token of the last micro-batch
    model, _ = make_tiny_policy()
    before = [p.detach().clone() for p in model.parameters()]
    config = config_from_dict(
        {"optim": {"mini_batch_size": 16, "micro_batch_size": 4}, "rollout": {"max_new_tokens": 6}}
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(error, match=match):
        update_policy(model, optimizer, batch, config, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_outside_deferral_a_check_raises_at_once_with_the_index():
    with pytest.raises(NonFiniteError, match=r"x contains NaN or inf \(first at index \[1\]\)"):
        checks.check_finite("x", torch.tensor([0.0, float("nan")]))
    with checks.deferred() as deferred:
        checks.check_finite("x", torch.tensor([0.0, float("nan")]))  # recorded, not raised
        checks.check_mask(torch.tensor([[0.0, 2.0]]))
    with pytest.raises(NonFiniteError, match="x contains NaN"):  # the first failure's error
        deferred.raise_first()
    deferred.raise_first()  # read once: nothing is left to raise
