"""EntroPIC (algorithms.md §4.9)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from entroprl.algos.checks import check_finite, check_mask, check_same_shape
from entroprl.algos.losses.aggregation import (
    LossDenominators,
    aggregate_loss,
    loss_denominators,
    zero_padding,
)
from entroprl.algos.losses.common import LOG_RATIO_CLAMP, check_selected, token_means
from entroprl.algos.losses.ppo import PPOSettings, ppo_loss
from entroprl.algos.losses.registry import register_policy_loss
from entroprl.analysis.law import entropy_at_ceiling_fraction
from entroprl.errors import SettingError

# --------------------------------------------------------------------------------------------------
# EntroPIC (algorithms.md §4.9)

ENTROPIC_ENTROPIES = ("token_mean", "seq_mean_token_mean")
# EntroPIC clips its control signal to [-1, 1] (the authors' np.clip in their actor).
_ENTROPIC_ALPHA_BOUND = 1.0


@dataclass
class EntroPICSettings:
    clip_low: float = 0.2
    """PPO's lower clip: the ratio is clamped to [1 - clip_low, ...], as `ppo`."""
    clip_high: float = 0.2
    """PPO's upper clip: [..., 1 + clip_high], as `ppo`."""
    clip_ratio_c: float = 3.0
    """PPO's dual clip for negative advantages, as `ppo`; > 1."""
    high_prob_threshold: float = 0.95
    """Tokens with probability above it (current policy) get the control term; in (0, 1)."""
    kp: float = 1.0
    """Proportional gain K_p (the authors' run script)."""
    ki: float = 0.01
    """Integral gain K_i (the authors' run script)."""
    target: float | None = 0.1
    """H_target, fixed (the authors' 0.1 is for an 8B model sampled at temperature 0.6); None:
    from the law, with law_a, law_b and law_fraction."""
    law_a: float | None = None
    """H_target from the law R = -a*exp(H) + b of an earlier run (`entroprl analyze`): the entropy
    at which it predicts law_fraction of its ceiling b - a."""
    law_b: float | None = None
    """The law's b (with law_a): its ceiling is b - a."""
    law_fraction: float = 0.9
    """The fraction of the law's ceiling at whose entropy H_target is set; in (0, 1)."""
    entropy: str = "token_mean"
    """Which batch entropy the controller tracks: token_mean (the authors', with token-mean
    aggregation) or seq_mean_token_mean (the paper's H, which the law is fitted on)."""

    def validate(self) -> None:
        PPOSettings(self.clip_low, self.clip_high, self.clip_ratio_c).validate()
        if not 0 < self.high_prob_threshold < 1:
            raise SettingError(
                "high_prob_threshold", f"must be in (0, 1), got {self.high_prob_threshold}"
            )
        for name in ("kp", "ki"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SettingError(name, f"must be a finite number >= 0, got {value}")
        if self.entropy not in ENTROPIC_ENTROPIES:
            raise SettingError("entropy", f"must be {' or '.join(ENTROPIC_ENTROPIES)}")
        self.target_entropy()

    def target_entropy(self) -> float:
        """H_target: `target`, or the law's entropy at `law_fraction` of its ceiling."""
        law = (self.law_a, self.law_b)
        if (self.target is None) == (law == (None, None)):
            raise SettingError(
                "target", "or law_a and law_b: set exactly one (a fixed H_target or the law's)"
            )
        if self.target is not None:
            if not (math.isfinite(self.target) and self.target >= 0):
                raise SettingError("target", f"must be a finite number >= 0, got {self.target}")
            return self.target
        if None in law:
            raise SettingError("law_a", "and law_b: both are needed for H_target from the law")
        try:
            return entropy_at_ceiling_fraction(self.law_a, self.law_b, self.law_fraction)
        except ValueError as e:
            raise SettingError("law_a", f"law_b, law_fraction: {e}") from None


def high_prob_select(log_prob: Tensor, response_mask: Tensor, *, threshold: float) -> Tensor:
    """EntroPIC's high-probability tokens (algorithms.md §4.9), as a bool mask (B, T): the valid
    tokens with `logp > log(threshold)` under the current policy. A per-token test: the scope
    only sets the denominators of the term aggregated over them."""
    check_same_shape(log_prob=log_prob, response_mask=response_mask)
    mask = check_mask(response_mask)
    check_finite("log_prob", log_prob, mask)
    return mask & (log_prob.detach() > math.log(threshold))


def _entropic_selection(
    log_prob, old_log_prob, advantages, response_mask, s, *, generator, across_ranks
) -> Tensor:
    """EntroPIC's `Selection`: `high_prob_select` with the loss's threshold."""
    return high_prob_select(log_prob, response_mask, threshold=s.high_prob_threshold)


@dataclass
class EntroPICController:
    """EntroPIC's PI controller on the entropy (algorithms.md §4.9), updated once per step:

        e_t = H_t - H_target
        alpha_t = clip(K_p * e_t + K_i * I_{t-1}, -1, 1),   I_t = I_{t-1} + e_t

    H_t is the step's batch entropy (`settings.entropy`) before its update. alpha_t > 0 (entropy
    above target) weights the high-probability tokens of positive responses up and of negative
    ones down, which lowers the entropy; alpha_t < 0 does the opposite. The integral is not
    clipped, as the authors'. `state_dict` / `load_state_dict` save it in checkpoints.
    """

    settings: EntroPICSettings
    integral: float = 0.0
    alpha: float = 0.0

    def __post_init__(self) -> None:
        self.settings.validate()
        self.target = self.settings.target_entropy()

    def update(self, entropy: Mapping[str, float]) -> dict[str, float]:
        h = float(entropy[self.settings.entropy])
        if not math.isfinite(h):
            raise ValueError(f"entropy must be finite, got {h}")
        s, error = self.settings, h - self.target
        signal = s.kp * error + s.ki * self.integral
        self.alpha = min(max(signal, -_ENTROPIC_ALPHA_BOUND), _ENTROPIC_ALPHA_BOUND)
        self.integral += error
        return {
            "actor/control_alpha": self.alpha,
            "actor/control_error": error,
            "actor/control_integral": self.integral,
            "actor/control_target": self.target,
        }

    def loss_kwargs(self) -> dict[str, Any]:
        s = self.settings
        return {
            "clip_low": s.clip_low,
            "clip_high": s.clip_high,
            "clip_ratio_c": s.clip_ratio_c,
            "high_prob_threshold": s.high_prob_threshold,
            "alpha": self.alpha,
        }

    def state_dict(self) -> dict[str, float]:
        return {"integral": self.integral, "alpha": self.alpha}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if set(state) != {"integral", "alpha"}:
            raise ValueError(
                "EntroPIC controller state must have keys ['alpha', 'integral'], got "
                f"{sorted(state)}"
            )
        values = {k: float(v) for k, v in state.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise ValueError(f"EntroPIC controller state must be finite, got {values}")
        self.integral, self.alpha = values["integral"], values["alpha"]


@register_policy_loss(
    "entropic",
    settings=EntroPICSettings,
    select=_entropic_selection,
    summed_metrics=("entropic_term",),
    selection_denominators=True,
    controller=EntroPICController,
)
def entropic_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    alpha: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    high_prob_threshold: float = 0.95,
    loss_agg_mode: str = "token-mean",
    selected: Tensor | None = None,
    denominators: LossDenominators | None = None,
    selected_denominators: LossDenominators | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """EntroPIC policy loss of Yang et al. (algorithms.md §4.9): PPO plus a controlled term on
    high-probability tokens.

        L = L_PPO + alpha * agg_S(-r * |A|),   S = {valid t : logp_t > log(high_prob_threshold)}

    L_PPO is `ppo_loss` (clamped ratio r, dual clip; its tokens times `weights` when given, the
    term unweighted, as the authors' code weights pg_losses only); agg_S aggregates over S alone
    with `loss_agg_mode`, with `selected_denominators` (of S over the trainer's scope; None: S's own
    over the tensors passed); it is 0 when S is empty, as the authors' masked mean gives. `alpha`
    is the controller's (`EntroPICController`); 0 gives PPO. `selected` is S from
    `high_prob_select` over the scope; None computes it from `log_prob`. Metrics: ppo_loss's,
    with pg_loss the whole loss; entropic_term, the aggregated term before alpha (summed over a
    split mini-batch); entropic_high_prob_frac, the fraction of valid tokens in S.
    """
    if not math.isfinite(alpha):
        raise SettingError("alpha", f"must be finite, got {alpha}")
    if not 0 < high_prob_threshold < 1:
        raise SettingError("high_prob_threshold", f"must be in (0, 1), got {high_prob_threshold}")
    ppo, metrics = ppo_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        clip_ratio_c=clip_ratio_c,
        loss_agg_mode=loss_agg_mode,
        denominators=denominators,
        weights=weights,
    )
    mask = check_mask(response_mask)
    if selected is None:
        selected = high_prob_select(log_prob, mask, threshold=high_prob_threshold)
    selected = check_selected(selected, mask)
    if selected_denominators is None:
        selected_denominators = loss_denominators(selected, across_ranks=False, allow_empty=True)
    if selected_denominators is None:  # S is empty over the whole scope
        term = ppo.new_zeros(())
    else:
        log_ratio = zero_padding(log_prob, mask) - zero_padding(old_log_prob, mask)
        ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        term = aggregate_loss(
            -ratio * zero_padding(advantages, mask).abs(),
            selected,
            loss_agg_mode,
            denominators=selected_denominators,
        )
    loss = ppo + alpha * term
    metrics |= token_means(mask, entropic_high_prob_frac=selected.to(torch.float64))
    return loss, {**metrics, "pg_loss": loss.item(), "entropic_term": term.item()}
