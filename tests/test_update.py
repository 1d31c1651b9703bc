"""The update's micro-batches read nothing back from the device but their metrics: their value
checks are deferred to the end of the mini-batch (`checks.deferred`), where they still raise. The
counting is `benchmarks/bench_host_reads.py`'s, which prints the table in docs/benchmarks.md."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from entroprl.algos import checks, losses
from entroprl.config import config_from_dict
from entroprl.errors import NonFiniteError
from entroprl.train.update import update_policy
from tests.policies import make_tiny_policy

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its neighbour _common
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_host_reads", BENCHMARKS / "bench_host_reads.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.parametrize("loss", sorted(losses.POLICY_LOSSES))
def test_a_micro_batch_reads_only_its_metrics(loss, bench):
    """Reads per further micro-batch: 12 to 17 when every check read its result at once (the
    mask, three finite checks, the token range and the logits of the forward, the selection, the
    loss); now the loss's logged values alone (3 to 6)."""
    with bench.counting_reads() as count:
        one, four = bench.reads(loss, 16, count), bench.reads(loss, 4, count)
    assert one > 0 and (four - one) / 3 <= 6, (one, four)
    assert torch.Tensor.item is torch._C.TensorBase.item  # the counting is undone


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("advantages", float("nan"), NonFiniteError, "advantages contains NaN"),
        ("old_log_prob", float("inf"), NonFiniteError, "old_log_prob contains NaN"),
        ("response_mask", 2.0, ValueError, "response_mask must hold only 0 and 1"),
    ],
)
def test_deferred_checks_still_raise_before_the_optimizer_step(field, value, error, match, bench):
    """A bad value in the last micro-batch raises its own error, and no weight moves."""
    batch = bench.batch()
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
