"""Two gloo processes give the same update as one process on the same global batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from entroprl.config import config_from_dict
from entroprl.trainer import update_policy
from tests.policies import make_tiny_policy
from tests.test_trainer import _update_batch

CASES = [
    ("ppo", "token-mean"),
    ("ppo", "seq-mean-token-mean"),
    ("kl_cov", "seq-mean-token-sum"),
    ("clip_cov", "seq-mean-token-sum-norm"),
]


def _one_update(policy_loss, mode, rows, mini, micro, ddp):
    model, tok = make_tiny_policy()
    batch = _update_batch(tok, n=8).rows(rows)
    config = config_from_dict(
        {
            # clip_cov: a ratio of 1 picks every candidate (the positive-covariance tokens), so
            # the global draw does not depend on how rows are ordered across ranks, while the
            # negative-covariance tokens keep their gradient
            "algorithm": {
                "policy_loss": policy_loss,
                "loss_agg_mode": mode,
                "kl_cov_ratio": 0.1,
                "clip_cov_ratio": 1.0,
                "clip_cov_lb": 0.0,
                "clip_cov_ub": 10.0,
            },
            "rollout": {"max_new_tokens": 6},
            "optim": {"mini_batch_size": mini, "micro_batch_size": micro, "epochs": 2},
        }
    )
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics, _ = update_policy(
        wrapped, opt, batch, config, generator=torch.Generator().manual_seed(0)
    )
    return {n: p.detach().clone() for n, p in model.named_parameters()}, metrics


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = torch.arange(8).tensor_split(world)[rank]
        for policy_loss, mode in CASES:
            params, _ = _one_update(policy_loss, mode, rows, mini=4, micro=2, ddp=True)
            if rank == 0:
                save_file(params, f"{out_dir}/{policy_loss}-{mode}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for policy_loss, mode in CASES:
        single, _ = _one_update(policy_loss, mode, torch.arange(8), mini=8, micro=4, ddp=False)
        split = load_file(tmp_path / f"{policy_loss}-{mode}.safetensors")
        initial, _ = make_tiny_policy()
        moved = 0.0
        for name, value in single.items():
            torch.testing.assert_close(
                split[name], value, atol=1e-5, rtol=1e-5, msg=f"{policy_loss}/{mode}: {name}"
            )
            moved += (value - dict(initial.named_parameters())[name]).abs().sum().item()
        assert moved > 1e-3, f"{policy_loss}/{mode}: the update changed nothing"
