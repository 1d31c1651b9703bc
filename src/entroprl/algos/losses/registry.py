"""The policy-loss registry (algorithms.md §4): one signature for every loss, its settings with it,
and the errors naming the dotted key."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from entroprl.algos.checks import check_choice
from entroprl.algos.losses.aggregation import LossDenominators, loss_denominators

# --------------------------------------------------------------------------------------------------
# Policy losses (algorithms.md §4)

PolicyLoss = Callable[..., tuple[Tensor, dict[str, float]]]
"""``fn(log_prob, old_log_prob, advantages, response_mask, *, loss_agg_mode, denominators,
**settings[, selected][, weights]) -> (loss, metrics)``: the one signature of every registered
loss. `weights` (B, T), the rollout importance weights, multiply each token's whole loss term
before aggregation (`aggregate_loss(..., weights=weights)`); a trainer passes them only when the
correction is on."""
Selection = Callable[..., Tensor]
"""``select(log_prob, old_log_prob, advantages, response_mask, settings, *, generator,
across_ranks) -> (B, T) bool``: the tokens a loss treats apart, chosen over a whole scope."""


class LossController(Protocol):
    """State a loss keeps from one rollout step to the next (EntroPIC's PI controller), held by the
    trainer for it (`PolicyLossSpec.controller`) without the trainer knowing what it controls."""

    def update(self, entropy: Mapping[str, float]) -> dict[str, float]:
        """Take the step's policy entropy over the training batch before the update
        (`entropy.batch_entropy`: ``token_mean`` and ``seq_mean_token_mean``, all ranks); return
        the metrics to log for the step."""

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the loss for this step: its settings and controlled values."""

    def state_dict(self) -> dict[str, float]:
        """A plain JSON-able dict, saved in checkpoints."""

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what `state_dict` returned; raise ValueError on a malformed state."""


@dataclass
class NoSettings:
    """The settings of a loss that has none."""

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class PolicyLossSpec:
    """A registered policy loss: what a trainer needs to call it without knowing which it is.

    fn: the loss (`PolicyLoss`); it receives `loss_agg_mode`, `denominators` and every field of
        `settings` as keyword arguments, `selected` when the loss has a selection, and `weights`
        when the trainer corrects the rollout mismatch.
    settings: a dataclass of the loss's own settings (each field a keyword argument of `fn`, with
        its default and a docstring), whose `validate()` raises `SettingError` naming a field. A
        configuration holds them under ``algorithm.loss.<name>.<field>``.
    select: an optional selection (`Selection`) the trainer makes over the whole mini-batch on all
        ranks (or per micro-batch, the reference scope) and passes to `fn` as `selected`.
    summed_metrics: metrics of `fn` that add up over the micro-batches and ranks of a mini-batch
        (loss values computed with whole-mini-batch denominators, counts); the others are means
        over the valid tokens passed, which a trainer weights by their number. Either way the
        mini-batch's value does not depend on how it was split.
    on_policy_note: set when the loss degenerates while the update is fully on-policy (one
        mini-batch, one epoch: logp == old_logp); a trainer warns with it.
    selection_denominators: the loss aggregates a term over its selected tokens alone; the trainer
        then also passes `selected_denominators`, `loss_denominators` of the selection over the
        same scope (None when it selects nothing), so that the term does not depend on the split.
    controller: an optional `LossController` class, built from the settings (``controller(s)``):
        the trainer calls its `update` with each step's entropy before the update, calls the loss
        with its `loss_kwargs` instead of the settings, and saves its state in checkpoints.
    """

    name: str
    fn: PolicyLoss
    settings: type = NoSettings
    select: Selection | None = None
    summed_metrics: frozenset[str] = frozenset({"pg_loss"})
    on_policy_note: str | None = None
    selection_denominators: bool = False
    controller: Callable[[Any], LossController] | None = None

    def selection(
        self,
        log_prob: Tensor,
        old_log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        settings: Any,
        *,
        generator: torch.Generator | None = None,
        across_ranks: bool = False,
        norm_constant: float | None = None,
    ) -> dict[str, Any]:
        """The loss's token selection over the tensors passed (every rank's with `across_ranks`),
        as the keyword arguments `fn` takes it: none for a loss without a selection; `selected`;
        and, for a loss that averages over its selection, `selected_denominators` over the same
        scope (None when it selects nothing)."""
        if self.select is None:
            return {}
        selected = self.select(
            log_prob,
            old_log_prob,
            advantages,
            response_mask,
            settings,
            generator=generator,
            across_ranks=across_ranks,
        )
        out: dict[str, Any] = {"selected": selected}
        if self.selection_denominators:
            out["selected_denominators"] = loss_denominators(
                selected, norm_constant=norm_constant, across_ranks=across_ranks, allow_empty=True
            )
        return out

    def apply(
        self,
        log_prob: Tensor,
        old_log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        settings: Any,
        *,
        loss_agg_mode: str,
        denominators: LossDenominators | None = None,
        selection: dict[str, Any] | None = None,
        weights: Tensor | None = None,
        loss_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        across_ranks: bool = False,
        norm_constant: float | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss on these tokens, as every caller makes it (the trainer, the plug-ins): its
        selection (`selection` when made beforehand over a wider scope, else `self.selection`
        over these tensors, from the detached log-probs), then `fn` with `settings` as keyword
        arguments (`loss_kwargs` instead: a controller's), the aggregation, the `denominators`
        and the rollout importance `weights` (None: no correction)."""
        if selection is None:
            selection = self.selection(
                log_prob.detach(),
                old_log_prob,
                advantages,
                response_mask,
                settings,
                generator=generator,
                across_ranks=across_ranks,
                norm_constant=norm_constant,
            )
        extra = dict(selection)
        if weights is not None:
            extra["weights"] = weights
        return self.fn(
            log_prob,
            old_log_prob,
            advantages,
            response_mask,
            loss_agg_mode=loss_agg_mode,
            denominators=denominators,
            **(asdict(settings) if loss_kwargs is None else loss_kwargs),
            **extra,
        )


POLICY_LOSSES: dict[str, PolicyLossSpec] = {}


def register_policy_loss(
    name: str,
    *,
    settings: type = NoSettings,
    select: Selection | None = None,
    summed_metrics: tuple[str, ...] = (),
    on_policy_note: str | None = None,
    selection_denominators: bool = False,
    controller: Callable[[Any], LossController] | None = None,
) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator registering a policy loss under `name` with its settings and optional selection
    (`PolicyLossSpec`); a name already taken raises. "pg_loss" is always summed."""

    if selection_denominators and select is None:
        raise ValueError(f"policy loss {name!r}: selection_denominators needs a selection")

    def register(fn: PolicyLoss) -> PolicyLoss:
        if name in POLICY_LOSSES and POLICY_LOSSES[name].fn is not fn:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = PolicyLossSpec(
            name=name,
            fn=fn,
            settings=settings,
            select=select,
            summed_metrics=frozenset({"pg_loss", *summed_metrics}),
            on_policy_note=on_policy_note,
            selection_denominators=selection_denominators,
            controller=controller,
        )
        return fn

    return register


def get_policy_loss(name: str) -> PolicyLossSpec:
    """The policy loss registered as `name`; an unknown name raises, listing the known ones."""
    check_choice("policy loss", name, POLICY_LOSSES)
    return POLICY_LOSSES[name]
