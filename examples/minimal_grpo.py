"""GRPO with the entropy diagnostics in one file, from entroprl's pure functions: the newcomer's
door. It trains the demo's tiny model on Countdown, on the CPU, and prints each step's entropy,
accuracy and the entropy change the covariance predicts.

    python examples/minimal_grpo.py [--steps 30] [--clip-cov]

`entroprl.train.trainer.Trainer` does the same with everything a real run needs (several
mini-batches, micro-batches, ranks, mixed precision, checkpoints, evaluation, logging); this file
shows the algorithm and nothing else. Each line names the section of docs/algorithms.md it follows.
"""

from __future__ import annotations

import argparse
import random
from functools import partial

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from entroprl.algos.advantages import grpo_advantages
from entroprl.algos.dynamics import token_covariance
from entroprl.algos.entropy import batch_entropy
from entroprl.algos.losses import clip_cov_loss, ppo_loss
from entroprl.demo.warmstart import WarmStartConfig, default_cache_dir, warm_start
from entroprl.rollout.batch import response_mask_from_ids
from entroprl.rollout.sampler import sample
from entroprl.tasks.countdown import countdown_reward, generate_problems
from entroprl.train.forward import forward_log_probs

PROMPTS, GROUP, NEW_TOKENS, LR = 16, 8, 16, 1e-3


def rollout(model, tok, problems):
    """G responses to each prompt: (input ids, attention mask, response mask, texts)."""
    tok.padding_side = "left"
    enc = tok([p.prompt for p in problems], return_tensors="pt", padding=True)
    repeats = torch.full((len(problems),), GROUP)
    response = sample(
        model.eval(),
        enc["input_ids"],
        enc["attention_mask"],
        repeats,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    mask = response_mask_from_ids(response, tok.eos_token_id)
    response = torch.where(mask.bool(), response, tok.pad_token_id)
    prompt_ids = enc["input_ids"].repeat_interleave(GROUP, dim=0)
    prompt_mask = enc["attention_mask"].repeat_interleave(GROUP, dim=0)
    ids = torch.cat([prompt_ids, response], dim=1)
    attention = torch.cat([prompt_mask, mask.long()], dim=1)
    return ids, attention, mask, tok.batch_decode(response, skip_special_tokens=True)


def step(model, tok, optimizer, problems, clip_cov: bool) -> dict[str, float]:
    # rollout: G samples per prompt (entroprl.rollout.sampler draws what model.generate draws)
    ids, attention, mask, texts = rollout(model, tok, problems)
    # reward: the exact Countdown verifier, 1 for a correct expression
    answers = [p for p in problems for _ in range(GROUP)]
    rewards = torch.tensor([countdown_reward(t, p) for t, p in zip(texts, answers, strict=True)])
    # advantage: GRPO's group-normalised reward, every token of a response alike (§6.1)
    groups = torch.arange(len(problems)).repeat_interleave(GROUP)
    advantages = grpo_advantages(rewards, groups)[:, None] * mask
    # update: one on-policy step, so the old log-probs are the training forward's own (§4.1)
    model.train()
    log_prob, entropy = forward_log_probs(model, ids, attention, mask.shape[1])
    old = log_prob.detach()
    # Clip-Cov detaches a share of the tokens of highest log-prob/advantage covariance (§4.2)
    policy_loss = partial(clip_cov_loss, ratio=0.2) if clip_cov else ppo_loss
    loss, _ = policy_loss(log_prob, old, advantages, mask)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    # log: the paper's entropy H (§1.2), and the change the covariance predicts (§2.1, §3.1)
    covariance = token_covariance(old, advantages, mask)
    return {
        "entropy": batch_entropy(entropy, mask)["seq_mean_token_mean"],
        "acc": rewards.mean().item(),
        "predicted dH": -(covariance * mask).sum().item() / mask.sum().item(),
        "loss": loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--clip-cov", action="store_true", help="Clip-Cov instead of plain PPO")
    parser.add_argument("--model", default=None, help="a model folder (default: the demo's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    path = args.model or warm_start(WarmStartConfig(), default_cache_dir())
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    train = generate_problems(2000, seed=0, split="train")
    rng = random.Random(0)
    for t in range(1, args.steps + 1):
        metrics = step(model, tok, optimizer, rng.sample(train, PROMPTS), args.clip_cov)
        print(f"step {t:3d} " + "  ".join(f"{k} {v:+.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
