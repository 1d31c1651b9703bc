"""The RL trainer: rollout, reward, advantage, update, log. It owns all state; the algorithms it
composes are the pure functions of `entropy`, `dynamics`, `advantages` and `losses`.

Runs as one process or under `torchrun` (gloo on CPU, NCCL on GPU), the model replicated (DDP) or
sharded (FSDP2) over the ranks (`entroprl.parallel`): each rank samples its share of the prompts,
and covariance selections and loss denominators are global over the ranks, so an update does not
depend on how the batch is split.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from entroprl import advantages as adv_lib
from entroprl import distributed, dynamics, losses, mismatch, parallel
from entroprl.config import Config
from entroprl.entropy import batch_entropy, logprobs_and_entropy
from entroprl.evaluation import evaluate, score_samples
from entroprl.law import detect_stages
from entroprl.rollout import RolloutBatch, concat_batches, position_ids
from entroprl.rundir import RunDir, load_checkpoint_state, load_optimizer_state
from entroprl.tasks.base import Task
from entroprl.vllm_backend import make_backend

COV_LOSSES = ("clip_cov", "kl_cov")


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why."""


@dataclass
class UpdateBatch:
    """What one policy update consumes: rollouts with their old log-probs and advantages."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    """(B, R) tokens that enter the loss (high-entropy masking already applied)."""
    old_log_prob: Tensor
    advantages: Tensor
    ref_log_prob: Tensor | None = None
    rollout_is_weights: Tensor | None = None
    """(B, R) truncated importance weights on the rollout/training mismatch
    (`mismatch.rollout_is_weights`), or None when the correction is off."""

    def rows(self, index: Tensor) -> UpdateBatch:
        take = lambda t: None if t is None else t[index]  # noqa: E731
        return UpdateBatch(*(take(getattr(self, f)) for f in self.__dataclass_fields__))


def forward_log_probs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Log-probs of the response tokens and their entropies, from one forward pass.

    Only the last R + 1 positions' logits are computed (`logits_to_keep`): the prompt's logits are
    never needed.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=response_len + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]
    return logprobs_and_entropy(
        logits, input_ids[:, -response_len:], temperature=temperature, entropy_grad=entropy_grad
    )


@torch.no_grad()
def batched_log_probs(
    model, batch: RolloutBatch | UpdateBatch, micro_batch_size: int, temperature: float
) -> tuple[Tensor, Tensor]:
    """`forward_log_probs` over a whole batch in micro-batches, without gradient."""
    R = batch.response_mask.shape[1]
    parts = [
        forward_log_probs(
            model,
            batch.input_ids[i : i + micro_batch_size],
            batch.attention_mask[i : i + micro_batch_size],
            R,
            temperature=temperature,
        )
        for i in range(0, batch.input_ids.shape[0], micro_batch_size)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def policy_loss_kwargs(config: Config) -> dict[str, Any]:
    a = config.algorithm
    common = {"loss_agg_mode": a.loss_agg_mode}
    if a.policy_loss == "ppo":
        return common | {
            "clip_low": a.clip_low,
            "clip_high": a.clip_high,
            "clip_ratio_c": a.clip_ratio_c,
        }
    if a.policy_loss == "clip_cov":
        return common | {
            "ratio": a.clip_cov_ratio,
            "lb": a.clip_cov_lb,
            "ub": a.clip_cov_ub,
            "clip_low": a.clip_low,
            "clip_high": a.clip_high,
        }
    if a.policy_loss == "kl_cov":
        return common | {"ratio": a.kl_cov_ratio, "coef": a.kl_cov_coef}
    return common


def select_cov_tokens(
    config: Config, log_prob: Tensor, batch: UpdateBatch, generator: torch.Generator
) -> Tensor:
    """Clip-Cov / KL-Cov token selection over a whole mini-batch on all ranks (SPEC 3 Choice)."""
    kw = policy_loss_kwargs(config)
    if config.algorithm.policy_loss == "clip_cov":
        return losses.clip_cov_select(
            log_prob,
            batch.old_log_prob,
            batch.advantages,
            batch.response_mask,
            ratio=kw["ratio"],
            lb=kw["lb"],
            ub=kw["ub"],
            clip_low=kw["clip_low"],
            clip_high=kw["clip_high"],
            generator=generator,
            across_ranks=True,
        )
    return losses.kl_cov_select(
        log_prob, batch.advantages, batch.response_mask, ratio=kw["ratio"], across_ranks=True
    )


def update_policy(
    model,
    optimizer: torch.optim.Optimizer,
    batch: UpdateBatch,
    config: Config,
    *,
    generator: torch.Generator,
    entropy_coef: float = 0.0,
    progress: bool = False,
) -> tuple[dict[str, float], int]:
    """`epochs x mini-batches` optimizer steps on one rollout batch (this rank's rows).

    Each mini-batch is split into micro-batches whose losses use the whole mini-batch's
    denominators (and covariance selection), so the accumulated gradient equals that of the
    mini-batch in one piece. DDP and FSDP average the gradient over ranks, hence the loss is
    scaled by the world size to make it the global sum. Returns metrics and the number of
    updates skipped because the loss or gradient was not finite.
    """
    a, o = config.algorithm, config.optim
    loss_fn = losses.get_policy_loss(a.policy_loss)
    kwargs = policy_loss_kwargs(config)
    world = distributed.world_size()
    R = batch.response_mask.shape[1]
    norm_constant = config.rollout.max_new_tokens
    params = [p for p in model.parameters() if p.requires_grad]
    metrics: dict[str, list[float]] = defaultdict(list)
    skipped = 0
    n = batch.input_ids.shape[0]
    per_epoch = math.ceil(n / o.mini_batch_size)
    bar = tqdm(
        total=o.epochs * per_epoch,
        desc="update",
        unit="step",
        leave=False,
        disable=not progress or o.epochs * per_epoch == 1,
    )
    for _ in range(o.epochs):
        order = torch.randperm(n, generator=generator)
        for mini_rows in order.split(o.mini_batch_size):
            bar.update()
            mini = batch.rows(mini_rows)
            denominators = losses.loss_denominators(
                mini.response_mask, norm_constant=norm_constant, across_ranks=True
            )
            selected = None
            if a.policy_loss in COV_LOSSES and a.cov_scope == "minibatch":
                if a.cov_logp == "exact":
                    sel_logp, _ = batched_log_probs(
                        model, mini, o.log_prob_rows, config.rollout.temperature
                    )
                else:
                    sel_logp = mini.old_log_prob
                selected = select_cov_tokens(config, sel_logp, mini, generator)
            extra = (
                {}
                if a.policy_loss != "clip_cov" or selected is not None
                else {"generator": generator}
            )
            optimizer.zero_grad(set_to_none=True)
            finite = True
            micro_starts = range(0, mini_rows.numel(), o.micro_batch_size)
            for i, start in enumerate(micro_starts):
                rows = slice(start, start + o.micro_batch_size)
                mb = mini.rows(torch.arange(mini_rows.numel())[rows])
                # DDP all-reduces once per mini-batch; FSDP reduce-scatters every micro-batch
                # (it has no no_sync), which keeps its gradients sharded
                sync = i == len(micro_starts) - 1 or not hasattr(model, "no_sync")
                with contextlib.nullcontext() if sync else model.no_sync():
                    log_prob, entropy = forward_log_probs(
                        model,
                        mb.input_ids,
                        mb.attention_mask,
                        R,
                        temperature=config.rollout.temperature,
                        entropy_grad=entropy_coef > 0,
                    )
                    if selected is not None:
                        extra = {"selected": selected[rows]}
                    # The importance weight scales each token's policy-gradient term, as verl's
                    # pg_losses * rollout_is_weights: for w >= 0 the PPO and Clip-Cov token
                    # losses at advantage w * A are w times those at A (clip and dual clip
                    # included); KL-Cov's penalty stays unweighted. The covariance selections
                    # above use the unweighted advantages.
                    adv = mb.advantages
                    if mb.rollout_is_weights is not None:
                        adv = adv * mb.rollout_is_weights
                    loss, m = loss_fn(
                        log_prob,
                        mb.old_log_prob,
                        adv,
                        mb.response_mask,
                        denominators=denominators,
                        **kwargs,
                        **extra,
                    )
                    if entropy_coef > 0:
                        loss = loss + losses.entropy_bonus(
                            entropy,
                            mb.response_mask,
                            entropy_coef,
                            loss_agg_mode=a.loss_agg_mode,
                            denominators=denominators,
                        )
                    if a.kl_coef > 0:
                        kl = losses.kl_penalty(log_prob, mb.ref_log_prob, a.kl_estimator)
                        kl_loss = losses.aggregate_loss(
                            kl, mb.response_mask, a.loss_agg_mode, denominators=denominators
                        )
                        loss = loss + a.kl_coef * kl_loss
                        m["kl_loss"] = kl_loss.item()
                    finite = finite and bool(torch.isfinite(loss))
                    (loss * world).backward()
                for key, value in m.items():
                    metrics[key].append(value)
            grad_norm = parallel.global_grad_norm(
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            )
            if not (finite and torch.isfinite(grad_norm)):
                # A non-finite loss on any rank poisons the all-reduced gradient on every rank,
                # so every rank skips together.
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            optimizer.step()
            metrics["grad_norm"].append(grad_norm.item())
    bar.close()
    out = {f"actor/{k}": sum(v) / len(v) for k, v in metrics.items()}
    out["actor/skipped_updates"] = skipped
    return out, skipped


def load_policy(config: Config) -> tuple[PreTrainedModel, Any]:
    """The model and tokenizer to train: a local HF checkpoint, or the demo's warm start."""
    dtype = getattr(torch, config.model.dtype)
    if config.model.path is None:
        if config.data.task != "countdown":
            raise TrainingError(
                "model.path is required for tasks other than the built-in countdown"
            )
        from entroprl.warmstart import WarmStartConfig, default_cache_dir, warm_start

        path = warm_start(WarmStartConfig(), default_cache_dir())
    else:
        path = Path(config.model.path)
        if not (path / "config.json").is_file():
            raise TrainingError(
                f"model.path={path}: not a Hugging Face model directory (no config.json)"
            )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if config.model.gradient_checkpointing:
        # non-reentrant: the reentrant form breaks FSDP's per-layer parameter gathering
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        # torchrun's LOCAL_RANK: this node's GPU for this rank, also when several nodes train
        local = int(os.environ.get("LOCAL_RANK", distributed.rank()))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


class Trainer:
    """GRPO-family RL on a Hugging Face causal LM; `train()` runs `config.trainer.steps` steps."""

    def __init__(self, config: Config, *, task: Task | None = None, model=None, tokenizer=None):
        from entroprl.tasks.registry import build_task

        self.config = config
        c = config
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if c.rollout.prompts_per_step % self.world:
            raise TrainingError(
                f"rollout.prompts_per_step={c.rollout.prompts_per_step} must be "
                f"divisible by the number of ranks ({self.world})"
            )
        if (
            c.algorithm.policy_loss == "kl_cov"
            and c.optim.epochs == 1
            and c.optim.mini_batch_size >= c.rollout.prompts_per_step // self.world * c.rollout.n
        ):
            warnings.warn(
                "KL-Cov with one mini-batch and one epoch is plain policy gradient: on the first "
                "update logp == old_logp, so |logp - old_logp| and its gradient are 0 (SPEC 4). "
                "Use several mini-batches or epochs.",
                stacklevel=2,
            )
        torch.manual_seed(c.trainer.seed)
        self.device = pick_device(c.trainer.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # FSDP shards on the current device
        if model is None:
            model, tokenizer = load_policy(c)
        self.task = task or build_task(c.data, tokenizer)
        self.tokenizer = tokenizer
        sharded = c.trainer.strategy == "fsdp"
        # FSDP moves each layer to the device as it shards it: no whole copy on the GPU first
        self.model = model if sharded else model.to(self.device)
        self.model.train()
        self.ref_model = None
        compute_dtype = c.model.compute_dtype and getattr(torch, c.model.compute_dtype)
        if c.algorithm.kl_coef > 0:
            import copy

            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            if sharded:
                parallel.shard(self.ref_model, compute_dtype=compute_dtype, device=self.device)
        # the module updates run through: self.model itself when sharded (FSDP shards in place)
        self.wrapped = parallel.wrap(
            self.model, c.trainer.strategy, compute_dtype=compute_dtype, device=self.device
        )
        o = c.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            weight_decay=o.weight_decay,
        )
        self.backend = make_backend(c, self.model, tokenizer)
        a = c.algorithm
        self.entropy_coef = (
            losses.AdaptiveEntropyCoef(
                alpha=a.entropy_coef,
                target=a.entropy_target,
                delta=a.entropy_coef_delta,
                min_alpha=a.entropy_coef_min,
                max_alpha=a.entropy_coef_max,
            )
            if a.entropy_target is not None
            else None
        )
        self.step = 0
        self.entropy_history: list[float] = []
        self.nonfinite_in_a_row = 0
        self.run = RunDir(c.trainer.out_dir) if self.rank == 0 else None

    # -- state ---------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        o, total = self.config.optim, self.config.trainer.steps
        if step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        if o.schedule == "cosine":
            return o.lr * 0.5 * (1 + math.cos(math.pi * progress))
        if o.schedule == "linear":
            return o.lr * (1 - progress)
        return o.lr

    def state(self) -> dict[str, Any]:
        return {
            "entropy_history": self.entropy_history,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "entropy_coef": self.entropy_coef.state_dict() if self.entropy_coef else None,
        }

    def save(self) -> None:
        """Checkpoint on rank 0; every rank takes part, since a sharded model is gathered."""
        model_state = parallel.model_state(self.model)
        optimizer_state = parallel.optimizer_state(self.model, self.optimizer)
        if self.run is not None:
            self.run.save_checkpoint(
                self.step,
                self.model,
                self.tokenizer,
                model_state,
                optimizer_state,
                self.state(),
                keep=self.config.trainer.keep_checkpoints,
            )

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in the run directory, if there is one.

        Every rank reads the small state files; the weights and optimizer state are read by
        every rank under DDP and by rank 0 alone under FSDP, which scatters them."""
        path = RunDir(self.config.trainer.out_dir).latest_checkpoint()
        if path is None:
            return False
        model_state, optimizer_state = {}, {}
        if self.rank == 0 or not parallel.is_sharded(self.model):
            dtype = getattr(torch, self.config.model.dtype)
            loaded = AutoModelForCausalLM.from_pretrained(path / "model", dtype=dtype)
            model_state, optimizer_state = loaded.state_dict(), load_optimizer_state(path)
            del loaded
        parallel.load_state(self.model, self.optimizer, model_state, optimizer_state)
        state = load_checkpoint_state(path)
        self.step = state["step"]
        self.entropy_history = state["entropy_history"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        if self.entropy_coef and state["entropy_coef"]:
            self.entropy_coef.load_state_dict(state["entropy_coef"])
        return True

    # -- the algorithm -------------------------------------------------------------------------

    def prompts_for(self, step: int, batch: int = 0) -> list[int]:
        """This rank's prompt indices for the `batch`-th sample of `step`: a seeded draw, the same
        whether resumed or not; further batches of a step (dynamic sampling) take the next
        prompts of the same permutation."""
        c, size = self.config, self.config.rollout.prompts_per_step
        g = torch.Generator().manual_seed(c.trainer.seed * 1_000_003 + step)
        picks = torch.randperm(len(self.task.train), generator=g)
        picks = picks.repeat(math.ceil(size * (batch + 1) / len(picks)))
        picks = picks[size * batch : size * (batch + 1)]
        return picks.tensor_split(self.world)[self.rank].tolist()

    def rollout(self, step: int, batch: int = 0) -> tuple[RolloutBatch, list[Any]]:
        r = self.config.rollout
        examples = [self.task.train[i] for i in self.prompts_for(step, batch)]
        if batch == 0:
            self.backend.sync_weights(self.model)
        seed = self.config.trainer.seed * 7919 + step * 104729 + self.rank
        torch.manual_seed(seed + batch * 1_000_033)
        out = self.backend.generate(
            [e.prompt for e in examples],
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            max_new_tokens=r.max_new_tokens,
        )
        return out, [examples[g].answer for g in out.group_ids.tolist()]

    def score(self, batch: RolloutBatch, answers: list[Any]) -> tuple[Tensor, Tensor]:
        """Verifier scores (1 for a correct answer) and rewards (scores plus the overlong
        penalty, SPEC 6)."""
        c, a = self.config, self.config.algorithm
        correct = torch.tensor(self.task.score(batch.texts, answers), device=self.device)
        rewards = correct.clone()
        if a.overlong_buffer > 0:
            rewards = rewards + adv_lib.overlong_penalty(
                batch.response_lengths,
                max_length=c.rollout.max_new_tokens,
                buffer=a.overlong_buffer,
                factor=a.overlong_factor,
            )
        return correct, rewards

    def sample(self, step: int) -> tuple[RolloutBatch, Tensor, int, dict[str, float]]:
        """Rollout and reward: one batch of prompts_per_step prompts, or, with dynamic sampling
        refills (SPEC 6), batches until every rank holds prompts_per_step / world groups whose
        rewards differ or `dynamic_sampling_max_batches` batches have been sampled.

        Returns this rank's share of groups (with refills: the informative ones, then all-equal
        ones for places still empty, in sampling order), their rewards, the number of response
        tokens this rank sampled, and the rollout metrics of everything sampled (the policy's
        accuracy is that of all its samples, not of the groups kept) with the time spent scoring.
        """
        c, n = self.config, self.config.rollout.n
        share = c.rollout.prompts_per_step // self.world
        batch, answers = self.rollout(step)
        start = time.perf_counter()
        correct, rewards = self.score(batch, answers)
        scoring = time.perf_counter() - start
        sampled = 1
        while sampled < c.algorithm.dynamic_sampling_max_batches:
            informative = adv_lib.dynamic_sampling_mask(rewards, batch.group_ids).view(-1, n)[:, 0]
            short = max(share - int(informative.sum().item()), 0)
            if distributed.all_reduce_sum(torch.tensor(short)).item() == 0:
                break
            more, more_answers = self.rollout(step, sampled)
            start = time.perf_counter()
            more_correct, more_rewards = self.score(more, more_answers)
            scoring += time.perf_counter() - start
            batch = concat_batches([batch, more], self.tokenizer.pad_token_id)
            correct = torch.cat([correct, more_correct])
            rewards = torch.cat([rewards, more_rewards])
            sampled += 1
        metrics = self.rollout_metrics(batch, rewards, correct)
        metrics |= {"train/num_gen_batches": sampled, "timing_s/reward": scoring}
        tokens = int(batch.response_mask.sum().item())
        if sampled == 1:
            return batch, rewards, tokens, metrics
        informative = adv_lib.dynamic_sampling_mask(rewards, batch.group_ids).view(-1, n)[:, 0]
        # a stable sort ranks informative groups first, each kind in sampling order
        groups = torch.sort((~informative).int(), stable=True).indices[:share].sort().values
        rows = (groups[:, None] * n + torch.arange(n, device=groups.device)).flatten()
        return batch.rows(rows), rewards[rows], tokens, metrics

    def position_shaping_active(self, step: int) -> bool:
        a = self.config.algorithm
        if a.position_shaping_alpha <= 0:
            return False
        if a.position_shaping_start is not None:
            return a.position_shaping_start <= step and (
                a.position_shaping_end is None or step < a.position_shaping_end
            )
        try:
            return detect_stages(self.entropy_history).plateau_start is not None
        except ValueError:  # too short a history to tell: still rising
            return False

    def shaped_advantages(
        self, batch: RolloutBatch, rewards: Tensor, old_log_prob: Tensor, step: int
    ) -> Tensor:
        a, mask = self.config.algorithm, batch.response_mask
        advantages = adv_lib.compute_advantages(a.advantage, rewards, batch.group_ids, mask)
        if a.ppl_shaping_alpha > 0:
            advantages = adv_lib.ppl_shaping(
                advantages, old_log_prob, mask, batch.group_ids, alpha=a.ppl_shaping_alpha
            )
        if self.position_shaping_active(step):
            advantages = adv_lib.position_shaping(advantages, mask, alpha=a.position_shaping_alpha)
        if a.low_prob_alpha > 0:
            advantages = adv_lib.low_prob_reweight(advantages, old_log_prob, alpha=a.low_prob_alpha)
        return advantages

    def train_step(self, step: int) -> dict[str, Any]:
        c, a = self.config, self.config.algorithm
        t0 = time.perf_counter()
        # rollout and reward
        batch, rewards, sampled_tokens, metrics = self.sample(step)
        t_reward = time.perf_counter()
        t_gen = t_reward - metrics["timing_s/reward"]
        keep = torch.ones_like(rewards, dtype=torch.bool)
        if a.dynamic_sampling:
            # Filtered groups leave the loss mask rather than the batch: with global denominators
            # that is the same update as dropping them, and every rank keeps the same shapes.
            keep = adv_lib.dynamic_sampling_mask(rewards, batch.group_ids)
            kept = distributed.all_reduce_sum(keep.sum()).item()
            metrics["batch/kept_fraction"] = kept / (keep.numel() * self.world)
            if kept == 0:
                metrics["actor/skipped_updates"] = 1
                return metrics | {"timing_s/gen": t_gen - t0}
        # old log-probs and entropy, once per rollout step
        rows = c.optim.log_prob_rows
        old_log_prob, entropy = batched_log_probs(self.model, batch, rows, c.rollout.temperature)
        if c.rollout.temperature != 1.0:  # the paper's entropy is at temperature 1
            _, entropy = batched_log_probs(self.model, batch, rows, 1.0)
        mask = batch.response_mask
        ent = batch_entropy(entropy, mask)
        self.entropy_history.append(ent["seq_mean_token_mean"])
        is_weights = None
        if batch.rollout_log_probs is not None:
            metrics |= mismatch.mismatch_metrics(old_log_prob, batch.rollout_log_probs, mask)
            if a.rollout_is is not None:
                is_weights, is_metrics = mismatch.rollout_is_weights(
                    old_log_prob,
                    batch.rollout_log_probs,
                    mask,
                    level=a.rollout_is,
                    threshold=a.rollout_is_threshold,
                )
                metrics |= is_metrics
        t_old = time.perf_counter()
        # advantage
        advantages = self.shaped_advantages(batch, rewards, old_log_prob, step)
        # a collective over ranks: computed on all of them, also for rank 0's rollout samples
        cov = dynamics.token_covariance(old_log_prob, advantages, mask)
        metrics |= self.dynamics_metrics(batch, old_log_prob, advantages, cov, ent)
        loss_mask = mask * keep[:, None]
        if a.high_entropy_rho is not None:
            loss_mask = loss_mask * losses.high_entropy_mask(
                entropy, loss_mask, rho=a.high_entropy_rho, across_ranks=True
            )
        ref = None
        if self.ref_model is not None:
            ref, _ = batched_log_probs(self.ref_model, batch, rows, c.rollout.temperature)
        update_batch = UpdateBatch(
            batch.input_ids,
            batch.attention_mask,
            loss_mask,
            old_log_prob,
            advantages,
            ref,
            is_weights,
        )
        # update
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step - 1)
        coef = self.entropy_coef.alpha if self.entropy_coef else a.entropy_coef
        generator = torch.Generator().manual_seed(c.trainer.seed * 15_485_863 + step)
        if a.lopti_eta is not None:
            low, high = adv_lib.lopti_split(old_log_prob, loss_mask, eta=a.lopti_eta)
            parts = [
                replace(update_batch, advantages=advantages * low),
                replace(update_batch, advantages=advantages * high),
            ]
        else:
            parts = [update_batch]
        skipped = 0
        for part in parts:
            update_metrics, s = update_policy(
                self.wrapped,
                self.optimizer,
                part,
                c,
                generator=generator,
                entropy_coef=coef,
                progress=c.trainer.progress and self.rank == 0,
            )
            skipped += s
            metrics |= update_metrics
        metrics["actor/skipped_updates"] = skipped
        metrics["actor/lr"] = self.lr_at(step - 1)
        metrics["actor/entropy_coef"] = coef
        if self.entropy_coef:
            self.entropy_coef.update(ent["seq_mean_token_mean"])
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        t_update = time.perf_counter()
        if c.trainer.measure_entropy_change:
            _, entropy_after = batched_log_probs(self.model, batch, rows, 1.0)
            after = batch_entropy(entropy_after, mask)["seq_mean_token_mean"]
            metrics["dynamics/entropy_change"] = after - ent["seq_mean_token_mean"]
        t_end = time.perf_counter()
        tokens = mask.sum().item() * self.world
        metrics |= {
            "timing_s/gen": t_gen - t0,
            "timing_s/reward": t_reward - t_gen,
            "timing_s/old_log_prob": t_old - t_reward,
            "timing_s/update_actor": t_update - t_old,
            "timing_s/step": t_end - t0,
            "perf/rollout_tokens_per_s": sampled_tokens * self.world / max(t_gen - t0, 1e-9),
            "perf/update_tokens_per_s": tokens * c.optim.epochs / max(t_update - t_old, 1e-9),
            "perf/throughput": tokens / max(t_end - t0, 1e-9),
        }
        if self.run is not None and c.trainer.rollout_samples > 0:
            self.run.write_rollouts(
                step, self.rollout_records(batch, rewards, old_log_prob, entropy, advantages, cov)
            )
        return metrics

    # -- measurement -----------------------------------------------------------------------------

    def rollout_metrics(self, batch: RolloutBatch, rewards: Tensor, correct: Tensor) -> dict:
        lengths = batch.response_lengths
        return {
            "critic/score/mean": rewards.mean().item(),
            "critic/score/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "train/acc": (correct >= 1).float().mean().item(),
            "response_length/mean": lengths.mean().item(),
            "response_length/max": lengths.max().item(),
            "response_length/clip_ratio": (lengths >= self.config.rollout.max_new_tokens)
            .float()
            .mean()
            .item(),
        }

    def dynamics_metrics(
        self,
        batch: RolloutBatch,
        old_log_prob: Tensor,
        advantages: Tensor,
        cov: Tensor,
        ent: dict[str, float],
    ) -> dict[str, float]:
        """Entropy (both definitions), the log-prob/advantage covariances, and the first-order
        entropy change they predict (SPEC 2, 3)."""
        mask = batch.response_mask
        summary = dynamics.covariance_summary(cov, mask)
        seq_logp = dynamics.response_mean_logp(old_log_prob, mask)
        seq_adv = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        out = {
            "actor/entropy": ent["token_mean"],
            "actor/entropy_seq_mean": ent["seq_mean_token_mean"],
            "critic/advantages/mean": (advantages * mask).sum().item() / mask.sum().item(),
            "critic/advantages/max": advantages[mask.bool()].max().item(),
            "critic/advantages/min": advantages[mask.bool()].min().item(),
            "dynamics/response_cov": dynamics.response_covariance(
                seq_logp, seq_adv, batch.group_ids
            ),
            "dynamics/predicted_entropy_change": -summary["all"],
        }
        out |= {f"cov/{k}": v for k, v in summary.items()}
        return out

    def rollout_records(self, batch, rewards, old_log_prob, entropy, advantages, cov) -> list[dict]:
        n = min(self.config.trainer.rollout_samples, batch.input_ids.shape[0])
        records = []
        for i in range(n):
            L = int(batch.response_mask[i].sum().item())
            ids = batch.response_ids[i, :L].tolist()
            records.append(
                {
                    "group": int(batch.group_ids[i]),
                    "response": batch.texts[i],
                    "reward": rewards[i].item(),
                    "tokens": self.tokenizer.convert_ids_to_tokens(ids),
                    "log_prob": old_log_prob[i, :L].tolist(),
                    "entropy": entropy[i, :L].tolist(),
                    "advantage": advantages[i, :L].tolist(),
                    "cov": cov[i, :L].tolist(),
                }
            )
        return records

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy, every rank sampling an equal share of the problems (the last share
        padded with repeats, so that sharded models run the same forwards on every rank)."""
        c = self.config
        self.backend.sync_weights(self.model)
        test = self.task.test
        share = math.ceil(len(test) / self.world)
        indices = [(self.rank * share + i) % len(test) for i in range(share)]
        _, correct = evaluate(
            self.backend,
            self.task,
            samples=c.trainer.eval_samples,
            temperature=c.trainer.eval_temperature,
            max_new_tokens=c.rollout.max_new_tokens,
            top_p=c.rollout.top_p,
            problems=[test[i] for i in indices],
        )
        mine = torch.as_tensor(correct, dtype=torch.float32, device=self.device)
        everyone, _ = distributed.all_gather_cat(mine)
        k = c.trainer.eval_samples
        correct = everyone.reshape(-1, k)[: len(test)].cpu().numpy()
        summary = score_samples(correct, ks=[k] if k > 1 else [])
        return {f"val-core/{self.task.name}/acc/{k}": v for k, v in summary.items()}

    # -- the loop --------------------------------------------------------------------------------

    def train(self, *, resume: bool = False) -> Path:
        c = self.config
        if resume and self.resume() and self.rank == 0:
            print(f"resumed from step {self.step}")
        log = None
        if self.run is not None:
            self.run.write_config(c.to_dict())
            log = self.run.metrics_log(c.trainer.tensorboard)
        if self.step == 0 and c.trainer.eval_every > 0:
            initial = self.evaluate()
            if log is not None:
                log.log(0, initial)
        bar = tqdm(
            range(self.step + 1, c.trainer.steps + 1),
            desc="rl steps",
            disable=not c.trainer.progress or self.rank != 0,
            initial=self.step,
            total=c.trainer.steps,
        )
        try:
            for step in bar:
                metrics = self.train_step(step)
                self.step = step
                if c.trainer.eval_every > 0 and (
                    step % c.trainer.eval_every == 0 or step == c.trainer.steps
                ):
                    metrics |= self.evaluate()
                if log is not None:
                    log.log(step, metrics)
                if self.nonfinite_in_a_row >= c.trainer.max_nonfinite_updates:
                    raise TrainingError(
                        f"{self.nonfinite_in_a_row} steps in a row had a NaN or infinite loss or "
                        f"gradient (step {step}); stopping. Lower optim.lr or check the rewards."
                    )
                bar.set_postfix(
                    entropy=f"{metrics.get('actor/entropy_seq_mean', float('nan')):.3f}",
                    acc=f"{metrics['train/acc']:.2f}",
                )
                if step % c.trainer.save_every == 0 or step == c.trainer.steps:
                    self.save()
        finally:
            if log is not None:
                log.close()
        return Path(c.trainer.out_dir)
