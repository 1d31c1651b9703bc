"""Every tensor a training path makes sits on the device of the data it meets.

The CPU suite cannot run on a GPU, so three guards stand in for one: a scan of the source for
tensor factories that name no device, the per-step pure functions run with torch's default device
moved away from their data (a tensor made without `device=` lands elsewhere and fails there), and
the collectives' own check of the run's device. The GPU suite (tests/test_gpu.py) runs the real
thing where a GPU is lent."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from entroprl.algos import dynamics, losses
from entroprl.algos.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from entroprl.algos.entropy import batch_entropy
from entroprl.algos.mismatch import mismatch_metrics
from entroprl.train import distributed
from entroprl.train.policy import pick_device

SRC = Path(__file__).resolve().parents[1] / "src" / "entroprl"
FACTORIES = {
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "randperm",
    "rand",
    "randn",
    "randint",
    "linspace",
    "eye",
}
ALLOWED = {
    "demo/warmstart.py": "the demo's warm start trains the demo's tiny model on the CPU by design, "
    "before any run's device exists",
}
"""Modules whose tensors may be made on the default device, and why. A tensor made on the CPU on
purpose elsewhere says so with `device="cpu"`."""


def factories_without_device(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
            and node.func.attr in FACTORIES
            and not any(k.arg == "device" for k in node.keywords)
        ):
            found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)[:70]}")
    return found


def test_every_tensor_factory_names_its_device():
    """`torch.tensor(x)` in a training path is a CPU tensor on a GPU run: the first GPU run
    crashed on one in `dynamics.response_covariance`, and a refill's `torch.tensor(short)`
    reached NCCL, which rejects CPU tensors."""
    found = [
        line
        for path in sorted(SRC.rglob("*.py"))
        if str(path.relative_to(SRC)) not in ALLOWED
        for line in factories_without_device(path)
    ]
    assert not found, "tensor factories without device=:\n" + "\n".join(found)


def test_the_scan_sees_what_it_looks_for(tmp_path):
    (tmp_path / "x.py").write_text(
        "import torch\n"
        "a = torch.stack([x.sum(), torch.tensor(1.0)])\n"
        "b = torch.zeros(3, device=x.device)\n"
        "c = x.new_zeros(3)\n"
    )
    global SRC
    old, SRC = SRC, tmp_path
    try:
        assert factories_without_device(tmp_path / "x.py") == ["x.py:2: torch.tensor(1.0)"]
    finally:
        SRC = old


@pytest.fixture
def default_device_elsewhere():
    """Tensors made without `device=` go to the meta device while the data is on the CPU: any
    such tensor that meets the data fails, as a CPU tensor meeting CUDA data does on a GPU."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 6
    logp = -torch.rand(B, T, generator=g, device="cpu") * 3
    mask = (torch.rand(B, T, generator=g, device="cpu") > 0.2).float()
    mask[:, 0] = 1
    rewards = (torch.rand(B, generator=g, device="cpu") > 0.5).float()
    groups = torch.arange(B, device="cpu") // 4
    return logp, mask, rewards, groups


def test_per_step_statistics_make_nothing_off_their_data(default_device_elsewhere):
    logp, mask, rewards, groups = _data()
    adv = compute_advantages("grpo", rewards, groups, mask, across_ranks=True)
    assert adv.device.type == "cpu"
    cov = dynamics.token_covariance(logp, adv, mask)
    dynamics.covariance_summary(cov, mask)
    seq_logp = dynamics.response_mean_logp(logp, mask)
    seq_adv = (adv * mask).sum(-1) / mask.sum(-1)
    assert isinstance(
        dynamics.response_covariance(seq_logp, seq_adv, groups, across_ranks=True), float
    )
    batch_entropy(-logp, mask)
    mismatch_metrics(logp, logp + 0.01, mask)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_every_registered_estimator_makes_nothing_off_its_data(name, default_device_elsewhere):
    _, mask, rewards, groups = _data(2)  # 0/1 rewards, groups of 4: every estimator takes them
    adv = compute_advantages(name, rewards, groups, mask, across_ranks=True)
    assert adv.device.type == "cpu"


@pytest.mark.parametrize("name", sorted(losses.POLICY_LOSSES))
def test_every_registered_loss_makes_nothing_off_its_data(name, default_device_elsewhere):
    logp, mask, rewards, groups = _data(1)
    adv = compute_advantages("grpo", rewards, groups, mask)
    spec = losses.get_policy_loss(name)
    settings = spec.settings()
    denominators = losses.loss_denominators(mask, norm_constant=6, across_ranks=True)
    extra = {}
    if spec.select is not None:
        extra["selected"] = spec.select(
            logp,
            logp + 0.1,
            adv,
            mask,
            settings,
            generator=torch.Generator(device="cpu").manual_seed(0),
            across_ranks=True,
        )
    if spec.selection_denominators:
        extra["selected_denominators"] = losses.loss_denominators(
            extra["selected"], norm_constant=6, allow_empty=True
        )
    # a loss with a controller is called with the controller's keyword arguments (Trainer.update)
    kwargs = spec.controller(settings).loss_kwargs() if spec.controller else vars(settings)
    loss, _ = spec.fn(
        logp.clone().requires_grad_(),
        logp + 0.1,
        adv,
        mask,
        denominators=denominators,
        loss_agg_mode="token-mean",
        **kwargs,
        **extra,
    )
    assert loss.device.type == "cpu"


def test_collectives_refuse_a_tensor_off_the_run_device():
    """On one GPU the collectives are no-ops and under NCCL a CPU tensor fails without naming
    our line: the check names the collective and the devices."""
    distributed.use_device("cuda:0")
    with pytest.raises(distributed.DeviceMismatchError, match=r"all_reduce_sum.*cpu.*cuda:0"):
        distributed.all_reduce_sum(torch.tensor(1, device="cpu"))
    with pytest.raises(distributed.DeviceMismatchError, match="all_gather_cat"):
        distributed.all_gather_cat(torch.ones(3, device="cpu"))
    distributed.use_device("cpu")
    assert distributed.all_reduce_max(torch.tensor([2.0], device="cpu")).item() == 2.0


@pytest.mark.parametrize(
    "name, local_rank, expected",
    [
        ("cuda", "1", "cuda:1"),
        ("cuda", None, "cuda:0"),
        ("auto", "3", "cuda:1"),  # LOCAL_RANK modulo the GPUs this node has
        ("cuda:1", "0", "cuda:1"),
        ("cpu", "1", "cpu"),
    ],
)
def test_a_gpu_is_named_with_its_index(monkeypatch, name, local_rank, expected):
    """`torch.cuda.set_device(torch.device("cuda"))` raises: a run's GPU always has an index,
    torchrun's LOCAL_RANK where none is given."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert pick_device(name) == torch.device(expected)


def test_trainer_declares_its_device_to_the_collectives(tiny_policy, tmp_path):
    from entroprl.config import config_from_dict
    from entroprl.tasks.registry import build_task
    from entroprl.train.trainer import Trainer

    model, tok = tiny_policy
    config = config_from_dict(
        {"trainer": {"device": "cpu", "out_dir": str(tmp_path), "progress": False}}
    )
    Trainer(config, task=build_task(config.data, tok), model=model, tokenizer=tok)
    assert distributed.run_device() == torch.device("cpu")
