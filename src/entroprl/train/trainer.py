"""The RL trainer: rollout, reward, advantage, update, log. It owns all state; the algorithms it
composes are the pure functions of `entropy`, `dynamics`, `advantages` and `losses`.

Runs as one process or under `torchrun` (gloo on CPU, NCCL on GPU), the model replicated (DDP) or
sharded (FSDP2) over the ranks (`entroprl.train.parallel`): each rank samples its share of the
prompts, and covariance selections and loss denominators are global over the ranks, so an update
does not depend on how the batch is split.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from entroprl.algos import dynamics, losses, mismatch
from entroprl.algos.advantages import (
    compute_advantages,
    dynamic_sampling_mask,
    low_prob_reweight,
    overlong_penalty,
    position_shaping,
    ppl_shaping,
)
from entroprl.algos.entropy import batch_entropy
from entroprl.analysis.law import detect_plateau_online
from entroprl.config import Config, meaning_changes, resume_changes
from entroprl.errors import ConfigError, Interrupted, NonFiniteError, TrainingError
from entroprl.rollout.backend import make_backend
from entroprl.rollout.batch import RolloutBatch, ScoredRollout
from entroprl.tasks.base import Example, Task
from entroprl.tasks.evaluation import evaluate, score_samples
from entroprl.tasks.registry import build_task
from entroprl.train import (
    allocator,
    checkpoint,
    distributed,
    lora,
    out_of_memory,
    parallel,
    perf,
    precision,
    progress,
    rundir,
    seeds,
    trackers,
)
from entroprl.train.actor import Actor
from entroprl.train.policy import load_policy, pick_device
from entroprl.train.update import UpdateBatch


@dataclass(kw_only=True)
class Sample:
    """What `Trainer.sample` returns: the step's rollout, scored."""

    scored: ScoredRollout
    """This rank's share of the groups, with their scores and rewards."""
    sampled_tokens: Tensor
    """() response tokens this rank sampled, kept or not."""
    metrics: dict[str, float]
    """The rollout metrics of everything sampled, and the time spent sampling and scoring."""


@dataclass(kw_only=True)
class Shaped:
    """A step's training batch, shaped for the update (`Trainer.shape`)."""

    kept: Tensor
    """(B,) bool: the responses of the groups kept (dynamic sampling), verl's training batch."""
    train_mask: Tensor
    """(B, R) their tokens."""
    old_log_prob: Tensor | None
    """(B, R) the rollout's log-probs under the policy before the update; None until the update
    when it is on-policy (its training forward gives them)."""
    entropy: Tensor | None
    """(B, R) their token entropies, likewise."""
    advantages: Tensor
    update: UpdateBatch
    """What the actor's update consumes."""


class Trainer:
    """GRPO-family RL on a Hugging Face causal LM; `train()` runs `config.trainer.steps` steps."""

    def __init__(self, config: Config, *, task: Task | None = None, model=None, tokenizer=None):
        self.config = config
        c = config
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self._refuse_what_cannot_train()
        torch.manual_seed(c.trainer.seed)
        self.device = self._take_device()
        if model is None:
            model, tokenizer = load_policy(c)
        self.task = task or build_task(c.data, tokenizer)
        self.tokenizer = tokenizer
        self.actor = self._actor(model)
        """The policy with its reference and optimizer, and the passes and update they run."""
        self.backend = make_backend(c, self.actor.model, tokenizer)
        self.entropy_controller, self.loss_controller = self._controllers()
        """The adaptive entropy coefficient (with algorithm.entropy_target) and the policy loss's
        own per-step state (`losses.LossController`), each where there is one."""
        self.step = 0
        self.saved_step: int | None = None
        """The step of the newest checkpoint of this run, once one is written or resumed from."""
        self.entropy_history: list[float] = []
        self.plateau_start: int | None = None
        """The step at which the plateau stage began, once detected (then kept to the end)."""
        self.nonfinite_in_a_row = 0
        self.run = rundir.RunDir(c.trainer.out_dir) if self.rank == 0 else None
        self.flops = perf.flops_model(model.config)
        """verl's count of the policy's training FLOPs, for `perf/mfu/actor`; None: no count."""
        self.peak_tflops = c.trainer.peak_tflops or perf.device_peak_tflops(self.device)

    def _refuse_what_cannot_train(self) -> None:
        c = self.config
        if c.model.dtype == "float16":  # fine for evaluation, which shares the config
            raise ConfigError(
                "model.dtype: float16 weights cannot train: AdamW's epsilon and small updates "
                "vanish in float16 and the first step turns the weights to NaN; use bfloat16 or "
                "float32"
            )
        trackers.check(c.trainer.report_to)  # before anything is written
        if c.rollout.prompts_per_step % self.world:
            raise TrainingError(
                f"rollout.prompts_per_step={c.rollout.prompts_per_step} must be "
                f"divisible by the number of ranks ({self.world})"
            )
        note = losses.get_policy_loss(c.algorithm.policy_loss).on_policy_note
        if (
            note
            and c.optim.epochs == 1
            and c.optim.mini_batch_size >= c.rollout.prompts_per_step // self.world * c.rollout.n
        ):
            warnings.warn(note, stacklevel=3)

    def _take_device(self) -> torch.device:
        """The run's device, declared to the collectives, made current (CUDA) or with the CPU's
        allocator and bfloat16 checks."""
        c = self.config
        device = pick_device(c.trainer.device)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            gpus = torch.cuda.device_count()
            raise TrainingError(
                f"trainer.device={c.trainer.device}: "
                + (f"torch sees only {gpus} CUDA GPU(s)" if gpus else "no CUDA GPU is visible")
                + "; use trainer.device=auto (a GPU if there is one) or cpu"
            )
        distributed.use_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # FSDP shards on the current device
        elif device.type == "cpu":  # activations come from malloc: fault their pages in once
            precision.check_native_bfloat16(c.model.compute_dtype or c.model.dtype)
            allocator.keep_freed_memory()
        return device

    @out_of_memory.phase("policy")
    def _actor(self, model) -> Actor:
        return Actor(self.config, model, self.device)

    def _controllers(self):
        c, a = self.config, self.config.algorithm
        entropy = (
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
        spec = losses.get_policy_loss(a.policy_loss)
        return entropy, spec.controller(c.loss_settings()) if spec.controller else None

    @property
    def on_policy(self) -> bool:
        """Whether the training forward gives the old log-probs and the entropy, with no pass of
        their own (the update returns them), as in TRL: so it is with one
        mini-batch and one epoch per step when nothing before the update needs the step's
        log-probs or entropy (PPL shaping, low-probability reweighting, Lopti, high-entropy
        masking, plateau detection for position shaping, entropy at another temperature than the
        sampling one, the rollout importance weights, a loss controller)."""
        c, a, o = self.config, self.config.algorithm, self.config.optim
        rows = c.rollout.prompts_per_step // self.world * c.rollout.n
        return (
            o.epochs == 1
            and o.mini_batch_size >= rows
            and c.rollout.temperature == 1.0
            and a.ppl_shaping_alpha == 0
            and a.low_prob_alpha == 0
            and a.lopti_eta is None
            and a.high_entropy_rho is None
            and a.rollout_is is None
            and not (a.position_shaping_alpha > 0 and a.position_shaping_start is None)
            and self.loss_controller is None
        )

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "entropy_history": self.entropy_history,
            "plateau_start": self.plateau_start,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "entropy_coef": self.entropy_controller.state_dict()
            if self.entropy_controller
            else None,
            "loss_controller": self.loss_controller.state_dict() if self.loss_controller else None,
        }

    def save(self) -> None:
        """Checkpoint on rank 0, or on every rank its shards when the model is sharded
        (`checkpoint.save_sharded`); every rank takes part. Raises NonFiniteError, writing
        nothing, if the weights or optimizer state hold NaN or inf."""
        c = self.config.trainer
        adapters = lora.is_lora(self.actor.model)  # small: gathered whole, not sharded
        if parallel.is_sharded(self.actor.model) and not adapters:
            checkpoint.save_sharded(
                Path(c.out_dir) / "checkpoints",
                self.step,
                self.actor.model,
                self.actor.optimizer,
                self.tokenizer,
                self.state(),
                keep=c.keep_checkpoints,
                writer=self.rank == 0,
            )
            self.saved_step = self.step
            return
        model_state = parallel.model_state(self.actor.model, trainable_only=adapters)
        optimizer_state = parallel.optimizer_state(self.actor.model, self.actor.optimizer)
        if self.run is not None:
            checkpoint.save(
                self.run.checkpoints,
                self.step,
                self.actor.model,
                self.tokenizer,
                model_state,
                optimizer_state,
                self.state(),
                keep=self.config.trainer.keep_checkpoints,
            )
        self.saved_step = self.step

    def resume(self, *, allow_config_change: bool = False) -> bool:
        """Continue from the valid checkpoint with the highest step in the run directory
        (`checkpoint.find_resumable`), saying which, and why any newer one was skipped. Returns
        False, starting at step 0, when the directory holds no checkpoint at all (a run stopped
        before its first); raises TrainingError, changing nothing, when it holds checkpoints and
        none of them is valid, when `trainer.steps` is below the checkpoint's step, when the
        configuration differs from the one that ran the checkpoint's step in a key outside
        `config.FREE_ON_RESUME` (unless `allow_config_change`), and when the model is not of
        the checkpoint's shape.

        Rank 0 chooses and verifies the checkpoint. Every rank reads the small state files; a
        sharded checkpoint is read by every rank, each the slices its own layout needs; a full
        one by every rank under DDP and by rank 0 alone under FSDP, which scatters it."""
        out = self.config.trainer.out_dir
        chosen, problem = -1, None
        if self.run is not None:
            path, state, skipped = checkpoint.find_resumable(self.run.checkpoints)
            if path is not None:
                for line in skipped:
                    print(f"skipped checkpoint {line}")
                chosen = state["step"]
                problem = self._settings_problem(chosen, allow_config_change)
            elif skipped:
                problem = (
                    f"{out}: no usable checkpoint to resume from ({'; '.join(skipped)}). "
                    "Restore one, or pass --overwrite to delete this run and start again"
                )
            else:
                print(f"no checkpoint in {out} yet: starting at step 0")
        self._stop_together(problem)
        # rank 0's choice to every rank: the others add 0
        step = int(distributed.all_reduce_sum(torch.tensor(chosen + 1, device=self.device))) - 1
        if step < 0:
            return False
        path = Path(out) / "checkpoints" / checkpoint.checkpoint_name(step)
        state = checkpoint.verify(path, hashes=False)  # rank 0 has checked the hashes
        self._check_shapes(path, state)
        if checkpoint.is_sharded(state):
            checkpoint.load_sharded(path, self.actor.model, self.actor.optimizer)
        else:
            self._load_full(path)
        self.actor.loaded()
        checkpoint.restore_rng(path)
        self.step = self.saved_step = state["step"]
        self.entropy_history = state["entropy_history"]
        self.plateau_start = state.get("plateau_start")  # absent from checkpoints before it
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        if self.entropy_controller and state["entropy_coef"]:
            self.entropy_controller.load_state_dict(state["entropy_coef"])
        if self.loss_controller and state.get("loss_controller"):  # absent before controllers
            self.loss_controller.load_state_dict(state["loss_controller"])
        if self.rank == 0:
            print(f"resumed from step {self.step} ({path})")
        return True

    def _settings_problem(self, step: int, allow_config_change: bool) -> str | None:
        """Why the run cannot resume from checkpoint `step` with this configuration, or None
        (saying which settings change, if any do). Rank 0, which reads the run directory."""
        c = self.config
        out, steps = c.trainer.out_dir, c.trainer.steps
        if steps < step:
            return (
                f"trainer.steps={steps}: {out} is already at step {step} (its newest valid "
                f"checkpoint): nothing to train; set trainer.steps above {step} to continue it"
            )
        try:
            found = self.run.config_of_step(step)
        except ValueError as e:
            return str(e)
        if found is None:
            print(f"{out} holds no configuration of step {step}: settings not compared")
            return None
        where, before = found
        changes = resume_changes(before, c)
        altering = meaning_changes(changes, c)
        if altering and not allow_config_change:
            return (
                f"{out}: these settings differ from those that ran step {step} ({where.name}) "
                f"and would make the steps after it another run's: {'; '.join(altering)}. "
                "Resume with the settings of before, pass --allow-config-change to continue "
                "with these anyway (each segment's configuration is kept in the run directory), "
                "or --overwrite to start again"
            )
        if changes:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            print(f"settings changed since step {step} ({where.name}): {listed}")
        return None

    def _check_shapes(self, path: Path, state: dict[str, Any]) -> None:
        """Raise TrainingError when the model's weights and the checkpoint's differ in shape."""
        stored = checkpoint.stored_shapes(path, state)
        if lora.is_lora(self.actor.model):  # the checkpoint holds the adapters, under peft's names
            from peft import get_peft_model_state_dict

            weights = get_peft_model_state_dict(self.actor.model)
        else:
            weights = self.actor.model.state_dict()
        here = {name: tuple(t.shape) for name, t in weights.items()}
        common = stored.keys() & here.keys()
        wrong = sorted(name for name in common if stored[name] != here[name])
        if common and not wrong:
            return
        example = (
            f"{wrong[0]} is {list(here[wrong[0]])} here, {list(stored[wrong[0]])} there"
            if wrong
            else "no weight of the same name"
        )
        raise TrainingError(
            f"model.path={self.config.model.path}: the model is not of the shape of checkpoint "
            f"{path} ({len(wrong) or 'all'} of its weights differ: {example}); resume with "
            "the model the run started from"
        )

    def _load_full(self, path: Path) -> None:
        """Load a checkpoint of full state dicts: read by every rank, or by rank 0 alone and
        scattered when the model is sharded."""
        model = self.actor.model
        adapters = lora.is_lora(model)  # the checkpoint holds the adapters alone
        model_state, optimizer_state = {}, {}
        if self.rank == 0 or not parallel.is_sharded(model):
            if adapters:
                model_state = lora.adapter_state(model, path / "model")
            else:
                dtype = getattr(torch, self.config.model.dtype)
                loaded = AutoModelForCausalLM.from_pretrained(path / "model", dtype=dtype)
                model_state = loaded.state_dict()
                del loaded
            optimizer_state = checkpoint.load_optimizer_state(path)
        parallel.load_state(
            model, self.actor.optimizer, model_state, optimizer_state, trainable_only=adapters
        )

    def _start_afresh(self, overwrite: bool) -> None:
        """A new run: refuse a directory that holds a run, unless `overwrite`, which deletes it."""
        problem = None
        if self.run is not None and self.run.holds_run():
            if overwrite:
                self.run.clear()
            else:
                problem = (
                    f"{self.config.trainer.out_dir} already holds a run: pass --resume to "
                    "continue it, or --overwrite to delete it and start again "
                    "(or set another trainer.out_dir)"
                )
        self._stop_together(problem)

    def _stop_together(self, problem: str | Exception | None) -> None:
        """Raise on every rank when rank 0, the one that reads the run directory, has a
        `problem`, so that no rank is left waiting for the others: the error itself on rank 0,
        a TrainingError elsewhere (and for a message)."""
        stop = torch.tensor(int(problem is not None), device=self.device)
        if int(distributed.all_reduce_sum(stop)):
            if isinstance(problem, Exception):
                raise problem
            raise TrainingError(problem or "rank 0 stopped the run (its message says why)")

    def _nonfinite_error(self, step: int, error: str | Exception) -> TrainingError:
        """The message that stops a run whose numbers went NaN or infinite at `step`."""
        newest = (
            f"the newest checkpoint, step {self.saved_step}, holds finite weights: continue from "
            "it with --resume"
            if self.saved_step is not None
            else "no checkpoint was written: start again"
        )
        return TrainingError(
            f"step {step}: {error}; stopping. {newest}, with a lower optim.lr (now "
            f"{self.config.optim.lr:g}), or check the rewards, model.dtype and model.path"
        )

    # -- the algorithm -------------------------------------------------------------------------

    def prompts_for(self, step: int, batch: int = 0) -> list[int]:
        """This rank's prompt indices for the `batch`-th sample of `step`: a seeded draw, the same
        whether resumed or not; further batches of a step (dynamic sampling) take the next
        prompts of the same permutation, `dynamic_sampling_gen_prompts` of them per batch."""
        c = self.config
        size = c.algorithm.dynamic_sampling_gen_prompts or c.rollout.prompts_per_step
        g = torch.Generator().manual_seed(seeds.derive("prompts", c.trainer.seed, step))
        picks = torch.randperm(len(self.task.train), generator=g, device="cpu")  # indices
        picks = picks.repeat(math.ceil(size * (batch + 1) / len(picks)))
        picks = picks[size * batch : size * (batch + 1)]
        return picks.tensor_split(self.world)[self.rank].tolist()

    def rollout(self, step: int, batch: int = 0) -> tuple[RolloutBatch, list[Example]]:
        """This rank's sampled responses of `step` (its `batch`-th draw), and each row's problem."""
        r = self.config.rollout
        examples = [self.task.train[i] for i in self.prompts_for(step, batch)]
        if batch == 0:
            self.backend.sync_weights(self.actor.sampling_model)
        seed = self.config.trainer.seed
        torch.manual_seed(seeds.derive("rollout", seed, step, rank=self.rank, draw=batch))
        out = self.backend.generate(
            [e.prompt for e in examples],
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            max_new_tokens=r.max_new_tokens,
        )
        return out, [examples[g] for g in out.group_ids.tolist()]

    def score(self, batch: RolloutBatch, examples: list[Example]) -> ScoredRollout:
        """The rollout with its verifier scores (1 for a correct answer) and rewards (scores plus
        the overlong penalty, algorithms.md §6)."""
        c, a = self.config, self.config.algorithm
        answers, prompts = [e.answer for e in examples], [e.prompt for e in examples]
        scores = self.task.score(batch.texts, answers, prompts)
        correct = torch.tensor(scores, device=self.device)
        rewards = correct.clone()
        if a.overlong_buffer > 0:
            rewards = rewards + overlong_penalty(
                batch.response_lengths,
                max_length=c.rollout.max_new_tokens,
                buffer=a.overlong_buffer,
                factor=a.overlong_factor,
            )
        return ScoredRollout(batch=batch, scores=correct, rewards=rewards)

    @out_of_memory.phase("rollout")
    def sample(self, step: int) -> Sample:
        """Rollout and reward: one batch of prompts_per_step prompts, or, with dynamic sampling
        (algorithms.md §6), batches of `dynamic_sampling_gen_prompts` prompts until every rank holds
        prompts_per_step / world groups whose scores differ or `dynamic_sampling_max_batches`
        batches have been sampled.

        Returns this rank's share of groups (with dynamic sampling: the informative ones, then
        all-equal ones for places still empty, in sampling order) with their scores and rewards,
        the number of response tokens this rank sampled, and the rollout metrics of everything
        sampled (the policy's accuracy is that of all its samples, not of the groups kept) with
        the time spent scoring.
        """
        c, n = self.config, self.config.rollout.n
        share = c.rollout.prompts_per_step // self.world
        begin = time.perf_counter()
        batch, examples = self.rollout(step)
        start = time.perf_counter()
        scored = self.score(batch, examples)
        scoring = time.perf_counter() - start
        sampled = 1
        while sampled < c.algorithm.dynamic_sampling_max_batches:
            informative = self.informative(scored).view(-1, n)[:, 0]
            short = max(share - int(informative.sum().item()), 0)
            if distributed.all_reduce_sum(torch.tensor(short, device=self.device)).item() == 0:
                break
            more, more_examples = self.rollout(step, sampled)
            start = time.perf_counter()
            more_scored = self.score(more, more_examples)
            scoring += time.perf_counter() - start
            scored = ScoredRollout.concat([scored, more_scored], self.tokenizer.pad_token_id)
            sampled += 1
        metrics = self.rollout_metrics(scored)
        metrics |= {
            "train/num_gen_batches": sampled,
            "timing_s/gen": time.perf_counter() - begin - scoring,
            "timing_s/reward": scoring,
        }
        tokens = scored.batch.response_mask.sum()
        if scored.batch.group_ids.numel() == share * n:  # exactly one batch of the step's size
            return Sample(scored=scored, sampled_tokens=tokens, metrics=metrics)
        informative = self.informative(scored).view(-1, n)[:, 0]
        # a stable sort ranks informative groups first, each kind in sampling order
        groups = torch.sort((~informative).int(), stable=True).indices[:share].sort().values
        rows = (groups[:, None] * n + torch.arange(n, device=groups.device)).flatten()
        return Sample(scored=scored.rows(rows), sampled_tokens=tokens, metrics=metrics)

    def informative(self, scored: ScoredRollout) -> Tensor:
        """Dynamic sampling's filter (algorithms.md §6): True for responses whose group's scores
        differ (or rewards, with `algorithm.dynamic_sampling_metric=reward`)."""
        by_score = self.config.algorithm.dynamic_sampling_metric == "score"
        values = scored.scores if by_score else scored.rewards
        return dynamic_sampling_mask(values, scored.batch.group_ids)

    def detect_plateau(self, step: int) -> None:
        """Latch the plateau stage the first time the entropy curve so far shows it (algorithms.md
        §9.4): position shaping applies from the plateau on, as in Deng et al., and a noisy
        later step must not switch it off again."""
        if self.plateau_start is not None:
            return
        index = detect_plateau_online(
            self.entropy_history, window=self.config.algorithm.plateau_window
        )
        if index is not None:
            self.plateau_start = step - len(self.entropy_history) + 1 + index

    def position_shaping_active(self, step: int) -> bool:
        a = self.config.algorithm
        if a.position_shaping_alpha <= 0:
            return False
        if a.position_shaping_start is not None:
            return a.position_shaping_start <= step and (
                a.position_shaping_end is None or step < a.position_shaping_end
            )
        return self.plateau_start is not None

    def shaped_advantages(
        self, batch: RolloutBatch, mask: Tensor, rewards: Tensor, old_log_prob: Tensor, step: int
    ) -> Tensor:
        """Advantages (algorithms.md §6) of the responses `mask` keeps, shaped (algorithms.md §7,
        §8); 0 elsewhere."""
        a = self.config.algorithm
        advantages = compute_advantages(
            a.advantage,
            rewards,
            batch.group_ids,
            mask,
            across_ranks=True,
            settings=self.config.estimator_settings(),
        )
        if a.ppl_shaping_alpha > 0:
            advantages = ppl_shaping(
                advantages, old_log_prob, mask, batch.group_ids, alpha=a.ppl_shaping_alpha
            )
        if self.position_shaping_active(step):
            advantages = position_shaping(advantages, mask, alpha=a.position_shaping_alpha)
        if a.low_prob_alpha > 0:
            advantages = low_prob_reweight(advantages, old_log_prob, alpha=a.low_prob_alpha)
        return advantages

    def train_step(self, step: int) -> dict[str, Any]:
        """One step: rollout, reward, advantage, update, measure; returns its metrics."""
        c = self.config
        t0 = time.perf_counter()
        sample = self.sample(step)  # rollout and reward
        metrics = sample.metrics
        t_sampled = time.perf_counter()
        shaped = self.shape(sample.scored, step, metrics)  # old log-probs and advantages
        if shaped is None:  # dynamic sampling kept no group on any rank
            self.entropy_history.append(math.nan)  # keeps one value per step
            metrics["actor/skipped_updates"] = 1
            return metrics
        t_old = time.perf_counter()
        metrics |= self.update(shaped, step)
        t_update = time.perf_counter()
        batch, mask = sample.scored.batch, shaped.train_mask
        # a collective over ranks: computed on all of them, also for rank 0's rollout samples
        cov = dynamics.token_covariance(shaped.old_log_prob, shaped.advantages, mask)
        metrics |= self.measure(
            batch, mask, shaped.old_log_prob, shaped.entropy, shaped.advantages, cov, step
        )
        t_end = time.perf_counter()
        tokens = perf.TokenCounts.over_ranks(
            sample.sampled_tokens, batch.attention_mask, mask, shaped.kept
        )
        times = perf.StepTimes(
            step=t_end - t0, generation=metrics["timing_s/gen"], update=t_update - t_old
        )
        metrics |= {
            "timing_s/old_log_prob": t_old - t_sampled,
            "timing_s/update_actor": t_update - t_old,
            "timing_s/step": t_end - t0,
        }
        metrics |= perf.step_metrics(
            tokens,
            times,
            world=self.world,
            sweeps=self.actor.sweeps,
            flops=self.flops,
            peak_tflops=self.peak_tflops,
        )
        metrics |= perf.memory_metrics(self.device)
        if self.run is not None and c.trainer.rollout_samples > 0:
            records = self.rollout_records(
                batch,
                sample.scored.rewards,
                shaped.old_log_prob,
                shaped.entropy,
                shaped.advantages,
                cov,
            )
            self.run.write_rollouts(step, records)
        return metrics

    @out_of_memory.phase("log_probs")
    def shape(self, scored: ScoredRollout, step: int, metrics: dict[str, Any]) -> Shaped | None:
        """The training batch of a scored rollout (the groups kept, as verl's batch after its
        filter): the old log-probs and entropies, the rollout importance weights, the
        advantages, the tokens that enter the loss, the reference log-probs; None where dynamic
        sampling kept no group on any rank. Adds the mismatch metrics to `metrics`."""
        a, batch = self.config.algorithm, scored.batch
        keep = self.kept_responses(scored, metrics)
        if keep is None:
            return None
        train_mask = batch.response_mask * keep[:, None]
        # old log-probs and entropy: a pass of their own, unless the update is on-policy and its
        # training forward gives them
        old_log_prob = entropy = None
        if not self.on_policy:
            old_log_prob, entropy = self.actor.log_probs_and_entropy(batch)
            self.record_entropy(entropy, train_mask, step)
        is_weights = None
        if a.rollout_is is not None:  # never on-policy: old_log_prob is known here
            is_weights, is_metrics = mismatch.rollout_is_weights(
                old_log_prob,
                batch.rollout_log_probs,
                batch.response_mask,
                level=a.rollout_is,
                threshold=a.rollout_is_threshold,
            )
            metrics |= is_metrics
        # advantage: statistics over the groups kept, on all ranks
        advantages = self.shaped_advantages(batch, train_mask, scored.rewards, old_log_prob, step)
        loss_mask = train_mask
        if a.high_entropy_rho is not None:
            loss_mask = loss_mask * losses.high_entropy_mask(
                entropy, loss_mask, rho=a.high_entropy_rho, across_ranks=True
            )
        update_batch = UpdateBatch(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            response_mask=loss_mask,
            old_log_prob=old_log_prob,
            advantages=advantages,
            ref_log_prob=self.actor.reference_log_probs(batch),
            rollout_is_weights=is_weights,
        )
        return Shaped(
            kept=keep,
            train_mask=train_mask,
            old_log_prob=old_log_prob,
            entropy=entropy,
            advantages=advantages,
            update=update_batch,
        )

    @out_of_memory.phase("update")
    def update(self, shaped: Shaped, step: int) -> dict[str, float]:
        """The actor's update of the step, its controllers first told the step's entropy; fills
        in `shaped`'s old log-probs and entropies from the training forwards when on-policy."""
        a, metrics = self.config.algorithm, {}
        if self.loss_controller is not None:  # never on-policy: the step's entropy is known
            metrics |= self.loss_controller.update(batch_entropy(shaped.entropy, shaped.train_mask))
        update = self.actor.update(
            shaped.update,
            step,
            entropy_coef=self.entropy_controller.alpha
            if self.entropy_controller
            else a.entropy_coef,
            loss_kwargs=self.loss_controller.loss_kwargs() if self.loss_controller else None,
            progress=self.config.trainer.progress and self.rank == 0,
        )
        skipped = update.metrics["actor/skipped_updates"]
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        if self.on_policy:  # the training forwards gave them
            shaped.old_log_prob, shaped.entropy = update.log_prob, update.entropy
            self.record_entropy(shaped.entropy, shaped.train_mask, step)
        return metrics | update.metrics

    def kept_responses(self, scored: ScoredRollout, metrics: dict[str, Any]) -> Tensor | None:
        """The responses that train: all, or with dynamic sampling those of the informative
        groups (logged as `batch/kept_fraction`); None where no rank keeps any. Filtered groups
        leave the loss mask rather than the batch: with global denominators that is the same
        update as dropping them, and every rank keeps the same shapes."""
        keep = torch.ones_like(scored.rewards, dtype=torch.bool)
        if not self.config.algorithm.dynamic_sampling:
            return keep
        keep = self.informative(scored)
        kept = distributed.all_reduce_sum(keep.sum()).item()
        metrics["batch/kept_fraction"] = kept / (keep.numel() * self.world)
        return keep if kept else None

    def measure(
        self,
        batch: RolloutBatch,
        train_mask: Tensor,
        old_log_prob: Tensor,
        entropy: Tensor,
        advantages: Tensor,
        cov: Tensor,
        step: int,
    ) -> dict[str, float]:
        """The step's entropy, covariances and the entropy change they predict, over the training
        batch (`train_mask`), the mismatch to the rollout engine's log-probs, and, every
        `trainer.entropy_change_every` steps, the entropy change the update made; the entropy
        controller follows the step's entropy."""
        a, metrics = self.config.algorithm, {}
        ent = batch_entropy(entropy, train_mask)
        metrics |= self.dynamics_metrics(batch, train_mask, old_log_prob, advantages, cov, ent)
        if batch.rollout_log_probs is not None:
            metrics |= mismatch.mismatch_metrics(
                old_log_prob, batch.rollout_log_probs, batch.response_mask
            )
        if a.dynamic_sampling:
            everything = batch_entropy(entropy, batch.response_mask)
            metrics["sampled/entropy"] = everything["token_mean"]
            metrics["sampled/entropy_seq_mean"] = everything["seq_mean_token_mean"]
        if self.plateau_start is not None:
            metrics["stages/plateau_start"] = self.plateau_start
        if self.entropy_controller:
            self.entropy_controller.update(ent["seq_mean_token_mean"])
        every = self.config.trainer.entropy_change_every
        if every and step % every == 0:
            entropy_after = self.actor.entropy(batch)
            after = batch_entropy(entropy_after, train_mask)["seq_mean_token_mean"]
            metrics["dynamics/entropy_change"] = after - ent["seq_mean_token_mean"]
        return metrics

    def record_entropy(self, entropy: Tensor, mask: Tensor, step: int) -> None:
        """Append the step's entropy (the paper's H over the training batch) to the history the
        plateau detection reads."""
        self.entropy_history.append(batch_entropy(entropy, mask)["seq_mean_token_mean"])
        self.detect_plateau(step)

    # -- measurement -----------------------------------------------------------------------------

    def rollout_metrics(self, scored: ScoredRollout) -> dict:
        """verl's names: `critic/score` is the reward's, `train/acc` the share the verifier scored
        correct."""
        lengths, rewards = scored.batch.response_lengths, scored.rewards
        return {
            "critic/score/mean": rewards.mean().item(),
            "critic/score/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "train/acc": (scored.scores >= 1).float().mean().item(),
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
        mask: Tensor,
        old_log_prob: Tensor,
        advantages: Tensor,
        cov: Tensor,
        ent: dict[str, float],
    ) -> dict[str, float]:
        """Entropy (both definitions), the log-prob/advantage covariances, and the first-order
        entropy change they predict (algorithms.md §2, §3), over the responses of the training batch
        (`mask`: the groups dynamic sampling keeps)."""
        summary = dynamics.covariance_summary(cov, mask)
        kept = mask.any(-1)  # a rank's rows may all be filtered out: these are global
        seq_logp = dynamics.response_mean_logp(old_log_prob[kept], mask[kept])
        seq_adv = (advantages * mask).sum(-1)[kept] / mask.sum(-1)[kept]
        valid = mask.bool()
        adv_sum = distributed.all_reduce_sum(
            torch.stack([(advantages * mask).sum(), mask.sum()]).to(torch.float64)
        )
        extremes = distributed.all_reduce_max(
            torch.stack(
                [
                    torch.where(valid, advantages, -math.inf).max(),
                    torch.where(valid, -advantages, -math.inf).max(),
                ]
            )
        )
        out = {
            "actor/entropy": ent["token_mean"],
            "actor/entropy_seq_mean": ent["seq_mean_token_mean"],
            "critic/advantages/mean": (adv_sum[0] / adv_sum[1]).item(),
            "critic/advantages/max": extremes[0].item(),
            "critic/advantages/min": -extremes[1].item(),
            "dynamics/response_cov": dynamics.response_covariance(
                seq_logp, seq_adv, batch.group_ids[kept], across_ranks=True
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

    @out_of_memory.phase("eval")
    def validate(self) -> dict[str, float]:
        """Held-out accuracy, every rank sampling an equal share of the problems (the last share
        padded with repeats, so that sharded models run the same forwards on every rank)."""
        c = self.config
        self.backend.sync_weights(self.actor.sampling_model)
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

    def train(
        self, *, resume: bool = False, overwrite: bool = False, allow_config_change: bool = False
    ) -> Path:
        """Train to `trainer.steps`. With `resume`, continue the run in `trainer.out_dir` (see
        `resume`; `allow_config_change` lets it change settings that alter the run); without, a
        directory already holding a run is an error unless `overwrite`, which deletes that run
        first. The run directory is locked for the whole call (`rundir.lock_directory`, on rank 0):
        a second process stops at once, naming this one. Ctrl-C raises `Interrupted`, naming the
        newest complete checkpoint; nothing written is half written.

        NaN policy: an update whose loss or gradient is NaN or infinite is skipped and counted,
        and `trainer.max_nonfinite_updates` steps in a row with one stop the run; NaN or infinite
        weights (checked before the first step and after every update) or logits stop it at
        once, since no later update can mend them. Nothing non-finite is ever saved."""
        if resume and overwrite:
            raise TrainingError(
                "resume and overwrite exclude each other: one continues the run in "
                "trainer.out_dir, the other deletes it"
            )
        lock, error = contextlib.ExitStack(), None
        if self.run is not None:
            try:
                lock.enter_context(self.run.lock())
            except (TrainingError, OSError) as e:
                error = e
        self._stop_together(error)
        with lock:
            try:
                log = self._open_run(resume, overwrite, allow_config_change)
                if log is not False:
                    self._run_steps(log)
            except KeyboardInterrupt:
                raise Interrupted(self._interrupted()) from None
        return Path(self.config.trainer.out_dir)

    def _open_run(self, resume: bool, overwrite: bool, allow_config_change: bool):
        """Resume or start the run, record its configuration and open its metrics log: the log
        (None on ranks other than 0), or False when a resumed run has no step left to run."""
        c = self.config
        if resume:
            self.resume(allow_config_change=allow_config_change)
            if self.step >= c.trainer.steps:  # resume refuses a step count below it
                if self.rank == 0:
                    print(
                        f"{c.trainer.out_dir} is already at step {self.step}, trainer.steps: "
                        "nothing to do (raise trainer.steps to train further)"
                    )
                return False
        else:
            self._start_afresh(overwrite)
        if not parallel.all_finite(self.actor.model.parameters()):
            raise self._nonfinite_error(self.step, "the weights hold NaN or inf")
        if self.run is None:
            return None
        written = self.run.write_config(c.to_dict(), after=self.step)
        if written is not None and self.step > 0:
            print(f"the configuration of the steps after {self.step}: {written}")
        # from step 0 a resumed run logs everything again, its evaluation before training too
        first = self.step + 1 if self.step else 0
        started = trackers.start(
            c.trainer.report_to, self.run.path, c.trainer.project, c.to_dict(), first
        )
        return self.run.metrics_log(first, started)

    def _run_steps(self, log) -> None:
        """The steps from `self.step + 1` to `trainer.steps`, each logged to `log` (None: not
        logged, on ranks other than 0) and checkpointed every `trainer.save_every`."""
        c = self.config
        try:
            if self.step == 0 and c.trainer.eval_every > 0:
                initial = self.validate()
                if log is not None:
                    log.log(0, initial)
            bar = tqdm(
                range(self.step + 1, c.trainer.steps + 1),
                desc="rl steps",
                disable=not progress.bars(c.trainer.progress) or self.rank != 0,
                initial=self.step,
                total=c.trainer.steps,
            )
            lines = c.trainer.progress and self.rank == 0 and not progress.on_terminal()
            for step in bar:
                try:
                    metrics = self.train_step(step)
                except NonFiniteError as e:
                    raise self._nonfinite_error(step, e) from None
                self.step = step
                if c.trainer.eval_every > 0 and (
                    step % c.trainer.eval_every == 0 or step == c.trainer.steps
                ):
                    metrics |= self.validate()
                if log is not None:
                    log.log(step, metrics)
                if self.nonfinite_in_a_row >= c.trainer.max_nonfinite_updates:
                    raise self._nonfinite_error(
                        step,
                        f"{self.nonfinite_in_a_row} steps in a row had a NaN or infinite loss or "
                        "gradient (trainer.max_nonfinite_updates)",
                    )
                bar.set_postfix(
                    entropy=f"{metrics.get('actor/entropy_seq_mean', float('nan')):.3f}",
                    acc=f"{metrics['train/acc']:.2f}",
                )
                if lines:
                    print(progress.step_line(step, c.trainer.steps, metrics), flush=True)
                if step % c.trainer.save_every == 0 or step == c.trainer.steps:
                    try:
                        self.save()
                    except NonFiniteError as e:
                        raise self._nonfinite_error(step, e) from None
        finally:
            if log is not None:
                log.close()

    def _interrupted(self) -> str:
        """What an interrupted run leaves: its newest complete checkpoint, to resume from."""
        out = self.config.trainer.out_dir
        path, state, _ = checkpoint.find_resumable(Path(out) / "checkpoints", hashes=False)
        if path is None:
            return (
                f"interrupted; {out} holds no complete checkpoint yet: start again with "
                "--overwrite (or --resume, which starts at step 0)"
            )
        return (
            f"interrupted; the newest complete checkpoint is {path} (step {state['step']}): "
            "continue with --resume"
        )
