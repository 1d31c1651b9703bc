"""The actor's update: `epochs x mini-batches` optimizer steps on one rollout batch, each mini-batch
accumulated over micro-batches whose losses use the whole mini-batch's denominators and token
selection, so that the update does not depend on how the batch is split over micro-batches and
ranks (algorithms.md §5). `update_policy` runs `minibatch_step` on each mini-batch, which composes
the pieces: `token_selection` (the loss's selection, in either scope), `minibatch_selection`,
`micro_batch_loss`, `accumulate_gradients` and `optimizer_step`. The trainer calls it; it names
no particular loss.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from entroprl.algos import checks, losses
from entroprl.config import AlgorithmConfig, Config, OptimConfig
from entroprl.errors import NonFiniteError
from entroprl.train import distributed, forward, micro_batches, parallel
from entroprl.train.progress import bars


@dataclass(kw_only=True)
class UpdateBatch:
    """What one policy update consumes: rollouts with their old log-probs and advantages."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    """(B, R) tokens that enter the loss (high-entropy masking already applied)."""
    old_log_prob: Tensor | None
    """None: the update is on-policy (one mini-batch, one epoch), so the old log-probs are the
    training forward's own, detached, and need no pass of their own."""
    advantages: Tensor
    ref_log_prob: Tensor | None = None
    rollout_is_weights: Tensor | None = None
    """(B, R) truncated importance weights on the rollout/training mismatch
    (`mismatch.rollout_is_weights`), or None when the correction is off."""

    def rows(self, index: Tensor) -> UpdateBatch:
        take = lambda t: None if t is None else t[index]  # noqa: E731
        return UpdateBatch(**{f: take(getattr(self, f)) for f in self.__dataclass_fields__})


@dataclass
class UpdateResult:
    """What one `update_policy` call did."""

    metrics: dict[str, float]
    log_prob: Tensor
    """(B, R) detached log-probs of the first epoch's training forwards, for every row, before
    any update touched them on-policy."""
    entropy: Tensor
    """(B, R) the entropies of the same forwards."""
    moved: bool
    """Whether an optimizer step has changed the weights since the rollout (in this call, or
    before it when the call was told so)."""


@dataclass(frozen=True, kw_only=True)
class LossSetup:
    """How one `update_policy` call applies its policy loss, fixed for all its micro-batches."""

    spec: losses.PolicyLossSpec
    settings: Any
    """The loss's settings dataclass."""
    loss_kwargs: dict[str, Any] | None
    """A controller's keyword arguments for the loss instead of the settings, or None."""
    algorithm: AlgorithmConfig
    norm_constant: int
    """The aggregation's constant: the longest response allowed (algorithms.md §5.1)."""
    temperature: float
    shared_prefix: bool
    fused_head: bool
    entropy_coef: float
    generator: torch.Generator
    """The selections' random tie-breaks (the same on every rank)."""

    @property
    def across_ranks(self) -> bool:
        """Whether a selection spans the whole mini-batch on all ranks (`cov_scope=minibatch`) or
        one micro-batch of one rank (the reference's scope)."""
        return self.algorithm.cov_scope == "minibatch"


def token_selection(
    setup: LossSetup, log_prob: Tensor, old_log_prob: Tensor, batch: UpdateBatch
) -> dict[str, Any]:
    """The loss's token selection (`PolicyLossSpec.selection`) over `batch`, in the scope of
    `setup` (the whole mini-batch on all ranks, or this micro-batch), as `spec.fn`'s keyword
    arguments."""
    return setup.spec.selection(
        log_prob,
        old_log_prob,
        batch.advantages,
        batch.response_mask,
        setup.settings,
        generator=setup.generator,
        across_ranks=setup.across_ranks,
        norm_constant=setup.norm_constant,
    )


def minibatch_selection(
    model,
    mini: UpdateBatch,
    setup: LossSetup,
    *,
    micro_batch_count: int,
    moved: bool,
    budget: micro_batches.Budget,
) -> dict[str, Any] | None:
    """The selection over the whole mini-batch, made before its `micro_batch_count` micro-batches
    (`cov_scope=minibatch`), from the rollout's log-probs while no update has moved the weights
    (or with `cov_logp=old`), else from a no-grad pass in micro-batches within `budget`; None
    where there is none to make, or where the single micro-batch's training forward gives the
    log-probs (it selects then, `micro_batch_loss`)."""
    if setup.spec.select is None or not setup.across_ranks:
        return None
    on_policy = mini.old_log_prob is None
    if not on_policy and (setup.algorithm.cov_logp == "old" or not moved):
        log_prob = mini.old_log_prob  # exact while no update has moved the weights
    elif micro_batch_count > 1:
        # through the module: a test counts every no-grad pass by patching it there
        log_prob, _ = forward.batched_log_probs(
            model,
            mini,
            budget,
            setup.temperature,
            shared_prefix=setup.shared_prefix,
            fused_head=setup.fused_head,
        )
    else:
        return None
    return token_selection(setup, log_prob, log_prob if on_policy else mini.old_log_prob, mini)


@dataclass(kw_only=True)
class MicroBatchLoss:
    loss: Tensor
    """The micro-batch's share of the mini-batch's loss (its denominators are the mini-batch's)."""
    metrics: dict[str, float]
    log_prob: Tensor
    entropy: Tensor


def micro_batch_selection(
    setup: LossSetup, mb: UpdateBatch, *, whole: dict[str, Any] | None, rows: Tensor, tokens: float
) -> dict[str, Any] | None:
    """The selection `micro_batch_loss` gives the loss: rows `rows` of the mini-batch's (`whole`)
    where it was made beforehand; an empty one for a micro-batch with no loss token in the
    per-micro-batch scope (there is nothing to select from); else None, and the loss selects over
    this micro-batch (the reference scope, or the whole mini-batch on every rank in one piece)."""
    if whole is not None:
        return {k: v[rows] if k == "selected" else v for k, v in whole.items()}
    if setup.spec.select is None or setup.across_ranks or tokens > 0:
        return None
    selection: dict[str, Any] = {"selected": torch.zeros_like(mb.response_mask, dtype=torch.bool)}
    if setup.spec.selection_denominators:
        selection["selected_denominators"] = None
    return selection


def micro_batch_loss(
    model,
    mb: UpdateBatch,
    setup: LossSetup,
    *,
    denominators: losses.LossDenominators,
    whole: dict[str, Any] | None,
    rows: Tensor,
    tokens: float,
    columns: int | None = None,
) -> MicroBatchLoss:
    """The training forward of micro-batch `mb` (rows `rows` of its mini-batch) and its loss: the
    policy loss on the selection (the mini-batch's, `whole`, where it was made before; else this
    one's) plus the entropy bonus and the reference KL, each with the mini-batch's
    `denominators`. On-policy (no old log-probs) the old log-probs are this forward's, detached.
    The forward computes `columns` response columns (`forward.forward_log_probs`; None: all)."""
    a = setup.algorithm
    R = mb.response_mask.shape[1]
    log_prob, entropy = forward.forward_log_probs(
        model,
        mb.input_ids,
        mb.attention_mask,
        R,
        temperature=setup.temperature,
        entropy_grad=setup.entropy_coef > 0,
        shared_prefix=setup.shared_prefix,
        fused_head=setup.fused_head,
        columns=columns,
    )
    old = log_prob.detach() if mb.old_log_prob is None else mb.old_log_prob
    selection = micro_batch_selection(setup, mb, whole=whole, rows=rows, tokens=tokens)
    # The importance weight multiplies each token's whole policy loss, KL-Cov's penalty included,
    # as verl's pg_losses * rollout_is_weights; the selections use the unweighted advantages, as
    # verl's do.
    loss, metrics = setup.spec.apply(
        log_prob,
        old,
        mb.advantages,
        mb.response_mask,
        setup.settings,
        loss_agg_mode=a.loss_agg_mode,
        denominators=denominators,
        selection=selection,
        weights=mb.rollout_is_weights,
        loss_kwargs=setup.loss_kwargs,
        generator=setup.generator,
        across_ranks=setup.across_ranks,
        norm_constant=setup.norm_constant,
    )
    if setup.entropy_coef > 0:
        loss = loss + losses.entropy_bonus(
            entropy,
            mb.response_mask,
            setup.entropy_coef,
            loss_agg_mode=a.loss_agg_mode,
            denominators=denominators,
        )
    if a.kl_coef > 0:
        kl = losses.kl_penalty(log_prob, mb.ref_log_prob, a.kl_estimator)
        kl_loss = losses.aggregate_loss(
            kl, mb.response_mask, a.loss_agg_mode, denominators=denominators
        )
        loss = loss + a.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.item()
    return MicroBatchLoss(loss=loss, metrics=metrics, log_prob=log_prob, entropy=entropy)


@dataclass(kw_only=True)
class Accumulated:
    sums: dict[str, float]
    """Each metric summed over the micro-batches (token-weighted where it is a mean)."""
    finite: bool
    """Whether every micro-batch's loss was finite."""


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of a mini-batch."""

    rows: Tensor
    """Its rows' positions in the mini-batch."""
    tokens: float
    """Its tokens in the loss."""
    columns: int
    """The response columns its forward computes (`forward.response_columns`)."""


def micro_batch_plan(
    mini: UpdateBatch, setup: LossSetup, budget: micro_batches.Budget
) -> list[MicroBatch]:
    """The micro-batches of `mini` within `budget` (`micro_batches.plan`; the rows' lengths and
    loss tokens read in one transfer): the rows longest response first where no selection
    depends on which rows share a micro-batch (the loss has none, or it selects over the whole
    mini-batch on every rank: beforehand, `minibatch_selection`, where there is more than one
    micro-batch), so that each holds rows of similar lengths and its forward stops at their
    longest; else consecutive rows of the shuffled order. Each micro-batch's loss has the
    mini-batch's denominators, so the gradient is the same sum either way."""
    R = mini.response_mask.shape[1]
    per_row = torch.stack([mini.attention_mask[:, -R:].sum(dim=1), mini.response_mask.sum(dim=1)])
    lengths, in_loss = per_row.double().tolist()
    lengths = [int(length) for length in lengths]
    sort = setup.spec.select is None or setup.across_ranks
    groups = micro_batches.plan(lengths, mini.input_ids.shape[1] - R, budget, sort=sort)
    device = mini.response_mask.device
    return [
        MicroBatch(
            rows=torch.tensor(group, device=device),
            tokens=sum(in_loss[i] for i in group),
            columns=forward.response_columns([lengths[i] for i in group], R),
        )
        for group in groups
    ]


def accumulate_gradients(
    model,
    mini: UpdateBatch,
    setup: LossSetup,
    *,
    denominators: losses.LossDenominators,
    whole: dict[str, Any] | None,
    plan: list[MicroBatch],
    seen: tuple[Tensor, Tensor, Tensor] | None,
) -> Accumulated:
    """Backward of every micro-batch of `mini` (`plan`), the gradients summed into the
    parameters: that of the mini-batch in one piece, since each micro-batch's loss uses the
    mini-batch's denominators. DDP and FSDP average the gradient over ranks, hence the loss is
    scaled by the world size to make it the global sum. `seen` (log-probs, entropies, the
    mini-batch's rows in them) records the training forwards."""
    world = distributed.world_size()
    summed = setup.spec.summed_metrics | {"kl_loss"}
    sums: dict[str, float] = defaultdict(float)
    finite: list[Tensor] = []
    # the value checks of every micro-batch, read once at the end of the mini-batch
    with checks.deferred() as deferred:
        for i, part in enumerate(plan):
            # DDP all-reduces once per mini-batch; FSDP reduce-scatters every micro-batch (it has
            # no no_sync), which keeps its gradients sharded
            sync = i == len(plan) - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                out = micro_batch_loss(
                    model,
                    mini.rows(part.rows),
                    setup,
                    denominators=denominators,
                    whole=whole,
                    rows=part.rows,
                    tokens=part.tokens,
                    columns=part.columns,
                )
                if seen is not None:
                    seen_log_prob, seen_entropy, mini_rows = seen
                    seen_log_prob[mini_rows[part.rows]] = out.log_prob.detach()
                    seen_entropy[mini_rows[part.rows]] = out.entropy.detach()
                finite.append(torch.isfinite(out.loss.detach()))
                (out.loss * world).backward()
            for key, value in out.metrics.items():
                sums[key] += value if key in summed else value * part.tokens
    deferred.raise_first()
    return Accumulated(sums=sums, finite=bool(torch.stack(finite).all()))


def minibatch_metrics(
    sums: dict[str, float], summed: set[str], denominators: losses.LossDenominators, device
) -> dict[str, float]:
    """The mini-batch's metrics over all ranks, whatever its split over micro-batches and ranks:
    one collective, in the same key order on every rank."""
    keys = sorted(sums)
    totals = distributed.all_reduce_sum(
        torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    )
    return {
        key: total if key in summed else total / denominators.tokens
        for key, total in zip(keys, totals.tolist(), strict=True)
    }


@dataclass(kw_only=True)
class MiniBatchStep:
    """What one optimizer step on a mini-batch did."""

    metrics: dict[str, float]
    """The mini-batch's metrics over all ranks (`minibatch_metrics`)."""
    grad_norm: float | None
    """The gradient's norm before clipping; None where the step was skipped (not finite)."""


def minibatch_step(
    model,
    optimizer: torch.optim.Optimizer,
    mini: UpdateBatch,
    setup: LossSetup,
    optim: OptimConfig,
    *,
    moved: bool,
    seen: tuple[Tensor, Tensor, Tensor] | None,
) -> MiniBatchStep | None:
    """One optimizer step on mini-batch `mini`: its selection (`minibatch_selection`), the
    gradients of its micro-batches (`accumulate_gradients`) and the step (`optimizer_step`). None,
    with nothing done, where no token of the mini-batch enters the loss on any rank."""
    denominators = losses.loss_denominators(
        mini.response_mask,
        norm_constant=setup.norm_constant,
        across_ranks=True,
        allow_empty=True,
    )
    if denominators is None:
        return None
    plan = micro_batch_plan(
        mini, setup, micro_batches.Budget(optim.micro_batch_size, optim.micro_batch_tokens)
    )
    whole = minibatch_selection(
        model,
        mini,
        setup,
        micro_batch_count=len(plan),
        moved=moved,
        budget=micro_batches.Budget(optim.log_prob_rows, optim.log_prob_tokens),
    )
    optimizer.zero_grad(set_to_none=True)
    done = accumulate_gradients(
        model, mini, setup, denominators=denominators, whole=whole, plan=plan, seen=seen
    )
    summed = setup.spec.summed_metrics | {"kl_loss"}
    device = mini.response_mask.device
    params = [p for p in model.parameters() if p.requires_grad]
    return MiniBatchStep(
        metrics=minibatch_metrics(done.sums, summed, denominators, device),
        grad_norm=optimizer_step(optimizer, params, optim.grad_clip, finite=done.finite),
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
    moved: bool = False,
    loss_kwargs: dict[str, Any] | None = None,
) -> UpdateResult:
    """`epochs x mini-batches` optimizer steps on one rollout batch (this rank's rows).

    Each mini-batch is split into micro-batches whose losses use the whole mini-batch's
    denominators (and selection), so the accumulated gradient equals that of the mini-batch in one
    piece (`accumulate_gradients`). The logged metrics are the mini-batch's own (summed or
    token-weighted over micro-batches and ranks, `PolicyLossSpec.summed_metrics`), averaged over
    the optimizer steps, so they do not depend on the split either. A mini-batch in which no token
    enters the loss on any rank (dynamic sampling or high-entropy masking can leave one empty) is
    skipped by every rank and counted in `actor/empty_minibatches`; an update whose loss or
    gradient is not finite is skipped and counted in `actor/skipped_updates`; an update that
    leaves a weight NaN or infinite, which no later update can mend, raises NonFiniteError.

    Every forward runs once: with `batch.old_log_prob` None (on-policy: one mini-batch, one
    epoch) the old log-probs are the training forward's, detached, so the ratio is exactly 1; a
    whole-mini-batch selection uses the old log-probs while the weights have not moved yet (the
    first mini-batch), and the training forward's own when the mini-batch is one micro-batch
    (`minibatch_selection`). `moved` says that the weights have already changed since the
    rollout (an earlier call on the same rollout, as Lopti's second pass), so that no selection
    trusts the old log-probs then. `loss_kwargs` replaces the loss's settings as its keyword
    arguments (those of its `LossController`, when it has one).
    """
    setup = loss_setup(config, generator, entropy_coef, loss_kwargs)
    o = config.optim
    n, R = batch.response_mask.shape
    if batch.old_log_prob is None and (o.epochs > 1 or n > o.mini_batch_size):
        raise ValueError("old_log_prob=None (on-policy) needs one mini-batch and one epoch")
    device = batch.response_mask.device
    metrics: dict[str, list[float]] = defaultdict(list)
    seen_log_prob = batch.response_mask.new_zeros(n, R)
    seen_entropy = batch.response_mask.new_zeros(n, R)
    skipped = empty = 0
    steps = o.epochs * math.ceil(n / o.mini_batch_size)
    quiet = not bars(progress) or steps == 1
    bar = tqdm(total=steps, desc="update", unit="step", leave=False, disable=quiet)
    for epoch in range(o.epochs):
        # drawn on the CPU (the generator's device), so the order is the same on every device
        order = torch.randperm(n, generator=generator, device="cpu").to(device)
        for mini_rows in order.split(o.mini_batch_size):
            bar.update()
            step = minibatch_step(
                model,
                optimizer,
                batch.rows(mini_rows),
                setup,
                o,
                moved=moved,
                seen=(seen_log_prob, seen_entropy, mini_rows) if epoch == 0 else None,
            )
            if step is None:  # the count is global: every rank skips together
                empty += 1
                continue
            for key, value in step.metrics.items():
                metrics[key].append(value)
            if step.grad_norm is None:
                skipped += 1
                continue
            moved = True
            metrics["grad_norm"].append(step.grad_norm)
    bar.close()
    out = {f"actor/{k}": sum(v) / len(v) for k, v in metrics.items()}
    out["actor/skipped_updates"] = skipped
    out["actor/empty_minibatches"] = empty
    return UpdateResult(out, seen_log_prob, seen_entropy, moved)


def optimizer_step(
    optimizer: torch.optim.Optimizer, params: list[Tensor], grad_clip: float, *, finite: bool
) -> float | None:
    """Clip the accumulated gradient and step; returns its norm before clipping, or None where
    the loss (`finite` False) or the gradient is not finite and the step is skipped: a non-finite
    loss on any rank poisons the all-reduced gradient on every rank, so every rank skips
    together. Raises NonFiniteError where the step leaves a weight NaN or infinite."""
    grad_norm = parallel.global_grad_norm(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    if not (finite and torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    if not parallel.all_finite(params):
        raise NonFiniteError("the update made the weights NaN or infinite")
    return grad_norm.item()


def loss_setup(
    config: Config,
    generator: torch.Generator,
    entropy_coef: float,
    loss_kwargs: dict[str, Any] | None,
) -> LossSetup:
    """The policy loss of `config` as an update applies it (`loss_kwargs`: a controller's)."""
    a = config.algorithm
    spec = losses.get_policy_loss(a.policy_loss)
    settings = config.loss_settings()
    if loss_kwargs is None and spec.controller is not None:
        raise ValueError(
            f"policy loss {a.policy_loss!r} keeps a controller: pass its loss_kwargs() as "
            "loss_kwargs (Trainer.update does)"
        )
    return LossSetup(
        spec=spec,
        settings=settings,
        loss_kwargs=loss_kwargs,
        algorithm=a,
        norm_constant=config.rollout.max_new_tokens,
        temperature=config.rollout.temperature,
        shared_prefix=config.optim.shared_prefix,
        fused_head=config.model.fused_head,
        entropy_coef=entropy_coef,
        generator=generator,
    )
