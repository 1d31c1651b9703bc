"""Shared prompts computed once (`optim.shared_prefix`, `forward.shared_prefix_forward`): the same
log-probs, entropies and gradients as the full forward, and the same training step."""

from __future__ import annotations

import pytest
import torch

from entroprl.errors import ConfigError
from entroprl.train.forward import forward_log_probs
from entroprl.train.trainer import Trainer
from tests.policies import alternating_scores, make_tiny_policy
from tests.test_trainer import SPLIT_TEST_SETTINGS, small_config


def grouped_batch(tok, G: int, R: int, seed: int = 0):
    """Prompts of different lengths (left-padded), each repeated G times, with random responses
    of random lengths (right-padded), the rows shuffled so that groups are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    tok.padding_side = "left"
    prompts = ["1 2>3=", "12 3 4>9=", "5>5=", "7 8 9>24="]
    enc = tok(
        [p for p in prompts for _ in range(G)],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    rows = len(prompts) * G
    response = torch.randint(3, len(tok), (rows, R), generator=g)
    lengths = torch.randint(1, R + 1, (rows,), generator=g)
    mask = (torch.arange(R) < lengths[:, None]).long()
    response = torch.where(mask.bool(), response, tok.pad_token_id)
    order = torch.randperm(rows, generator=g)
    ids = torch.cat([enc["input_ids"], response], 1)[order]
    attention = torch.cat([enc["attention_mask"], mask], 1)[order]
    return ids, attention, mask[order].float()


@pytest.mark.parametrize("G", [1, 4])
def test_log_probs_entropies_and_gradients_equal_the_full_forward(G):
    model, tok = make_tiny_policy(seed=1)
    with torch.no_grad():  # away from the init's near-uniform logits
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    R = 7
    ids, attention, mask = grouped_batch(tok, G, R)
    weights = torch.randn(ids.shape[0], R)
    results = []
    for shared in (False, True):
        model.zero_grad()
        logp, entropy = forward_log_probs(
            model, ids, attention, R, entropy_grad=True, shared_prefix=shared, temperature=0.8
        )
        (((logp * weights + entropy) * mask).sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((logp.detach() * mask, entropy.detach() * mask, grads))
    (logp, entropy, grads), (logp_s, entropy_s, grads_s) = results
    torch.testing.assert_close(logp_s, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy_s, entropy, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_s, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("policy_loss", ["ppo", "clip_cov"])
def test_training_step_equals_the_full_forward(tmp_path, policy_loss):
    """A whole step (rollout, old log-probs or not, update over shuffled micro-batches) with the
    prompts computed once: the same weights and logged values, for an update that moves them."""
    initial = torch.cat([p.detach().flatten() for p in make_tiny_policy()[0].parameters()])
    results = []
    for shared in (False, True):
        model, tok = make_tiny_policy()
        config = small_config(
            tmp_path / str(shared),
            algorithm={"policy_loss": policy_loss, "loss": SPLIT_TEST_SETTINGS},
            optim={"shared_prefix": shared, "mini_batch_size": 8, "micro_batch_size": 4},
            trainer={"eval_every": 0, "entropy_change_every": 1},
        )
        trainer = Trainer(config, model=model, tokenizer=tok)
        trainer.score = alternating_scores
        metrics = trainer.train_step(1)
        weights = torch.cat([p.detach().flatten() for p in trainer.actor.model.parameters()])
        results.append((metrics, weights))
    (full, w_full), (shared, w_shared) = results
    assert full["actor/grad_norm"] > 0 and (w_full - initial).abs().max() > 1e-4
    torch.testing.assert_close(w_shared, w_full, atol=1e-6, rtol=1e-5)
    for key, value in full.items():
        if not key.startswith(("timing_s/", "perf/")):
            assert shared[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_shared_prefix_refuses_gradient_checkpointing(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.shared_prefix"):
        small_config(
            tmp_path, optim={"shared_prefix": True}, model={"gradient_checkpointing": True}
        )
