"""Two gloo processes give the same update as one process on the same global batch, replicated
(DDP) or sharded (FSDP2), and a sharded run trains, evaluates and resumes like a replicated one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoModelForCausalLM

from entroprl import cli
from entroprl.algos import losses
from entroprl.algos.advantages import compute_advantages
from entroprl.config import config_from_dict
from entroprl.demo.models import save_model
from entroprl.train import checkpoint, distributed, parallel, perf
from entroprl.train.forward import forward_log_probs, fuse_head
from entroprl.train.precision import native_bfloat16
from entroprl.train.rundir import read_metrics
from entroprl.train.trainer import Trainer
from entroprl.train.update import UpdateBatch, update_policy
from tests import toy_loss  # noqa: F401  (registers a plug-in loss: the tests run it too)
from tests.policies import make_tiny_policy, needs_native_bfloat16
from tests.test_micro_batches import _varied_batch
from tests.test_shared_prefix import grouped_batch
from tests.test_trainer import TIMING, _update_batch, controller_kwargs, small_config

# Every registered loss (the plug-in of tests/toy_loss.py included), each with an aggregation mode,
# and PPO with all of them.
CASES = sorted(
    {("ppo", mode) for mode in losses.LOSS_AGG_MODES}
    | {
        (name, losses.LOSS_AGG_MODES[i % len(losses.LOSS_AGG_MODES)])
        for i, name in enumerate(sorted(losses.POLICY_LOSSES))
    }
)


def _one_update(policy_loss, mode, rows, mini, micro, strategy=None, keep=None):
    model, tok = make_tiny_policy()
    batch = _update_batch(tok, n=8)
    if keep is not None:  # rows whose mask is all 0 enter no loss (filtered groups)
        batch.response_mask = batch.response_mask * keep.any(-1, keepdim=True)
    batch = batch.rows(rows)
    config = config_from_dict(
        {
            # clip_cov: a ratio of 1 picks every candidate (the positive-covariance tokens), so
            # the global draw does not depend on how rows are ordered across ranks, while the
            # negative-covariance tokens keep their gradient
            "algorithm": {
                "policy_loss": policy_loss,
                "loss_agg_mode": mode,
                "loss": {
                    "kl_cov": {"ratio": 0.1},
                    "clip_cov": {"ratio": 1.0, "lb": 0.0, "ub": 10.0},
                    "entropic": {"high_prob_threshold": 0.045},
                },
            },
            "rollout": {"max_new_tokens": 6},
            "optim": {"mini_batch_size": mini, "micro_batch_size": micro, "epochs": 2},
        }
    )
    names = [n for n, _ in model.named_parameters()]
    wrapped = parallel.wrap(model, strategy) if strategy else model
    with torch.no_grad():  # as the trainer's old log-probs: FSDP must not keep the root gathered
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = update_policy(
        wrapped,
        opt,
        batch,
        config,
        generator=torch.Generator().manual_seed(0),
        loss_kwargs=controller_kwargs(config),
    ).metrics
    state = parallel.model_state(model)  # gathered to rank 0 when sharded
    return {n: state[n].clone() for n in names if n in state}, metrics


def _budget_update(rows, strategy=None, tokens=None, policy_loss="clip_cov"):
    """An update of rows whose responses differ in length (rank 0's short, rank 1's long), in
    micro-batches within `tokens` (the ranks' counts differ before `micro_batches.same_count`)."""
    model, tok = make_tiny_policy()
    batch = _varied_batch(tok, [2, 1, 2, 1, 6, 6, 5, 6]).rows(rows)
    config = config_from_dict(
        {
            "algorithm": {
                "policy_loss": policy_loss,
                "loss": {"clip_cov": {"ratio": 1.0, "lb": 0.0, "ub": 10.0}},
            },
            "rollout": {"max_new_tokens": 6},
            "optim": {
                "mini_batch_size": len(rows),
                "micro_batch_size": len(rows),
                "micro_batch_tokens": tokens,
                "epochs": 2,
            },
        }
    )
    names = [n for n, _ in model.named_parameters()]
    wrapped = parallel.wrap(model, strategy) if strategy else model
    with torch.no_grad():  # as the trainer's old log-probs: FSDP must not keep the root gathered
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    update_policy(wrapped, opt, batch, config, generator=generator)
    state = parallel.model_state(model)
    return {n: state[n].clone() for n in names if n in state}


def _shared_prefix_policy():
    model, tok = make_tiny_policy(seed=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the init's near-uniform logits
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model, tok


def _shared_prefix_update(rows, strategy=None, shared=False, fused=False):
    """Two epochs of one mini-batch (micro-batches of 4) on four groups of 4 responses, each
    group's prompt its own: with `shared`, each prompt is computed once per micro-batch, two
    forwards of the root module (`forward.shared_prefix_forward`); with `fused`, the log-probs
    come from the hidden states inside the model's forward (`forward.fuse_head`)."""
    model, tok = _shared_prefix_policy()
    if fused:
        fuse_head(model)
    ids, attention, mask = grouped_batch(tok, G=4, R=7)
    with torch.no_grad():
        old, _ = forward_log_probs(model, ids, attention, 7)
    g = torch.Generator().manual_seed(2)
    advantages = torch.randn(16, 1, generator=g).expand(16, 7) * mask
    batch = UpdateBatch(
        input_ids=ids,
        attention_mask=attention,
        response_mask=mask,
        old_log_prob=old,
        advantages=advantages.contiguous(),
    ).rows(rows)
    config = config_from_dict(
        {
            "rollout": {"max_new_tokens": 7},
            "optim": {
                "mini_batch_size": len(rows),
                "micro_batch_size": 4,
                "epochs": 2,
                "shared_prefix": shared,
            },
            "model": {"fused_head": fused},
        }
    )
    names = [n for n, _ in model.named_parameters()]
    wrapped = parallel.wrap(model, strategy) if strategy else model
    with torch.no_grad():  # as the trainer's old log-probs: FSDP must not keep the root gathered
        model(input_ids=ids[rows], attention_mask=attention[rows])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    update_policy(wrapped, opt, batch, config, generator=torch.Generator().manual_seed(0))
    state = parallel.model_state(model)
    return {n: state[n].clone() for n in names if n in state}


def _whitening_inputs():
    """Eight responses in four groups, the last two filtered out (their mask rows all 0): on two
    ranks, rank 1 holds no token that enters the loss."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.0])
    groups = torch.arange(4).repeat_interleave(2)
    mask = torch.ones(8, 5)
    mask[1, 3:] = 0
    mask[4:] = 0
    return rewards, groups, mask


SHARED_FUSED = [(True, False), (False, True), (True, True)]
"""The (optim.shared_prefix, model.fused_head) runs on two ranks compared with the plain forwards
in one process: the root module's forward run twice per micro-batch, or the output layer used
inside it."""


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = torch.arange(8).tensor_split(world)[rank]
        for strategy in parallel.STRATEGIES:
            for policy_loss, mode in CASES:
                params, _ = _one_update(policy_loss, mode, rows, mini=4, micro=2, strategy=strategy)
                if rank == 0:
                    save_file(params, f"{out_dir}/{strategy}-{policy_loss}-{mode}.safetensors")
            for shared, fused in SHARED_FUSED:
                params = _shared_prefix_update(
                    torch.arange(16).tensor_split(world)[rank], strategy, shared, fused
                )
                if rank == 0:
                    save_file(params, f"{out_dir}/{strategy}-{shared}-{fused}.safetensors")
        # rank 1's rows are all filtered out: REINFORCE++ whitens over the kept tokens of both
        # ranks, and the update keeps or skips a mini-batch by its global token count
        rewards, groups, mask = _whitening_inputs()
        adv = compute_advantages(
            "reinforce_pp_baseline", rewards[rows], groups[rows], mask[rows], across_ranks=True
        )
        params, metrics = _one_update("ppo", "token-mean", rows, 4, 2, "ddp", keep=mask)
        save_file({"adv": adv, **params}, f"{out_dir}/whitening-{rank}.safetensors")
        _, nothing = _one_update("ppo", "token-mean", rows, 4, 2, "ddp", keep=torch.zeros(8, 5))
        empty = [metrics["actor/empty_minibatches"], nothing["actor/empty_minibatches"]]
        torch.save(empty, f"{out_dir}/empty-{rank}.pt")
        for strategy in parallel.STRATEGIES:  # 40 tokens: one micro-batch on rank 0, two on 1
            params = _budget_update(rows, strategy, tokens=40)
            if rank == 0:
                save_file(params, f"{out_dir}/budget-{strategy}.safetensors")
        counts = perf.TokenCounts.over_ranks(torch.tensor(rank + 1), *_count_inputs(rows))
        torch.save(counts, f"{out_dir}/counts-{rank}.pt")
        distributed.shutdown()  # every rank at once: see distributed.shutdown
    finally:
        distributed.shutdown(wait_for_all=False)


def _count_inputs(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows `rows` of a batch of 8 for `perf.TokenCounts.over_ranks`: attention mask, loss tokens
    and the rows kept."""
    g = torch.Generator().manual_seed(0)
    attention_mask = (torch.rand(8, 12, generator=g) > 0.3).long()
    train_mask = attention_mask[:, 6:].float() * (torch.rand(8, 6, generator=g) > 0.5)
    kept = torch.rand(8, generator=g) > 0.25
    return attention_mask[rows], train_mask[rows], kept[rows]


def _assert_same_weights(split: dict, single: dict, what: str) -> None:
    """The weights saved by the two-rank run equal the one-process run's, name by name."""
    assert split.keys() == single.keys()
    for name, value in single.items():
        torch.testing.assert_close(split[name], value, atol=1e-5, rtol=1e-5, msg=f"{what}: {name}")


@pytest.mark.distributed
def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for policy_loss, mode in CASES:
        single, _ = _one_update(policy_loss, mode, torch.arange(8), mini=8, micro=4)
        initial, _ = make_tiny_policy()
        for strategy in parallel.STRATEGIES:
            split = load_file(tmp_path / f"{strategy}-{policy_loss}-{mode}.safetensors")
            _assert_same_weights(split, single, f"{strategy} {policy_loss}/{mode}")
            start = dict(initial.named_parameters())
            moved = sum((value - start[name]).abs().sum().item() for name, value in single.items())
            assert moved > 1e-3, f"{policy_loss}/{mode}: the update changed nothing"
    # the prompts computed once per micro-batch (two forwards of the root module each), the
    # output layer used inside the forward (fused head), or both: sharded or not, the update of
    # the plain forwards in one process
    single = _shared_prefix_update(torch.arange(16))
    initial = dict(_shared_prefix_policy()[0].named_parameters())
    assert max((single[n] - initial[n]).abs().max().item() for n in single) > 1e-3
    for strategy in parallel.STRATEGIES:
        for shared, fused in SHARED_FUSED:
            split = load_file(tmp_path / f"{strategy}-{shared}-{fused}.safetensors")
            _assert_same_weights(split, single, f"{strategy} shared prefix {shared}, fused {fused}")
    rewards, groups, mask = _whitening_inputs()
    whole = compute_advantages("reinforce_pp_baseline", rewards, groups, mask)
    halves = [load_file(tmp_path / f"whitening-{rank}.safetensors") for rank in (0, 1)]
    torch.testing.assert_close(torch.cat([h["adv"] for h in halves]), whole)
    single, _ = _one_update("ppo", "token-mean", torch.arange(8), 8, 4, keep=mask)
    for name, value in single.items():
        torch.testing.assert_close(halves[0][name], value, atol=1e-5, rtol=1e-5)
    # rank 1's empty mini-batches are not empty globally; an all-filtered batch is, on both
    # ranks, in both epochs
    assert [torch.load(tmp_path / f"empty-{rank}.pt") for rank in (0, 1)] == [[0, 2], [0, 2]]
    # micro-batches within a token budget, as many on each rank: the update of one process
    single = _budget_update(torch.arange(8))
    for strategy in parallel.STRATEGIES:
        split = load_file(tmp_path / f"budget-{strategy}.safetensors")
        _assert_same_weights(split, single, f"{strategy} within a token budget")
    # the step's token counts over both ranks: those of the whole batch, on each
    whole = perf.TokenCounts.over_ranks(torch.tensor(3), *_count_inputs(torch.arange(8)))
    for rank in (0, 1):
        assert torch.load(tmp_path / f"counts-{rank}.pt", weights_only=False) == whole


def _run(out_dir, steps, strategy, resume=False, **sections):
    model, tok = make_tiny_policy()
    config = small_config(
        out_dir,
        trainer={"steps": steps, "strategy": strategy, "save_every": 1},
        # a reference model, sharded like the policy; overlong penalties make some groups'
        # rewards differ, so that dynamic sampling refills a step on some rank (a joint decision)
        algorithm={
            "kl_coef": 0.05,
            "dynamic_sampling": True,
            "dynamic_sampling_metric": "reward",
            "dynamic_sampling_max_batches": 3,
            "overlong_buffer": 4,
        },
        **sections,
    )
    trainer = Trainer(config, model=model, tokenizer=tok)
    trainer.train(resume=resume)
    return trainer


def _trainer_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _run(f"{out}/ddp", 3, "ddp")
        trainer = _run(f"{out}/fsdp", 3, "fsdp")
        assert parallel.is_sharded(trainer.actor.model) and parallel.is_sharded(
            trainer.actor.ref_model
        )
        assert trainer.backend.synced
        # stopped after step 2, resumed for step 3; then a DDP run resumes the FSDP checkpoint
        _run(f"{out}/resumed", 2, "fsdp")
        _run(f"{out}/resumed", 3, "fsdp", resume=True)
        _run(f"{out}/fsdp", 4, "ddp", resume=True)
        if native_bfloat16():  # the trainer refuses bfloat16 on a CPU without it
            mixed = _run(f"{out}/bf16", 2, "fsdp", model={"compute_dtype": "bfloat16"})
            if rank == 0:
                dtypes = {p.dtype for p in mixed.actor.model.parameters()}
                assert dtypes == {torch.float32}, f"master weights must stay float32: {dtypes}"
        distributed.shutdown()  # every rank at once: see distributed.shutdown
    finally:
        distributed.shutdown(wait_for_all=False)


def _comparable(record):
    return {k: v for k, v in record.items() if not k.startswith(TIMING)}


@pytest.mark.distributed
def test_fsdp_trainer_matches_ddp_evaluates_and_resumes(tmp_path):
    """Two ranks: a sharded run logs what the replicated run logs, step for step (rollouts and
    their refills, rewards, entropy, covariance, losses, held-out accuracy); a sharded run resumed
    from its checkpoint continues it exactly, and its checkpoint resumes under DDP too."""
    mp.spawn(_trainer_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    fsdp = read_metrics(tmp_path / "fsdp" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in fsdp] == [0, 1, 2, 3, 4]
    assert "val-core/countdown/acc/mean@2" in fsdp[2] and "actor/kl_loss" in fsdp[1]
    assert max(r["train/num_gen_batches"] for r in fsdp[1:]) > 1
    assert all(r["actor/grad_norm"] > 0 for r in fsdp[1:])  # the comparison below is not vacuous
    for other in (ddp, resumed):
        for r1, r2 in zip(fsdp[:4], other, strict=True):
            a, b = _comparable(r1), _comparable(r2)
            assert a.keys() == b.keys()
            for key, value in a.items():
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (r1["step"], key)
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step_000004" / "model"
    assert (ckpt / "model.safetensors").is_file()  # saved by the DDP run: whole
    # FSDP saved each rank's shards, and the resumed run ended where the straight one did, bit
    # for bit (weights and AdamW state)
    straight, resumed_ckpt = (
        tmp_path / run / "checkpoints" / "step_000003" for run in ("fsdp", "resumed")
    )
    for path in (straight, resumed_ckpt):
        assert checkpoint.is_sharded(checkpoint.verify(path))
        assert len(list((path / checkpoint.SHARDED).glob("*.distcp"))) == 2  # one per rank
        assert not (path / "model" / "model.safetensors").exists()
    a, b = (checkpoint.read_sharded(p) for p in (straight, resumed_ckpt))
    assert a.keys() == b.keys() and any(".exp_avg_sq" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cli.main(["export", str(tmp_path / "resumed"), "--out", str(tmp_path / "exported")])
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert all(torch.equal(exported[k], a[f"model.{k}"]) for k in exported)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "exported") is not None
    if native_bfloat16():
        bf16 = read_metrics(tmp_path / "bf16" / "metrics.jsonl")
        assert all(r["actor/skipped_updates"] == 0 for r in bf16[1:])


@pytest.mark.slow
@pytest.mark.distributed
@needs_native_bfloat16
def test_command_line_fsdp_under_torchrun_and_alone(tmp_path):
    """`entroprl train` with trainer.strategy=fsdp from a checkpoint directory: under torchrun on
    two ranks, and as a plain process (a group of one), in bf16 mixed precision with gradient
    checkpointing."""
    model, tok = make_tiny_policy()
    model_dir = save_model(model, tok, tmp_path / "model")
    config = tmp_path / "fsdp.yaml"
    values = small_config(tmp_path, model={"path": str(model_dir)}).to_dict()
    values["trainer"] |= {"strategy": "fsdp", "device": "cpu", "steps": 2}
    config.write_text(yaml.safe_dump(values))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    launches = {
        "torchrun": [str(torchrun), "--nproc-per-node", "2", "-m", "entroprl.cli"],
        "alone": [sys.executable, "-m", "entroprl.cli"],
    }
    for name, launch in launches.items():
        out = tmp_path / name
        overrides = [
            f"trainer.out_dir={out}",
            "model.compute_dtype=bfloat16",
            "model.gradient_checkpointing=true",
        ]
        done = subprocess.run(
            [*launch, "train", str(config), *overrides],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{name}:\n{done.stderr[-3000:]}"
        records = read_metrics(out / "metrics.jsonl")
        assert [r["step"] for r in records] == [0, 1, 2], name
        assert all(r["actor/skipped_updates"] == 0 for r in records[1:]), name
        # FSDP saves sharded, in the weights' own dtype (bfloat16 compute leaves them float32)
        saved = checkpoint.read_sharded(out / "checkpoints" / "step_000002", "model.")
        names = {n.removeprefix("model.") for n in saved}
        assert names >= {n for n, _ in model.named_parameters()} - {"lm_head.weight"}
        assert {v.dtype for v in saved.values()} == {torch.float32}, name


def test_train_command_leaves_no_process_group(tmp_path):
    """`entroprl train` under FSDP in one process starts a group of one and destroys it when the
    run ends, rather than leaving gloo's threads to the interpreter's exit."""
    from entroprl import cli

    model, tok = make_tiny_policy()
    model_dir = save_model(model, tok, tmp_path / "model")
    config = tmp_path / "fsdp.yaml"
    values = small_config(tmp_path, model={"path": str(model_dir)}).to_dict()
    values["trainer"] |= {"strategy": "fsdp", "device": "cpu", "steps": 1}
    config.write_text(yaml.safe_dump(values))
    cli.main(["train", str(config), f"trainer.out_dir={tmp_path / 'run'}"])
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert not dist.is_initialized()
