"""entroprl.integrations.verl against verl's own policy losses (in .venv-verl: scripts/test.sh).

On CPU, without Ray: verl's registry and loss functions are called as verl's `ppo_loss` calls them
(micro-batch tensors, the actor config with `global_batch_info`); two gloo processes stand in for
verl's data-parallel ranks.
"""

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.verl
pytest.importorskip(
    "verl",
    reason="verl is not installed in this environment; scripts/test.sh runs these in .venv-verl",
)

from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402

from entroprl.algos import dynamics, losses  # noqa: E402
from entroprl.integrations import verl as ours  # noqa: E402
from entroprl.train import distributed  # noqa: E402

MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum")
MODES += ("seq-mean-token-sum-norm",)
# verl's policy_loss settings: lb/ub such that some tokens are candidates and the draw matters
POLICY = {"clip_cov_ratio": 0.05, "clip_cov_lb": 0.5, "clip_cov_ub": 4.0, "kl_cov_ratio": 0.05}


def actor_config(global_batch_info=None, **policy) -> FSDPActorConfig:
    config = FSDPActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        policy_loss=PolicyLossConfig(**(POLICY | {"ppo_kl_coef": 0.7} | policy)),
    )
    config.global_batch_info.update(global_batch_info or {})
    return config


def micro_batch(seed: int, rows: int = 6, length: int = 24):
    """verl's tensors for one micro-batch: off-policy log-probs, GRPO-like advantages, padding."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, length, generator=g) * 3
    log_prob = old + 0.3 * torch.randn(rows, length, generator=g)
    advantages = (2 * torch.randn(rows, 1, generator=g)).expand(rows, length).clone()
    advantages += 0.5 * torch.randn(rows, length, generator=g)
    mask = torch.ones(rows, length, dtype=torch.bool)
    for i in range(rows):
        mask[i, int(torch.randint(length // 2, length + 1, (1,), generator=g)) :] = False
    weights = torch.rand(rows, length, generator=g) * 2
    return old, log_prob, advantages, mask, weights


def run(fn, old, log_prob, advantages, mask, mode, config, weights, seed=0):
    log_prob = log_prob.clone().requires_grad_(True)
    torch.manual_seed(seed)  # verl's Clip-Cov draws with the global RNG
    loss, metrics = fn(
        old_log_prob=old,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=mask,
        loss_agg_mode=mode,
        config=config,
        rollout_is_weights=weights,
    )
    loss.backward()
    return loss.detach(), log_prob.grad, metrics


def test_registry_returns_ours_by_name():
    assert core_algos.get_policy_loss_fn("entroprl_clip_cov") is (
        ours.compute_policy_loss_entroprl_clip_cov
    )
    assert core_algos.get_policy_loss_fn("entroprl_kl_cov") is (
        ours.compute_policy_loss_entroprl_kl_cov
    )
    # verl's own stay where they were
    assert core_algos.get_policy_loss_fn("kl_cov") is core_algos.compute_policy_loss_kl_cov


GLOBAL_INFO = {"dp_size": 1, "batch_num_tokens": 200, "global_batch_size": 10}


@pytest.mark.parametrize("weighted", [False, True], ids=["no-is", "rollout-is"])
@pytest.mark.parametrize(
    "info",
    [{}, GLOBAL_INFO | {"loss_scale_factor": 32}, GLOBAL_INFO | {"dp_size": 2}],
    ids=["local", "global", "global-dp2"],
)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_micro_batch_scope_equals_verl(name, mode, info, weighted):
    """One rank: ours equals verl's own clip_cov / kl_cov on the same inputs, loss and gradient."""
    old, log_prob, advantages, mask, weights = micro_batch(seed=11)
    config = actor_config(info)
    weights = weights if weighted else None
    verl_fn = core_algos.get_policy_loss_fn(name)
    our_fn = core_algos.get_policy_loss_fn(f"entroprl_{name}")
    theirs = run(verl_fn, old, log_prob, advantages, mask, mode, config, weights)
    mine = run(our_fn, old, log_prob, advantages, mask, mode, config, weights)
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mine[1], theirs[1], rtol=1e-6, atol=1e-8)
    if name == "clip_cov":  # the draw matters: another seed detaches other tokens
        other = run(our_fn, old, log_prob, advantages, mask, mode, config, weights, seed=1)
        assert not torch.equal(other[1], mine[1])
    # verl's ppo_kl is the signed mean for Clip-Cov and the mean absolute value for KL-Cov
    key = "actor/ppo_kl" if name == "clip_cov" else "actor/kl_cov_abs_diff"
    assert mine[2][key] == pytest.approx(theirs[2]["actor/ppo_kl"], rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_weighted_ppo_loss_equals_verl_vanilla(mode):
    """The trainer's PPO loss with the rollout importance weights (`weights`) is verl's
    compute_policy_loss_vanilla with `rollout_is_weights`: loss, gradient and clip fractions."""
    old, log_prob, advantages, mask, weights = micro_batch(seed=14)
    config = actor_config()
    theirs = run(
        core_algos.compute_policy_loss_vanilla,
        old,
        log_prob,
        advantages,
        mask,
        mode,
        config,
        weights,
    )
    ours_mode, denominators, _ = ours._aggregation(mode, mask, config)

    def ppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, **kwargs):
        loss, metrics = losses.ppo_loss(
            log_prob,
            old_log_prob,
            advantages,
            response_mask,
            clip_low=config.clip_ratio_low,
            clip_high=config.clip_ratio_high,
            clip_ratio_c=config.clip_ratio_c,
            loss_agg_mode=ours_mode,
            denominators=denominators,
            weights=kwargs["rollout_is_weights"],
        )
        return loss, metrics

    mine = run(ppo, old, log_prob, advantages, mask, mode, config, weights)
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mine[1], theirs[1], rtol=1e-6, atol=1e-8)
    assert theirs[2]["actor/pg_clipfrac"] > 0  # the clip acts on some tokens
    for key in ("pg_clipfrac", "pg_clipfrac_lower"):
        assert mine[2][key] == pytest.approx(theirs[2][f"actor/{key}"], rel=1e-6)


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_metrics_come_back(name):
    old, log_prob, advantages, mask, _ = micro_batch(seed=12)
    _, _, metrics = run(
        core_algos.get_policy_loss_fn(f"entroprl_{name}"),
        old,
        log_prob,
        advantages,
        mask,
        "token-mean",
        actor_config(),
        None,
    )
    summary = dynamics.covariance_summary(dynamics.token_covariance(old, advantages, mask), mask)
    for group, value in summary.items():
        assert metrics[f"actor/cov/{group}"] == pytest.approx(value)
    assert metrics["actor/dynamics/predicted_entropy_change"] == pytest.approx(-summary["all"])
    n_valid = int(mask.sum())
    if name == "kl_cov":
        assert metrics["actor/kl_cov_frac"] == pytest.approx(int(0.05 * n_valid) / n_valid)
    else:
        assert 0 < metrics["actor/clip_cov_frac"] <= 0.05
    assert all(k.startswith("actor/") and isinstance(v, float) for k, v in metrics.items())


def _kl_cov_steps(check, drifts: list[float], tokens_per_call: int):
    """Feed KL-Cov two calls per mini-batch; each mini-batch's log-probs drift by `drift`."""
    old, _, advantages, _, _ = micro_batch(seed=13, rows=4, length=8)
    mask = torch.ones_like(old, dtype=torch.bool)
    config = actor_config({"batch_num_tokens": 2 * tokens_per_call})
    for drift in drifts:
        for _ in range(2):
            ours.compute_policy_loss_entroprl_kl_cov(
                old, (old + drift).requires_grad_(), advantages, mask, config=config
            )


def test_kl_cov_warns_when_fully_on_policy(monkeypatch):
    monkeypatch.setattr(ours, "_ON_POLICY", ours.OnPolicyCheck())
    with pytest.warns(UserWarning, match="KL-Cov on-policy"):
        _kl_cov_steps(ours._ON_POLICY, [0.0, 0.0], tokens_per_call=32)
    # several mini-batches per rollout: the second one is off-policy, no warning ever
    monkeypatch.setattr(ours, "_ON_POLICY", ours.OnPolicyCheck())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="KL-Cov on-policy")
        _kl_cov_steps(ours._ON_POLICY, [0.0, 0.1, 0.0, 0.0, 0.0], tokens_per_call=32)


# -- two data-parallel ranks (gloo) ------------------------------------------------------------


def _rank(rank, world, init_file, out_dir, rows_per_rank):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        old, log_prob, advantages, mask, _ = micro_batch(seed=14, rows=rows_per_rank * world)
        mine = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
        info = {
            "dp_size": world,
            "batch_num_tokens": int(mask.sum()),
            "global_batch_size": mask.shape[0],
        }
        out = {}
        for name in ("clip_cov", "kl_cov"):
            fn = core_algos.get_policy_loss_fn(f"entroprl_{name}")
            loss, grad, metrics = run(
                fn,
                old[mine],
                log_prob[mine],
                advantages[mine],
                mask[mine],
                "token-mean",
                actor_config(info),
                None,
            )
            out[name] = {"loss": loss, "grad": grad, "cov_all": metrics["actor/cov/all"]}
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        distributed.shutdown()  # every rank at once: see distributed.shutdown
    finally:
        distributed.shutdown(wait_for_all=False)


@pytest.mark.distributed
def test_selection_is_global_over_data_parallel_ranks(tmp_path):
    """Two ranks select as one process over both micro-batches: the summed gradient equals the
    single-process one (verl averages gradients over ranks and scales each loss by dp_size)."""
    world, rows = 2, 4
    mp.spawn(_rank, args=(world, str(tmp_path / "init"), str(tmp_path), rows), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    old, log_prob, advantages, mask, _ = micro_batch(seed=14, rows=rows * world)
    den = losses.loss_denominators(mask, across_ranks=False)
    for name in ("clip_cov", "kl_cov"):
        logp = log_prob.clone().requires_grad_(True)
        if name == "kl_cov":
            selected = losses.kl_cov_select(logp, advantages, mask, ratio=0.05)
            loss, _ = losses.kl_cov_loss(
                logp, old, advantages, mask, coef=0.7, selected=selected, denominators=den
            )
        else:
            # the first call of a process draws with seed 0, the same on both ranks
            selected = losses.clip_cov_select(
                logp,
                old,
                advantages,
                mask,
                ratio=0.05,
                lb=0.5,
                ub=4.0,
                clip_low=0.2,
                clip_high=0.28,
                generator=torch.Generator().manual_seed(0),
            )
            loss, _ = losses.clip_cov_loss(
                logp,
                old,
                advantages,
                mask,
                clip_low=0.2,
                clip_high=0.28,
                selected=selected,
                denominators=den,
            )
        loss.backward()
        grads = torch.cat([r[name]["grad"] for r in results]) / world
        torch.testing.assert_close(grads, logp.grad, rtol=1e-6, atol=1e-8)
        total = sum(r[name]["loss"] for r in results) / world
        torch.testing.assert_close(total, loss.detach(), rtol=1e-6, atol=1e-7)
        cov_all = dynamics.covariance_summary(
            dynamics.token_covariance(old, advantages, mask), mask
        )["all"]
        assert [r[name]["cov_all"] for r in results] == [pytest.approx(cov_all)] * world


# -- CE-GPPO and the advantage estimators (algorithms.md §4.8, §6.8, §6.9) -------------------------


def ce_gppo_config(info, beta1, beta2):
    config = FSDPActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        policy_loss=ours.EntroprlPolicyLossConfig(
            loss_mode="entroprl_ce_gppo", ce_gppo_beta1=beta1, ce_gppo_beta2=beta2
        ),
    )
    config.global_batch_info.update(info)
    return config


@pytest.mark.parametrize("weighted", [False, True], ids=["no-is", "rollout-is"])
@pytest.mark.parametrize(
    "info", [{}, GLOBAL_INFO | {"loss_scale_factor": 32}], ids=["local", "global"]
)
@pytest.mark.parametrize("mode", MODES)
def test_ce_gppo_is_verls_ppo_in_value_and_in_gradient_inside_the_clip(mode, info, weighted):
    """CE-GPPO keeps PPO's value times beta on the clipped tokens and their gradient times beta:
    with beta = 1 its loss is verl's vanilla loss, with beta = 0 its gradient is verl's, in every
    aggregation, with verl's global batch sizes and importance weights; between, the clipped
    tokens get beta times the unclipped gradient."""
    old, log_prob, advantages, mask, weights = micro_batch(seed=21)
    old = old + 0.5 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3))
    weights = weights if weighted else None
    vanilla = core_algos.get_policy_loss_fn("vanilla")
    fn = core_algos.get_policy_loss_fn("entroprl_ce_gppo")
    theirs = run(vanilla, old, log_prob, advantages, mask, mode, actor_config(info), weights)
    ones = run(fn, old, log_prob, advantages, mask, mode, ce_gppo_config(info, 1.0, 1.0), weights)
    zeros = run(fn, old, log_prob, advantages, mask, mode, ce_gppo_config(info, 0.0, 0.0), weights)
    torch.testing.assert_close(ones[0], theirs[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(zeros[1], theirs[1], rtol=1e-6, atol=1e-8)
    clipped = (zeros[1] == 0) & (ones[1] != 0)
    assert clipped.any() and ones[2]["actor/pg_clipfrac"] > 0
    half = run(fn, old, log_prob, advantages, mask, mode, ce_gppo_config(info, 0.5, 0.5), weights)
    torch.testing.assert_close(half[1][clipped], 0.5 * ones[1][clipped], rtol=1e-6, atol=1e-9)
    assert set(ones[2]) == {
        "actor/pg_clipfrac",
        "actor/pg_clipfrac_lower",
        "actor/ppo_kl",
        "actor/ce_gppo_low_frac",
        "actor/ce_gppo_high_frac",
    }


def test_ce_gppo_betas_reach_it_through_verls_config_target():
    """`policy_loss._target_` names entroprl's config class: verl builds it from the YAML."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    actor = OmegaConf.create(
        {
            "_target_": "verl.workers.config.FSDPActorConfig",
            "strategy": "fsdp",
            "rollout_n": 1,
            "ppo_micro_batch_size_per_gpu": 2,
            "policy_loss": {
                "_target_": "entroprl.integrations.verl.EntroprlPolicyLossConfig",
                "loss_mode": "entroprl_ce_gppo",
                "ce_gppo_beta1": 0.5,
            },
        }
    )
    config = omega_conf_to_dataclass(actor)
    assert isinstance(config.policy_loss, ours.EntroprlPolicyLossConfig)
    assert (config.policy_loss.ce_gppo_beta1, config.policy_loss.ce_gppo_beta2) == (0.5, 1.0)
    # verl's own config class: the defaults
    assert actor_config().policy_loss.get("ce_gppo_beta1", None) is None


def test_estimators_through_verls_registry():
    from omegaconf import OmegaConf

    from entroprl.algos.advantages import passk_advantages, qae_advantages

    rng = torch.Generator().manual_seed(5)
    rewards = (torch.rand(24, generator=rng) < 0.5).float()
    uids = [f"prompt-{i % 3}" for i in range(24)]  # groups not contiguous, as verl's may be
    groups = torch.tensor([i % 3 for i in range(24)])
    token_rewards = torch.zeros(24, 5)
    token_rewards[:, 2] = rewards
    mask = torch.ones(24, 5)
    mask[0, 3:] = 0
    config = OmegaConf.create({"adv_estimator": "entroprl_qae", "quantile_k": 0.3, "pass_k": 2})
    config.norm_adv_by_std_in_grpo = False
    for name, expected in (
        ("entroprl_qae", qae_advantages(rewards, groups, quantile=0.3, norm_by_std=False)),
        ("entroprl_passk", passk_advantages(rewards, groups, k=2)),
    ):
        fn = core_algos.get_adv_estimator_fn(name)
        advantages, returns = fn(
            token_level_rewards=token_rewards, response_mask=mask, index=uids, config=config
        )
        torch.testing.assert_close(advantages, expected[:, None] * mask)
        assert returns is advantages
    with pytest.raises(ValueError, match="0 or 1"):
        core_algos.get_adv_estimator_fn("entroprl_passk")(
            token_level_rewards=token_rewards - 1, response_mask=mask, index=uids, config=config
        )
