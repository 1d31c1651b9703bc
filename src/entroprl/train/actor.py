"""The actor: the policy a run trains, in the forms its passes need (the weights, the module updates
run through, the one the no-grad passes and the sampler use), its frozen reference, its optimizer
and learning rate, and what it computes with them: the rollout's log-probs and entropies, and the
policy update (`entroprl.train.update`; Lopti's two passes). The trainer holds one and decides
when each runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from entroprl.algos.advantages import lopti_split
from entroprl.config import Config
from entroprl.rollout.batch import RolloutBatch
from entroprl.train import (
    compiled,
    forward,
    lora,
    micro_batches,
    parallel,
    precision,
    schedule,
    seeds,
)
from entroprl.train.update import UpdateBatch, update_policy

COUNTS = ("actor/skipped_updates", "actor/empty_minibatches")
"""Metrics of an update that count, and so add up over Lopti's two passes."""


@dataclass(kw_only=True)
class ActorUpdate:
    """What `Actor.update` returns."""

    metrics: dict[str, float]
    log_prob: Tensor
    """(B, R) detached log-probs of the training forwards, before any update touched them."""
    entropy: Tensor
    """(B, R) the entropies of the same forwards."""


class Actor:
    """The policy of a run with its reference and optimizer, on `device` (or sharded over the
    ranks with `trainer.strategy=fsdp`)."""

    def __init__(self, config: Config, model, device: torch.device):
        c = self.config = config
        sharded = c.trainer.strategy == "fsdp"
        if c.model.fused_head:  # before any wrapper or copy: they all run its forward
            forward.fuse_head(model)
        if c.model.lora_rank:
            m = c.model
            model = lora.attach(model, m.lora_rank, m.lora_alpha, m.lora_target_modules)
        # FSDP moves each layer to the device as it shards it: no whole copy on the GPU first
        self.model = model if sharded else model.to(device)
        self.model.train()
        if device.type == "cpu" and (c.model.compute_dtype or c.model.dtype) == "bfloat16":
            precision.float32_attention(self.model)  # the copies below inherit it
        compute_dtype = c.model.compute_dtype and getattr(torch, c.model.compute_dtype)
        self.ref_model = self._reference_model(compute_dtype, device)
        """A frozen copy of the initial policy for algorithm.kl_coef (LoRA: none, the adapters
        are switched off instead, `lora.reference`)."""
        # the module updates run through: self.model itself when sharded (FSDP shards in place),
        # its compute-dtype copy under mixed precision without FSDP (precision.ComputeCopy)
        self.wrapped = parallel.wrap(
            self.model, c.trainer.strategy, compute_dtype=compute_dtype, device=device
        )
        self.forward_model = parallel.unwrapped(self.wrapped)
        """The module the no-grad passes run: the policy in the update's precision."""
        if c.model.compile:
            for module in (self.forward_model, self.ref_model):
                if module is not None:
                    compiled.compile_layers(module)
        self.sampling_model = self.forward_model if device.type == "cuda" else self.model
        """What the rollout backend samples from: on a GPU the policy in the update's precision,
        whose bfloat16 decoding is fast there; on the CPU the weights in model.dtype
        (`entroprl.train.precision`)."""
        self.optimizer = self._optimizer()

    def _reference_model(self, compute_dtype: torch.dtype | None, device: torch.device):
        c = self.config
        if c.algorithm.kl_coef <= 0 or c.model.lora_rank:
            return None
        ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        if c.trainer.strategy == "fsdp":
            parallel.shard(ref, compute_dtype=compute_dtype, device=device)
        elif compute_dtype:  # the reference log-probs in the policy's forward precision
            precision.cast_parameters(ref, compute_dtype)
        return ref

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            weight_decay=o.weight_decay,
        )
        if isinstance(self.wrapped, precision.ComputeCopy):
            optimizer.register_step_post_hook(lambda *_: self.wrapped.refresh())
        return optimizer

    def loaded(self) -> None:
        """Call after loading weights into `model`: the compute copy follows them."""
        if isinstance(self.wrapped, precision.ComputeCopy):
            self.wrapped.refresh()

    @property
    def sweeps(self) -> int:
        """The update's passes over its batch: the epochs, in each of Lopti's two passes."""
        return self.config.optim.epochs * (1 if self.config.algorithm.lopti_eta is None else 2)

    def lr_at(self, step: int) -> float:
        o = self.config.optim
        return schedule.learning_rate(
            step,
            lr=o.lr,
            warmup_steps=o.warmup_steps,
            total_steps=self.config.trainer.steps,
            schedule=o.schedule,
        )

    # -- passes without gradient -----------------------------------------------------------------

    def log_probs(self, model, batch: RolloutBatch, temperature: float) -> tuple[Tensor, Tensor]:
        """`model`'s log-probs and entropies of the rollout's responses, in micro-batches of at
        most `optim.log_prob_rows` rows and `optim.log_prob_tokens` tokens."""
        c = self.config
        return forward.batched_log_probs(
            model,
            batch,
            micro_batches.Budget(c.optim.log_prob_rows, c.optim.log_prob_tokens),
            temperature,
            shared_prefix=c.optim.shared_prefix,
            fused_head=c.model.fused_head,
        )

    def log_probs_and_entropy(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """The rollout's log-probs under the current policy (at the sampling temperature) and
        its token entropies (at temperature 1, the paper's), from one no-grad pass (two when the
        temperature is not 1)."""
        temperature = self.config.rollout.temperature
        log_prob, entropy = self.log_probs(self.forward_model, batch, temperature)
        if temperature != 1.0:
            _, entropy = self.log_probs(self.forward_model, batch, 1.0)
        return log_prob, entropy

    def entropy(self, batch: RolloutBatch) -> Tensor:
        """The current policy's token entropies of the rollout (temperature 1)."""
        return self.log_probs(self.forward_model, batch, 1.0)[1]

    def reference_log_probs(self, batch: RolloutBatch) -> Tensor | None:
        """The reference policy's log-probs of the rollout for algorithm.kl_coef (LoRA: the model
        with its adapters off); None without the KL term."""
        temperature = self.config.rollout.temperature
        if self.ref_model is not None:
            return self.log_probs(self.ref_model, batch, temperature)[0]
        if self.config.algorithm.kl_coef > 0:
            with lora.reference(self.forward_model) as base:
                return self.log_probs(base, batch, temperature)[0]
        return None

    # -- the update ------------------------------------------------------------------------------

    def update(
        self,
        batch: UpdateBatch,
        step: int,
        *,
        entropy_coef: float,
        loss_kwargs: dict[str, Any] | None,
        progress: bool,
    ) -> ActorUpdate:
        """The policy update of `step` (Lopti's two passes with `algorithm.lopti_eta`), at the
        step's learning rate, with the training forwards' log-probs and entropies."""
        c, a = self.config, self.config.algorithm
        lr = self.lr_at(step - 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(seeds.derive("update", c.trainer.seed, step))
        parts = [batch]
        if a.lopti_eta is not None:
            low, high = lopti_split(batch.old_log_prob, batch.response_mask, eta=a.lopti_eta)
            parts = [
                replace(batch, advantages=batch.advantages * low),
                replace(batch, advantages=batch.advantages * high),
            ]
        results, moved = [], False
        for part in parts:
            result = update_policy(
                self.wrapped,
                self.optimizer,
                part,
                c,
                generator=generator,
                entropy_coef=entropy_coef,
                progress=progress,
                moved=moved,
                loss_kwargs=loss_kwargs,
            )
            moved = result.moved
            results.append(result)
        updates = [result.metrics for result in results]
        # Lopti's two passes: counts add up, the rest is the mean over both (as AR-Lopti merges)
        metrics = {}
        for key in dict.fromkeys(k for u in updates for k in u):
            values = [u[key] for u in updates if key in u]
            metrics[key] = sum(values) if key in COUNTS else sum(values) / len(values)
        metrics |= {"actor/lr": lr, "actor/entropy_coef": entropy_coef}
        # the first pass's forwards saw the weights before any update
        return ActorUpdate(
            metrics=metrics, log_prob=results[0].log_prob, entropy=results[0].entropy
        )
