"""The rollout/training mismatch metrics and truncated importance sampling
(`entroprl.algos.mismatch`), against independent computations, and in the trainer with a backend
that reports log-probs."""

import copy
import math

import pytest
import torch

from entroprl.algos import losses
from entroprl.algos.mismatch import mismatch_metrics, rollout_is_weights
from entroprl.config import ConfigError, config_from_dict
from entroprl.rollout.batch import ScoredRollout
from entroprl.rollout.hf import HFBackend
from entroprl.train.forward import forward_log_probs
from entroprl.train.trainer import Trainer
from entroprl.train.update import update_policy
from tests.test_trainer import small_config


def _example():
    """Three responses of lengths 3, 1 and 2 over R = 3, padding holding junk."""
    train = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, 99.0, 99.0], [-3.0, -1.0, float("nan")]])
    rollout = torch.tensor([[-1.5, -2.0, -2.0], [-0.1, 0.0, 0.0], [-1.0, -1.2, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    return train, rollout, mask


def test_mismatch_metrics_by_hand():
    train, rollout, mask = _example()
    got = mismatch_metrics(train, rollout, mask)
    pairs = [(-1.0, -1.5), (-2.0, -2.0), (-0.5, -2.0), (-0.1, -0.1), (-3.0, -1.0), (-1.0, -1.2)]
    d = [t - r for t, r in pairs]
    rho = [math.exp(x) for x in d]
    want = {
        "log_prob_abs_diff_mean": sum(abs(x) for x in d) / 6,
        "log_prob_abs_diff_max": 2.0,
        "ratio_fraction_low": sum(r < 0.5 for r in rho) / 6,  # d = -2: rho 0.135
        "ratio_fraction_high": sum(r > 2 for r in rho) / 6,  # d = 1.5: rho 4.48
        "training_log_ppl": ((1 + 2 + 0.5) / 3 + 0.1 + (3 + 1) / 2) / 3,
        "rollout_log_ppl": ((1.5 + 2 + 2) / 3 + 0.1 + (1 + 1.2) / 2) / 3,
        "k3_kl": sum(r - x - 1 for r, x in zip(rho, d, strict=True)) / 6,
    }
    assert want["ratio_fraction_low"] == want["ratio_fraction_high"] == 1 / 6
    assert set(got) == {f"rollout_corr/{k}" for k in want}
    for key, value in want.items():
        assert got[f"rollout_corr/{key}"] == pytest.approx(value, rel=1e-6), key


def test_no_mismatch_measures_zero():
    train, _, mask = _example()
    got = mismatch_metrics(train, train.clone(), mask)
    for key in ("log_prob_abs_diff_mean", "log_prob_abs_diff_max", "ratio_fraction_low", "k3_kl"):
        assert got[f"rollout_corr/{key}"] == 0.0
    assert got["rollout_corr/training_log_ppl"] == got["rollout_corr/rollout_log_ppl"]


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_is_weights_by_hand(level):
    train, rollout, mask = _example()
    train = train.requires_grad_()
    weights, metrics = rollout_is_weights(train, rollout, mask, level=level, threshold=2.0)
    assert not weights.requires_grad
    d = torch.where(mask.bool(), train.detach() - rollout, 0.0)
    # sequence level: one weight per response, the product of its token ratios
    rho = d.exp() if level == "token" else d.sum(-1, keepdim=True).exp().expand(-1, 3)
    want = torch.where(mask.bool(), rho.clamp(max=2.0), 0.0)
    torch.testing.assert_close(weights, want)
    valid = rho[mask.bool()]
    assert metrics["rollout_corr/rollout_is_max"] == pytest.approx(valid.max().item())
    assert metrics["rollout_corr/rollout_is_ratio_fraction_high"] == pytest.approx(
        (valid > 2).float().mean().item()
    )
    assert metrics["rollout_corr/rollout_is_mean"] == pytest.approx(want[mask.bool()].mean().item())


def test_bad_inputs_name_what_is_wrong():
    train, rollout, mask = _example()
    with pytest.raises(ValueError, match="rollout_is level"):
        rollout_is_weights(train, rollout, mask, level="tokens")
    with pytest.raises(ValueError, match="rollout_is_threshold"):
        rollout_is_weights(train, rollout, mask, threshold=0.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        mismatch_metrics(train, rollout[:, :2], mask)
    with pytest.raises(ValueError, match="rollout_log_prob contains NaN"):
        mismatch_metrics(train, torch.full_like(rollout, float("nan")), mask)
    with pytest.raises(ValueError, match="selects no token"):
        mismatch_metrics(train, rollout, torch.zeros_like(mask))
    with pytest.raises(ConfigError, match=r"algorithm\.rollout_is"):
        config_from_dict({"algorithm": {"rollout_is": "token"}})  # hf reports no log-probs
    with pytest.raises(ConfigError, match=r"algorithm\.rollout_is"):
        config_from_dict({"algorithm": {"rollout_is": "seq"}, "rollout": {"backend": "vllm"}})
    with pytest.raises(ConfigError, match=r"algorithm\.rollout_is_threshold"):
        config_from_dict({"algorithm": {"rollout_is_threshold": -1.0}})


def test_a_loss_that_takes_no_weights_is_refused_with_rollout_is(monkeypatch):
    def plain(log_prob, old_log_prob, advantages, response_mask, *, loss_agg_mode, denominators):
        raise AssertionError("never called")

    monkeypatch.setitem(losses.POLICY_LOSSES, "plain", losses.PolicyLossSpec("plain", plain))
    with pytest.raises(ConfigError, match=r"algorithm\.rollout_is: policy loss 'plain' takes no"):
        config_from_dict(
            {
                "algorithm": {"rollout_is": "token", "policy_loss": "plain"},
                "rollout": {"backend": "vllm"},
            }
        )
    config_from_dict({"algorithm": {"policy_loss": "plain"}})  # without the correction it may


# -- a synthetic mismatch, corrected in expectation ------------------------------------------------

V = 6


def _policies():
    """The trainer's pi (logits with gradient) and a different engine policy mu, over V tokens,
    with per-token advantages."""
    pi_logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 0.3, -1.0], requires_grad=True)
    mu = torch.softmax(torch.tensor([-0.5, 1.2, 0.8, -0.2, -0.6, 0.4]), -1)
    advantage = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.5, -2.0])
    return pi_logits, mu, advantage


def _sampled_gradient(n, weights_fn, seed=0):
    """-grad of the trainer's PPO loss (token-mean) over n tokens drawn from mu, on-policy with
    respect to pi (old = current log-probs), each token's loss weighted as the trainer weights
    it: (1/n) sum_i w_i A(y_i) grad log pi(y_i)."""
    pi_logits, mu, advantage = _policies()
    y = torch.multinomial(mu, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    logp = torch.log_softmax(pi_logits, -1)[y][:, None]
    mask = torch.ones(n, 1)
    w = weights_fn(logp.detach(), mu.log()[y][:, None], mask)
    loss, _ = losses.ppo_loss(logp, logp.detach(), advantage[y][:, None], mask, weights=w)
    (grad,) = torch.autograd.grad(-loss, pi_logits)
    return grad


def _expected_gradient(weight_of):
    """sum_y mu(y) weight(y) A(y) grad log pi(y), exactly."""
    pi_logits, mu, advantage = _policies()
    logp = torch.log_softmax(pi_logits, -1)
    w = weight_of(logp.detach().exp() / mu)
    (grad,) = torch.autograd.grad((mu * w * advantage * logp).sum(), pi_logits)
    return grad


def test_truncated_is_corrects_a_synthetic_mismatch_in_expectation():
    """Tokens drawn from mu: the plain update is the on-policy gradient of mu, not of pi; with
    token-level IS weights (no truncation at C = 100) the sampled gradient is pi's on-policy
    gradient E_pi[A grad log pi]; with C = 1.2 it is the truncated expectation."""
    n = 400_000
    on_policy = _expected_gradient(lambda rho: rho)  # = sum_y pi(y) A(y) grad log pi(y)
    plain = _sampled_gradient(n, lambda lp, rlp, m: torch.ones_like(lp))
    corrected = _sampled_gradient(
        n, lambda lp, rlp, m: rollout_is_weights(lp, rlp, m, threshold=100.0)[0]
    )
    truncated = _sampled_gradient(
        n, lambda lp, rlp, m: rollout_is_weights(lp, rlp, m, threshold=1.2)[0]
    )
    # Monte Carlo error of a mean of 400k bounded terms: a few 1e-3
    tolerance = 0.01
    assert (plain - on_policy).abs().max() > 5 * tolerance  # the mismatch is a real bias
    torch.testing.assert_close(corrected, on_policy, atol=tolerance, rtol=0)
    torch.testing.assert_close(
        truncated, _expected_gradient(lambda rho: rho.clamp(max=1.2)), atol=tolerance, rtol=0
    )
    assert (truncated - on_policy).abs().max() > 5 * tolerance  # C = 1.2 truncates here


def test_sequence_level_is_is_unbiased_for_whole_responses():
    """E_mu[W(y) f(y)] = E_pi[f(y)] for a function of a whole two-token response y, with W the
    sequence-level weight (the product of the token ratios)."""
    pi_logits, mu, _ = _policies()
    pi = torch.softmax(pi_logits.detach(), -1)
    n = 400_000
    y = torch.multinomial(mu, 2 * n, replacement=True, generator=torch.Generator().manual_seed(1))
    y = y.view(n, 2)
    w, _ = rollout_is_weights(
        pi.log()[y], mu.log()[y], torch.ones(n, 2), level="sequence", threshold=1e6
    )
    f = (y[:, 0] == y[:, 1]).double()  # both tokens equal
    want = (pi * pi).sum().item()  # E_pi[f]
    assert (f.mean().item() - want) > 0.01  # without weights: E_mu[f], off
    weighted = w[:, 0].double() * f
    four_sigma = 4 * weighted.std().item() / math.sqrt(n)
    assert weighted.mean().item() == pytest.approx(want, abs=four_sigma)


@pytest.mark.parametrize("policy_loss", sorted(losses.POLICY_LOSSES))
def test_weights_multiply_each_token_loss(policy_loss):
    """Every registered loss with `weights` is the token-mean of w_t times each token's loss
    alone (verl's pg_losses * rollout_is_weights), its selection's penalty or zero included."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(5, 7, generator=g) * 3
    old = logp + 0.4 * torch.randn(5, 7, generator=g)  # ratios on both sides of the clip range
    adv = torch.randn(5, 7, generator=g)
    w = torch.rand(5, 7, generator=g) * 2
    mask = torch.ones(5, 7)
    spec = losses.get_policy_loss(policy_loss)
    extra = {}
    if spec.select is not None:  # a third of the tokens treated apart
        extra["selected"] = torch.rand(5, 7, generator=g) < 1 / 3
    weighted, _ = spec.fn(logp, old, adv, mask, weights=w, **extra)
    per_token = torch.stack(
        [
            spec.fn(logp[i : i + 1, t : t + 1], old[i : i + 1, t : t + 1],
                    adv[i : i + 1, t : t + 1], mask[i : i + 1, t : t + 1],
                    **({k: v[i : i + 1, t : t + 1] for k, v in extra.items()}))[0]
            for i in range(5)
            for t in range(7)
        ]
    ).view(5, 7)  # fmt: skip
    torch.testing.assert_close(weighted, (w * per_token).mean())


# -- in the trainer --------------------------------------------------------------------------------


class ReportingBackend(HFBackend):
    """HF sampling that also reports rollout log-probs: the model's own, shifted by `shift`."""

    shift = 0.0

    def generate(self, prompts, **kwargs):
        batch = super().generate(prompts, **kwargs)
        with torch.no_grad():
            logp, _ = forward_log_probs(
                self.model, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1]
            )
        batch.rollout_log_probs = (logp - self.shift) * batch.response_mask
        return batch


def _trainer(tmp_path, seed_policy, **algorithm):
    model, tok = seed_policy
    config = small_config(
        tmp_path,
        rollout={"prompts_per_step": 2, "max_new_tokens": 6},
        trainer={"steps": 1, "eval_every": 0, "entropy_change_every": 0},
        optim={"lr": 0.1, "grad_clip": 1e9},
    )
    trainer = Trainer(config, model=model, tokenizer=tok)
    trainer.backend = ReportingBackend(model, tok)
    # SGD: an update proportional to the gradient (Adam's first step hardly sees its scale)
    trainer.actor.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def score(batch, answers):  # seeded rewards that differ within groups (advantages != 0)
        g = torch.Generator().manual_seed(0)
        rewards = torch.randint(0, 2, (len(batch.texts),), generator=g).float()
        return ScoredRollout(batch=batch, scores=rewards, rewards=rewards)

    trainer.score = score
    # set after validation: the config ties rollout_is to the vllm backend, which this stands for
    for key, value in algorithm.items():
        setattr(trainer.config.algorithm, key, value)
    return trainer


def _weights(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.actor.model.parameters()])


def test_trainer_logs_the_mismatch_and_applies_truncated_is(tmp_path):
    """A constant log-prob gap is measured as such; TIS with no gap changes nothing, and with a
    gap whose ratio exceeds C every weight is C, the update that of C times the advantages."""
    from tests.policies import make_tiny_policy

    runs = {}
    for name, shift, algorithm in [
        ("plain", 0.0, {}),
        ("tis, no gap", 0.0, {"rollout_is": "token"}),
        ("tis, gap", 1.0, {"rollout_is": "token", "rollout_is_threshold": 2.0}),
        ("plain, 2A", 0.0, {}),
    ]:
        trainer = _trainer(tmp_path / name.replace(" ", ""), make_tiny_policy(), **algorithm)
        trainer.backend.shift = shift
        if name == "plain, 2A":
            trainer.shaped_advantages = lambda *args, f=trainer.shaped_advantages: 2 * f(*args)
        metrics = trainer.train_step(1)
        runs[name] = (_weights(trainer), metrics)
    metrics = runs["tis, gap"][1]
    # the trainer's log-probs are the rollout's + 1 (to float rounding)
    assert metrics["rollout_corr/log_prob_abs_diff_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["rollout_corr/ratio_fraction_high"] == 1.0  # e > 2
    assert metrics["rollout_corr/rollout_is_mean"] == pytest.approx(2.0)
    assert metrics["rollout_corr/rollout_is_ratio_fraction_high"] == 1.0
    assert runs["plain"][1]["rollout_corr/log_prob_abs_diff_max"] < 1e-5
    assert "rollout_corr/rollout_is_mean" not in runs["plain"][1]
    torch.testing.assert_close(runs["tis, no gap"][0], runs["plain"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(runs["tis, gap"][0], runs["plain, 2A"][0], atol=1e-6, rtol=0)
    assert not torch.allclose(runs["tis, gap"][0], runs["plain"][0])


def test_rollout_log_probs_follow_their_rows_through_concat_and_rows():
    from entroprl.demo.tokenizer import build_char_tokenizer
    from entroprl.rollout.batch import concat_batches
    from entroprl.rollout.vllm import assemble_batch

    tok = build_char_tokenizer()  # eos 1
    a = assemble_batch([[5]], [[7, 1], [8]], 2, tok, log_probs=[[-1.0, -2.0], [-3.0]])
    b = assemble_batch([[6, 6]], [[9, 9, 9]], 1, tok, log_probs=[[-4.0, -5.0, -6.0]])
    both = concat_batches([a, b], tok.pad_token_id)
    assert both.rollout_log_probs.tolist() == [[-1, -2, 0], [-3, 0, 0], [-4, -5, -6]]
    assert both.rows(torch.tensor([1, 0])).rollout_log_probs.tolist() == [[-3, 0], [-1, -2]]
    no_log_probs = assemble_batch([[5]], [[7]], 1, tok)
    assert concat_batches([a, no_log_probs], tok.pad_token_id).rollout_log_probs is None


def test_trainer_weights_kl_cov_penalty_as_verl():
    """With rollout IS, an update's KL-Cov loss is verl's compute_policy_loss_kl_cov: the weight
    multiplies each token's whole loss, the |logp - old| penalty of the selected tokens included
    (pg_losses * rollout_is_weights), written out here by hand, selection included."""
    from dataclasses import replace

    from tests.policies import make_tiny_policy
    from tests.test_trainer import _update_batch

    model, tok = make_tiny_policy()
    batch = _update_batch(tok)  # off-policy old log-probs: the penalty is not 0
    g = torch.Generator().manual_seed(1)
    w = torch.rand(batch.response_mask.shape, generator=g) * 2 * batch.response_mask
    batch = replace(batch, rollout_is_weights=w)
    config = config_from_dict(
        {
            "algorithm": {
                "policy_loss": "kl_cov",
                "loss": {"kl_cov": {"ratio": 0.25, "coef": 0.7}},
            },
            "rollout": {"max_new_tokens": 6},
            "optim": {"mini_batch_size": 8, "micro_batch_size": 8, "grad_clip": 1e9},
        }
    )
    # by hand, on a copy: verl's per-token loss, times w, token-mean
    reference = copy.deepcopy(model)
    logp, _ = forward_log_probs(reference, batch.input_ids, batch.attention_mask, 6)
    valid = batch.response_mask.bool()
    # the top-k by cov, of the rollout's log-probs: the first mini-batch's, as nothing has moved
    # (algorithms.md §3.4)
    lp, adv = batch.old_log_prob[valid].double(), batch.advantages[valid].double()
    cov = (lp - lp.mean()) * (adv - adv.mean())
    k = int(0.25 * valid.sum())
    selected = torch.zeros_like(valid)
    selected[valid.nonzero()[cov.argsort(descending=True)[:k]].unbind(-1)] = True
    log_ratio = logp - batch.old_log_prob
    per_token = -batch.advantages * log_ratio.exp() + 0.7 * log_ratio.abs() * selected
    expected = (w * per_token)[valid].sum() / valid.sum()
    expected.backward()
    assert (w * 0.7 * log_ratio.abs() * selected)[valid].sum() > 0.05  # the penalty counts
    lr = 0.5
    metrics = update_policy(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        batch,
        config,
        generator=torch.Generator().manual_seed(0),
    ).metrics
    assert metrics["actor/pg_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["actor/kl_cov_selected"] == k
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach() - lr * q.grad, atol=1e-6, rtol=1e-5)
