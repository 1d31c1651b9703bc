"""Regression tests for the places where the trainer's wiring departed from the papers: the plateau
latch of position shaping, REINFORCE++ whitening over the groups kept, empty mini-batches, the
samples each logged entropy and covariance is taken over, and metrics that do not depend on how a
batch is split."""

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from entroprl.algos import losses
from entroprl.analysis.law import detect_plateau_online
from entroprl.config import config_from_dict
from entroprl.rollout.batch import ScoredRollout
from entroprl.train.forward import forward_log_probs
from entroprl.train.rundir import read_metrics
from entroprl.train.trainer import Trainer
from entroprl.train.update import UpdateBatch, UpdateResult, update_policy
from tests.policies import alternating_scores, make_tiny_policy
from tests.test_trainer import (
    SPLIT_TEST_SETTINGS,
    _update_batch,
    controller_kwargs,
    small_config,
)

# -- position shaping: the plateau, once found, stays ----------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_position_shaping_latches_once_the_plateau_is_found(tiny_policy, tmp_path, seed):
    """Fed a noisy entropy decay step by step, the trainer switches position shaping on once,
    when the decay has slowed to under a fifth of its peak rate, and never off again."""
    model, tok = tiny_policy
    config = small_config(tmp_path, algorithm={"position_shaping_alpha": 0.05})
    trainer = Trainer(config, model=model, tokenizer=tok)
    tau, t = 20.0, np.arange(200)
    curve = 0.3 + 0.7 * np.exp(-t / tau) + 0.1 * np.random.default_rng(seed).standard_normal(200)
    active = []
    for step in range(1, 201):
        trainer.entropy_history.append(float(curve[step - 1]))
        trainer.detect_plateau(step)
        active.append(trainer.position_shaping_active(step))
    first = active.index(True) + 1
    assert all(active[first - 1 :]), "position shaping switched off again"
    assert math.exp(-(first - 1) / tau) <= 0.2  # the decay had slowed before it switched on
    assert trainer.plateau_start == detect_plateau_online(curve[:first]) + 1
    assert trainer.state()["plateau_start"] == trainer.plateau_start


def test_plateau_start_is_logged_and_kept_on_resume(tmp_path):
    model, tok = make_tiny_policy()
    config = small_config(
        tmp_path,
        algorithm={"position_shaping_alpha": 0.05},
        trainer={"steps": 2, "save_every": 1, "eval_every": 0},
    )
    trainer = Trainer(config, model=model, tokenizer=tok)
    trainer.plateau_start = 1  # as if found at step 1
    trainer.train()
    assert [r["stages/plateau_start"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 1]
    model, tok = make_tiny_policy()
    config = small_config(
        tmp_path,
        algorithm={"position_shaping_alpha": 0.05},
        trainer={"steps": 3, "save_every": 1, "eval_every": 0},
    )
    resumed = Trainer(config, model=model, tokenizer=tok)
    assert resumed.resume()
    assert resumed.plateau_start == 1 and resumed.position_shaping_active(3)


# -- dynamic sampling: the training batch is the groups kept ---------------------------------------

# prompts_per_step 4, n 4: groups 0 and 2 are informative, 1 and 3 all-equal in score
SCORES = [[0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1], [1, 1, 1, 1]]


def _scripted_step(tmp_path, advantage="grpo", **algorithm):
    """One train_step with the scores above; returns its metrics, the batch, the policy before the
    update and the UpdateBatch the update received."""
    model, tok = make_tiny_policy()
    config = small_config(
        tmp_path,
        algorithm={"dynamic_sampling": True, "advantage": advantage, **algorithm},
        trainer={"steps": 1, "eval_every": 0},
    )
    trainer = Trainer(config, model=model, tokenizer=tok)
    scores = torch.tensor(SCORES, dtype=torch.float32).flatten()

    def score(batch, answers):
        # rewards differ within every group (an overlong-like shaping): only the score filters
        return ScoredRollout(
            batch=batch, scores=scores.clone(), rewards=scores + 0.01 * torch.arange(16.0)
        )

    trainer.score = score
    seen = {}
    real_sample = trainer.sample

    def sample(step):
        out = real_sample(step)
        seen["batch"], seen["rewards"] = out.scored.batch, out.scored.rewards
        seen["before"] = copy.deepcopy(trainer.actor.model)
        return out

    trainer.sample = sample
    import entroprl.train.actor as actor_module

    real_update = actor_module.update_policy

    def update(model, optimizer, batch, config, **kwargs):
        seen["update"] = batch
        return real_update(model, optimizer, batch, config, **kwargs)

    actor_module.update_policy = update
    try:
        metrics = trainer.train_step(1)
    finally:
        actor_module.update_policy = real_update
    return metrics, seen


def test_dynamic_sampling_filters_on_the_score_not_the_shaped_reward(tmp_path):
    metrics, seen = _scripted_step(tmp_path)
    kept = seen["update"].response_mask.any(-1).view(4, 4).all(-1)
    assert kept.tolist() == [True, False, True, False]
    assert metrics["batch/kept_fraction"] == 0.5
    metrics, seen = _scripted_step(tmp_path / "reward", dynamic_sampling_metric="reward")
    assert metrics["batch/kept_fraction"] == 1.0


def test_reinforce_pp_whitens_over_the_groups_kept(tmp_path):
    """Filtered groups' zeros must not enter the whitening (verl whitens the filtered batch)."""
    _, seen = _scripted_step(tmp_path, advantage="reinforce_pp_baseline")
    batch, rewards = seen["batch"], seen["rewards"].double().numpy()
    mask = batch.response_mask.numpy()
    kept = np.repeat([True, False, True, False], 4)
    # independent computation: group baseline, then token-weighted whitening over kept tokens
    s = rewards - np.repeat(rewards.reshape(4, 4).mean(1), 4)
    weights = mask[kept]
    scores = np.repeat(s[kept, None], mask.shape[1], 1)
    n = weights.sum()
    mean = (scores * weights).sum() / n
    var = (((scores - mean) * weights) ** 2).sum() / (n - 1)
    expected = (scores - mean) / np.sqrt(var + 1e-8) * weights
    got = seen["update"].advantages.double().numpy()
    np.testing.assert_allclose(got[kept], expected, rtol=1e-5, atol=1e-6)
    assert np.all(got[~kept] == 0)


def test_entropy_and_covariance_are_logged_over_the_training_batch(tmp_path):
    metrics, seen = _scripted_step(tmp_path)
    batch, before = seen["batch"], seen["before"]
    R = batch.response_mask.shape[1]
    with torch.no_grad():
        logp, entropy = forward_log_probs(before, batch.input_ids, batch.attention_mask, R)
    mask = batch.response_mask.bool()
    kept = torch.tensor([True, False, True, False]).repeat_interleave(4)

    def token_mean(rows):
        return entropy[rows][mask[rows]].mean().item()

    def seq_mean(rows):
        m = mask[rows].float()
        return ((entropy[rows] * m).sum(-1) / m.sum(-1)).mean().item()

    assert metrics["actor/entropy"] == pytest.approx(token_mean(kept), rel=1e-4)
    assert metrics["actor/entropy_seq_mean"] == pytest.approx(seq_mean(kept), rel=1e-4)
    everything = torch.ones(16, dtype=torch.bool)
    assert metrics["sampled/entropy"] == pytest.approx(token_mean(everything), rel=1e-4)
    assert metrics["sampled/entropy_seq_mean"] == pytest.approx(seq_mean(everything), rel=1e-4)
    # cov/all: the mean of (logp - mean)(A - mean) over the kept tokens only
    adv = seen["update"].advantages
    lp, a = logp[kept][mask[kept]].double(), adv[kept][mask[kept]].double()
    cov = ((lp - lp.mean()) * (a - a.mean())).mean().item()
    assert metrics["cov/all"] == pytest.approx(cov, rel=1e-4, abs=1e-7)
    assert metrics["dynamics/predicted_entropy_change"] == pytest.approx(-cov, rel=1e-4, abs=1e-7)


# -- mini-batches with nothing in the loss ---------------------------------------------------------


@pytest.mark.parametrize(
    ("policy_loss", "cov_scope"),
    [
        ("ppo", "minibatch"),
        ("kl_cov", "minibatch"),
        ("kl_cov", "micro"),
        ("clip_cov", "micro"),
        ("entropic", "minibatch"),
        ("entropic", "micro"),
    ],
)
def test_empty_minibatch_is_skipped_and_counted(policy_loss, cov_scope):
    """Only row 0 enters the loss: of the two random mini-batches of four, one is empty each
    epoch; it is skipped (not a crash), and in the per-micro-batch scope so are empty
    micro-batches' selections."""
    model, tok = make_tiny_policy()
    batch = _update_batch(tok)
    only_row_0 = torch.zeros(8, 1)
    only_row_0[0] = 1
    with torch.no_grad():  # on-policy, so that PPO's clip leaves row 0 a gradient
        old, _ = forward_log_probs(model, batch.input_ids, batch.attention_mask, 6)
    batch = UpdateBatch(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        response_mask=batch.response_mask * only_row_0,
        old_log_prob=old,
        advantages=batch.advantages,
    )
    config = config_from_dict(
        {
            "algorithm": {
                "policy_loss": policy_loss,
                "cov_scope": cov_scope,
                "loss": {"entropic": SPLIT_TEST_SETTINGS["entropic"]},
            },
            "rollout": {"max_new_tokens": 6},
            "optim": {"mini_batch_size": 4, "micro_batch_size": 2, "epochs": 2},
        }
    )
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = update_policy(
        model,
        opt,
        batch,
        config,
        generator=torch.Generator().manual_seed(0),
        loss_kwargs=controller_kwargs(config),
    ).metrics
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert metrics["actor/empty_minibatches"] == 2 and metrics["actor/skipped_updates"] == 0
    assert not torch.equal(before, after)


# -- metrics that do not depend on the split ------------------------------------------------------


@pytest.mark.parametrize("policy_loss", sorted(losses.POLICY_LOSSES))
def test_logged_metrics_do_not_depend_on_the_micro_batch_split(policy_loss):
    """pg_loss, kl_loss and the selection counts are the mini-batch's, not a mean over its
    micro-batches (which shrank with their number)."""
    runs = []
    for micro in (8, 4, 2):
        model, tok = make_tiny_policy()
        batch = _update_batch(tok)
        batch.ref_log_prob = batch.old_log_prob - 0.1
        config = config_from_dict(
            {
                "algorithm": {
                    "policy_loss": policy_loss,
                    "loss": SPLIT_TEST_SETTINGS,
                    "kl_coef": 0.1,
                },
                "rollout": {"max_new_tokens": 6},
                "optim": {"mini_batch_size": 8, "micro_batch_size": micro, "epochs": 2},
            }
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        metrics = update_policy(
            model,
            opt,
            batch,
            config,
            generator=torch.Generator().manual_seed(0),
            loss_kwargs=controller_kwargs(config),
        ).metrics
        runs.append(metrics)
    assert runs[0]["actor/pg_loss"] != 0
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for key, value in runs[0].items():
            assert other[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    if policy_loss == "kl_cov":
        assert runs[0]["actor/kl_cov_selected"] == math.floor(0.1 * 40)  # 40 valid tokens
    summed = losses.get_policy_loss(policy_loss).summed_metrics
    assert summed <= {k.removeprefix("actor/") for k in runs[0]}


def test_lopti_logs_both_passes(tmp_path, monkeypatch):
    """Lopti updates twice per step; the second pass's metrics used to overwrite the first's."""
    import entroprl.train.actor as actor_module

    passes = iter(
        [
            {"actor/pg_loss": 1.0, "actor/skipped_updates": 1, "actor/empty_minibatches": 0},
            {"actor/pg_loss": 3.0, "actor/skipped_updates": 0, "actor/empty_minibatches": 2},
        ]
    )
    empty = torch.zeros(0)
    monkeypatch.setattr(
        actor_module,
        "update_policy",
        lambda *args, **kwargs: UpdateResult(next(passes), empty, empty, moved=True),
    )
    model, tok = make_tiny_policy()
    config = small_config(tmp_path, algorithm={"lopti_eta": 0.5}, trainer={"eval_every": 0})
    metrics = Trainer(config, model=model, tokenizer=tok).train_step(1)
    assert metrics["actor/pg_loss"] == 2.0
    assert (metrics["actor/skipped_updates"], metrics["actor/empty_minibatches"]) == (1, 2)


# -- every forward once --------------------------------------------------------------------------


@pytest.mark.parametrize(
    # a loss with a controller needs the step's entropy before the update: never on-policy
    "policy_loss",
    sorted(name for name, spec in losses.POLICY_LOSSES.items() if spec.controller is None),
)
@pytest.mark.parametrize("micro", [16, 4])
def test_on_policy_update_reuses_the_training_forward(tmp_path, monkeypatch, policy_loss, micro):
    """With one mini-batch and one epoch, the old log-probs and the entropy come from the training
    forward, detached (no pass of their own): the same update and the same logged values as with
    the separate no-grad pass, and one forward fewer. Scripted rewards differ within every group,
    so that the update has a gradient and moves the weights."""
    from entroprl.train import forward

    results = []
    initial = torch.cat([p.detach().flatten() for p in make_tiny_policy()[0].parameters()])
    for on_policy in (True, False):
        model, tok = make_tiny_policy()
        config = small_config(
            tmp_path / str(on_policy),
            algorithm={"policy_loss": policy_loss, "loss": SPLIT_TEST_SETTINGS},
            optim={"mini_batch_size": 16, "micro_batch_size": micro},
            trainer={"eval_every": 0},
        )
        trainer = Trainer(config, model=model, tokenizer=tok)
        trainer.score = alternating_scores
        assert trainer.on_policy
        passes = []
        real = forward.batched_log_probs

        def counting(*args, _real=real, _passes=passes, **kwargs):
            _passes.append(1)
            return _real(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(forward, "batched_log_probs", counting)
            if not on_policy:  # today's path: the old log-probs from a pass of their own
                patch.setattr(Trainer, "on_policy", False)
            metrics = trainer.train_step(1)
        weights = torch.cat([p.detach().flatten() for p in trainer.actor.model.parameters()])
        results.append((metrics, weights, len(passes)))
    (fused, w_fused, n_fused), (separate, w_separate, n_separate) = results
    assert separate["actor/grad_norm"] > 0 and (w_separate - initial).abs().max() > 1e-4
    torch.testing.assert_close(w_fused, w_separate, atol=1e-6, rtol=1e-5)
    for key, value in separate.items():
        if not key.startswith(("timing_s/", "perf/")):
            assert fused[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    has_selection = losses.get_policy_loss(policy_loss).select is not None
    # the separate path's old-log-prob pass; with a selection over several micro-batches the
    # on-policy path needs one no-grad pass for it (that pass then serves as nothing else)
    assert n_separate - n_fused == (0 if has_selection and micro < 16 else 1)


def test_on_policy_needs_nothing_before_the_update(tmp_path):
    model, tok = make_tiny_policy()
    one_minibatch = {"mini_batch_size": 16, "micro_batch_size": 4}
    for algorithm in (
        {"ppl_shaping_alpha": 0.01},
        {"low_prob_alpha": 0.1},
        {"lopti_eta": 0.5},
        {"high_entropy_rho": 0.2},
        {"position_shaping_alpha": 0.05},
        {"policy_loss": "entropic"},
    ):
        config = small_config(tmp_path, algorithm=algorithm, optim=one_minibatch)
        assert not Trainer(config, model=model, tokenizer=tok).on_policy, algorithm
    config = small_config(tmp_path, optim=one_minibatch | {"epochs": 2})
    assert not Trainer(config, model=model, tokenizer=tok).on_policy
    config = small_config(tmp_path)  # two mini-batches
    assert not Trainer(config, model=model, tokenizer=tok).on_policy


# -- Lopti: the second pass starts from moved weights ----------------------------------------------


@pytest.mark.parametrize("policy_loss", ["kl_cov", "clip_cov"])
def test_lopti_second_pass_selects_with_the_current_log_probs(tmp_path, monkeypatch, policy_loss):
    """With cov_logp=exact every whole-mini-batch selection sees the log-probs of the weights it
    is about to update (algorithms.md §3.4). Lopti's second pass starts where the first pass's
    optimizer steps left the weights, so its first mini-batch must not select with the
    rollout's log-probs, as if nothing had moved."""
    model, tok = make_tiny_policy()
    batch = _update_batch(tok)
    with torch.no_grad():  # the rollout's log-probs, as the trainer's own pass computes them
        old, _ = forward_log_probs(model, batch.input_ids, batch.attention_mask, 6)
    batch = replace(batch, old_log_prob=old)
    valid = batch.response_mask.bool()
    # half the tokens in each pass, so that both passes have advantages to select by
    eta = old[valid].exp().median().item()
    config = small_config(
        tmp_path,
        algorithm={"policy_loss": policy_loss, "loss": SPLIT_TEST_SETTINGS, "lopti_eta": eta},
        rollout={"max_new_tokens": 6},
        optim={"lr": 3e-2, "mini_batch_size": 8, "micro_batch_size": 4},
        trainer={"eval_every": 0},
    )
    trainer = Trainer(config, model=model, tokenizer=tok)
    spec = losses.get_policy_loss(policy_loss)
    gaps = []  # per selection: (|selecting - current|, |current - rollout|), max over its tokens

    def spying(log_prob, old_log_prob, advantages, mask, settings, **kwargs):
        # the mini-batch's rows, found by their (distinct) rollout log-probs
        rows = torch.stack([(old == row).all(-1).nonzero()[0, 0] for row in old_log_prob])
        with torch.no_grad():
            current, _ = forward_log_probs(
                model, batch.input_ids[rows], batch.attention_mask[rows], 6
            )
        m = mask.bool()
        gaps.append(
            (
                (log_prob - current)[m].abs().max().item(),
                (current - old_log_prob)[m].abs().max().item(),
            )
        )
        return spec.select(log_prob, old_log_prob, advantages, mask, settings, **kwargs)

    monkeypatch.setitem(losses.POLICY_LOSSES, policy_loss, replace(spec, select=spying))
    trainer.actor.update(batch, 1, entropy_coef=0.0, loss_kwargs=None, progress=False)
    assert len(gaps) == 2  # one mini-batch per pass
    assert gaps[1][1] > 0.05, gaps  # the first pass moved the weights: the check is not vacuous
    for selecting_vs_current, _ in gaps:
        assert selecting_vs_current < 1e-5, gaps
