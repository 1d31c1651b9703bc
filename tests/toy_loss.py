"""A policy loss defined outside entroprl, as a user's plug-in module would define it: its own
settings and a whole-mini-batch selection, registered on import (`algorithm.plugins`)."""

from dataclasses import dataclass

import torch

from entroprl.algos import losses

SCOPES: list[tuple[tuple[int, ...], bool]] = []
"""(shape, across_ranks) of every selection made, for the tests to read."""


@dataclass
class ToySettings:
    fraction: float = 0.25
    """Share of the valid tokens, those with the largest |A|, whose term is scaled."""
    weight: float = 0.5
    """Scale of the selected tokens' terms."""

    def validate(self) -> None:
        if not 0 < self.fraction <= 1:
            raise losses.SettingError("fraction", f"must be in (0, 1], got {self.fraction}")
        if self.weight < 0:
            raise losses.SettingError("weight", f"must be >= 0, got {self.weight}")


def toy_select(log_prob, old_log_prob, advantages, response_mask, s, *, generator, across_ranks):
    SCOPES.append((tuple(response_mask.shape), across_ranks))
    return losses.top_fraction(
        advantages.abs() + 1e-3 * log_prob.detach(),
        response_mask,
        s.fraction,
        across_ranks=across_ranks,
    )


@losses.register_policy_loss(
    "toy_scaled", settings=ToySettings, select=toy_select, summed_metrics=("toy_selected",)
)
def toy_scaled_loss(
    log_prob,
    old_log_prob,
    advantages,
    response_mask,
    *,
    fraction=0.25,
    weight=0.5,
    selected=None,
    loss_agg_mode="token-mean",
    denominators=None,
    weights=None,
):
    """L = -A * exp(logp - old_logp), times `weight` on the selected tokens."""
    if selected is None:
        selected = toy_select(
            log_prob,
            old_log_prob,
            advantages,
            response_mask,
            ToySettings(fraction, weight),
            generator=None,
            across_ranks=False,
        )
    per_token = -advantages * torch.exp(log_prob - old_log_prob)
    per_token = torch.where(selected, weight * per_token, per_token)
    loss = losses.aggregate_loss(
        per_token, response_mask, loss_agg_mode, denominators=denominators, weights=weights
    )
    return loss, {"pg_loss": loss.item(), "toy_selected": float(selected.sum())}
