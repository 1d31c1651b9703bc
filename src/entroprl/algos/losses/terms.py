"""The entropy and reference-KL terms, and high-entropy masking (algorithms.md §4)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from entroprl.algos.checks import check_choice, check_finite, check_mask, check_same_shape
from entroprl.algos.losses.aggregation import LossDenominators, aggregate_loss
from entroprl.algos.losses.common import check_fraction, fraction_count, top_valid

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


def high_entropy_mask(
    entropy: Tensor, response_mask: Tensor, *, rho: float = 0.2, across_ranks: bool = False
) -> Tensor:
    """The high-entropy minority of Wang et al. (algorithms.md §4), as a bool mask (B, T).

    The top `ceil(rho * N)` valid tokens by entropy, N the valid tokens in the scope (ties to the
    lowest row-major index; padding never picked). The trainer multiplies the response mask by it,
    so the policy-gradient mean runs over the kept tokens only.
    """
    check_same_shape(entropy=entropy, response_mask=response_mask)
    mask = check_mask(response_mask)
    check_fraction("rho", rho, upper=1.0)
    check_finite("entropy", entropy, mask)
    return top_valid(
        entropy, mask, lambda n: fraction_count(rho, n, round_up=True), across_ranks=across_ranks
    )


# --------------------------------------------------------------------------------------------------
# Entropy and reference-KL terms (algorithms.md §4)


def entropy_bonus(
    entropy: Tensor,
    response_mask: Tensor,
    alpha: float,
    *,
    loss_agg_mode: str = "token-mean",
    denominators: LossDenominators | None = None,
) -> Tensor:
    """Entropy bonus to add to the policy loss (algorithms.md §4): `-alpha * agg(H)`, agg of
    algorithms.md §5.

    `entropy` must carry the gradient (computed from the logits of the training forward pass):
    the no_grad entropy logged for monitoring would make the bonus a constant with no effect, so
    an entropy without gradient raises while grad mode is on.
    """
    check_same_shape(entropy=entropy, response_mask=response_mask)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if torch.is_grad_enabled() and not entropy.requires_grad:
        raise ValueError(
            "entropy has no gradient (computed under no_grad, or detached?): "
            "the bonus would do nothing"
        )
    mask = check_mask(response_mask)
    check_finite("entropy", entropy, mask)
    return -alpha * aggregate_loss(entropy, mask, loss_agg_mode, denominators=denominators)


@dataclass
class AdaptiveEntropyCoef:
    """Adaptive entropy-bonus coefficient (algorithms.md §4): a fixed step toward an entropy target.

        alpha <- clip(alpha + delta * sign(target - H), min_alpha, max_alpha)

    (raised when the entropy is below target, lowered above it, kept when equal).
    `state_dict` / `load_state_dict` save and restore it in checkpoints as a plain JSON-able dict.
    """

    alpha: float
    target: float
    delta: float
    min_alpha: float
    max_alpha: float

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        fields = asdict(self)
        if not all(math.isfinite(v) for v in fields.values()):
            raise ValueError(f"AdaptiveEntropyCoef fields must be finite, got {fields}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        if not self.min_alpha <= self.alpha <= self.max_alpha:
            raise ValueError(
                f"need min_alpha <= alpha <= max_alpha, got {self.min_alpha}, {self.alpha}, "
                f"{self.max_alpha}"
            )

    def update(self, entropy: float) -> float:
        """Move alpha one step given the measured policy entropy; return the new alpha."""
        if not math.isfinite(entropy):
            raise ValueError(f"entropy must be finite, got {entropy}")
        step = (
            self.delta if entropy < self.target else -self.delta if entropy > self.target else 0.0
        )
        self.alpha = min(max(self.alpha + step, self.min_alpha), self.max_alpha)
        return self.alpha

    def state_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        expected = set(asdict(self))
        if set(state) != expected:
            raise ValueError(
                f"AdaptiveEntropyCoef state must have keys {sorted(expected)}, got {sorted(state)}"
            )
        for key, value in state.items():
            setattr(self, key, float(value))
        self._validate()


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL estimate to a reference policy (algorithms.md §4), with d = ref_logp - logp:

        k1 = -d = logp - ref_logp,   k2 = 0.5 * d^2,   k3 = low_var_kl = exp(d) - d - 1

    Not clamped (algorithms.md §4 gives none; verl clamps d and k3 to +-20 and +-10).
    """
    check_choice("KL estimator", estimator, KL_ESTIMATORS)
    check_same_shape(log_prob=log_prob, ref_log_prob=ref_log_prob)
    d = ref_log_prob - log_prob
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    return torch.expm1(d) - d
