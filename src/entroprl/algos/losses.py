"""Policy losses, their aggregation, and the entropy-control terms (algorithms.md §3, §4, §5).

Every loss takes per-token tensors of shape (B, T): `log_prob` (current policy, with gradient),
`old_log_prob` (rollout policy), `advantages` and a 0/1 `response_mask`, and returns
`(loss, metrics)`. Values at padding positions are ignored (they may hold anything, NaN included);
NaN or inf at a valid position raises `ValueError`.

Split invariance (algorithms.md §5). A trainer that accumulates gradients over micro-batches passes
`denominators=loss_denominators(minibatch_mask)` and, for Clip-Cov and KL-Cov, the `selected` mask
computed once over the whole mini-batch (`clip_cov_select` / `kl_cov_select`, `across_ranks=True`);
the sum of the micro-batch losses then equals the mini-batch loss, gradient included, however the
mini-batch is split. Without them, each call uses the tensors passed as its own scope: the reference
(verl) per-micro-batch behaviour.

Clip-Cov's bounds `lb`, `ub` are absolute values of an unnormalised product
`(logp - mean) * (A - mean)`: they depend on the advantage scale (algorithms.md §3), so changing the
advantage estimator (e.g. GRPO vs Dr. GRPO) changes which tokens are candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from entroprl.algos.checks import check_choice, check_finite, check_mask, check_same_shape
from entroprl.algos.dynamics import token_covariance
from entroprl.analysis.law import entropy_at_ceiling_fraction
from entroprl.errors import SettingError
from entroprl.train import distributed

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")

# PPO's log-ratio clamp (algorithms.md §4, as in verl): keeps exp() finite in float32 for any
# log-ratio.
_LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------------
# Input validation


def _check_fraction(name: str, value: float, *, upper: float | None = None) -> None:
    if not (math.isfinite(value) and value > 0 and (upper is None or value <= upper)):
        bound = f" and <= {upper}" if upper is not None else ""
        raise SettingError(name, f"must be a finite number > 0{bound}, got {value}")


def _check_loss_inputs(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate a loss's inputs; return them with padding zeroed, and the mask as bool."""
    check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    check_same_shape(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=response_mask,
    )
    mask = check_mask(response_mask)
    check_finite("log_prob", log_prob, mask)
    check_finite("old_log_prob", old_log_prob, mask)
    check_finite("advantages", advantages, mask)
    log_prob, old_log_prob, advantages = (
        _zero_padding(t, mask) for t in (log_prob, old_log_prob, advantages)
    )
    return log_prob, old_log_prob, advantages, mask


def _check_selected(selected: Tensor, mask: Tensor) -> Tensor:
    check_same_shape(selected=selected, response_mask=mask)
    selected = check_mask(selected, "selected")
    if bool((selected & ~mask).any()):
        raise ValueError(
            "selected marks padding tokens (response_mask = 0); was it built for this batch?"
        )
    return selected


def _fraction_count(fraction: float, n: int, *, round_up: bool) -> int:
    """ceil or floor of `fraction * n`; a product within 1e-9 of an integer counts as that integer.

    Float rounding would otherwise give ceil(0.2 * 15) = 4 and floor(0.29 * 100) = 28.
    """
    x = fraction * n
    nearest = round(x)
    if abs(x - nearest) <= 1e-9 * max(1.0, abs(x)):
        return int(nearest)
    return math.ceil(x) if round_up else math.floor(x)


def _zero_padding(values: Tensor, mask: Tensor) -> Tensor:
    """`values` with padding set to 0: NaN or inf there then reaches neither a sum nor a gradient
    (a masked product would give 0 * NaN = NaN in the backward pass)."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


# --------------------------------------------------------------------------------------------------
# Aggregation (algorithms.md §5)


@dataclass(frozen=True)
class LossDenominators:
    """Denominators of the loss aggregation over one whole optimizer mini-batch (algorithms.md §5).

    tokens: number of valid tokens (token-mean).
    sequences: number of non-empty responses (the seq-mean-* modes).
    norm_constant: C of seq-mean-token-sum-norm; None means the padded length T of the mask given
        to `aggregate_loss`.
    """

    tokens: int
    sequences: int
    norm_constant: float | None = None

    def __post_init__(self) -> None:
        if self.tokens <= 0 or self.sequences <= 0:
            raise ValueError(
                f"LossDenominators needs tokens > 0 and sequences > 0, got tokens={self.tokens}, "
                f"sequences={self.sequences} (is the mini-batch mask empty?)"
            )
        if self.norm_constant is not None and not (
            math.isfinite(self.norm_constant) and self.norm_constant > 0
        ):
            raise ValueError(f"norm_constant must be a finite number > 0, got {self.norm_constant}")


def loss_denominators(
    response_mask: Tensor,
    *,
    norm_constant: float | None = None,
    across_ranks: bool = True,
    allow_empty: bool = False,
) -> LossDenominators | None:
    """Denominators of algorithms.md §5 for the whole mini-batch `response_mask` (B, T).

        tokens = sum(m),   sequences = #{i : sum_t m[i,t] > 0},   norm_constant = C or T

    With `across_ranks` and torch.distributed running, tokens and sequences are summed over ranks.
    A `norm_constant` of None is resolved to this mask's padded length T, so that micro-batches
    trimmed to shorter padding keep the mini-batch's constant (the trainer should pass the
    configured maximum response length instead, which makes the loss independent of padding).
    A mask with no token (on any rank) raises, or gives None with `allow_empty`: a trainer skips
    such a mini-batch, and since the count is global every rank skips it together.
    """
    mask = check_mask(response_mask)
    counts = torch.stack([mask.sum(), mask.any(dim=-1).sum()])
    if across_ranks:
        counts = distributed.all_reduce_sum(counts)
    tokens, sequences = (int(c) for c in counts.tolist())
    if tokens == 0 and allow_empty:
        return None
    if tokens == 0:
        raise ValueError(
            "response_mask selects no token over the whole mini-batch: nothing to average"
        )
    constant = float(mask.shape[-1]) if norm_constant is None else float(norm_constant)
    return LossDenominators(tokens=tokens, sequences=sequences, norm_constant=constant)


def aggregate_loss(
    loss_mat: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str,
    *,
    denominators: LossDenominators | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Aggregate a per-token loss `l` (B, T) over the mask `m` into a scalar (algorithms.md §5
    table), `l` first multiplied by `weights` (B, T) when given (the rollout importance weights,
    as verl's ``pg_losses * rollout_is_weights``; the denominators stay token and sequence counts):

        token-mean               sum(l*m) / tokens
        seq-mean-token-mean      sum_i [sum_t(l*m) / sum_t(m)] / sequences   (empty rows add 0)
        seq-mean-token-sum       sum_i sum_t(l*m) / sequences
        seq-mean-token-sum-norm  sum(l*m) / C

    `denominators` (from `loss_denominators` over the whole mini-batch) makes the sum over
    micro-batches equal the mini-batch value; None computes them from this mask alone (the reference
    per-micro-batch behaviour), which needs a non-empty mask. Padding values of `loss_mat` are
    ignored, even NaN.
    """
    check_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES)
    check_same_shape(loss_mat=loss_mat, response_mask=response_mask)
    mask = check_mask(response_mask)
    if denominators is None:
        denominators = loss_denominators(mask, across_ranks=False)
    if weights is not None:
        check_same_shape(loss_mat=loss_mat, weights=weights)
        check_finite("weights", weights, mask)
        loss_mat = loss_mat * _zero_padding(weights, mask)
    masked = torch.where(
        mask, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device)
    )
    if loss_agg_mode == "token-mean":
        return masked.sum() / denominators.tokens
    if loss_agg_mode == "seq-mean-token-mean":
        row_tokens = mask.sum(dim=-1).clamp(min=1).to(loss_mat.dtype)
        return (masked.sum(dim=-1) / row_tokens).sum() / denominators.sequences
    if loss_agg_mode == "seq-mean-token-sum":
        return masked.sum() / denominators.sequences
    constant = denominators.norm_constant
    return masked.sum() / (float(mask.shape[-1]) if constant is None else constant)


# --------------------------------------------------------------------------------------------------
# Covariance selection (algorithms.md §3, §4)


def _top_valid(
    scores: Tensor, mask: Tensor, count: Callable[[int], int], *, across_ranks: bool
) -> Tensor:
    """Bool mask of the `count(N)` valid tokens with the largest `scores` (N valid in the scope).

    Ties go to the lowest flat index (row-major; across ranks, the lower rank first). Across ranks,
    every rank sorts the same gathered scores and keeps the winners that are its own.
    """
    flat_valid = mask.reshape(-1).nonzero().squeeze(1)
    local = scores.detach().reshape(-1)[flat_valid]
    gathered, offset = distributed.all_gather_cat(local) if across_ranks else (local, 0)
    if gathered.numel() == 0:
        raise ValueError(
            "response_mask selects no token over the selection scope: nothing to select"
        )
    k = min(count(gathered.numel()), gathered.numel())
    winners = torch.sort(gathered, descending=True, stable=True).indices[:k]
    mine = winners[(winners >= offset) & (winners < offset + local.numel())] - offset
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    out[flat_valid[mine.to(flat_valid.device)]] = True
    return out.view_as(mask)


def top_fraction(
    scores: Tensor, response_mask: Tensor, fraction: float, *, across_ranks: bool = False
) -> Tensor:
    """The `max(floor(fraction * N), 1)` valid tokens with the largest `scores`, as a bool mask
    (B, T); N is the number of valid tokens in the scope (every rank's, in rank order, with
    `across_ranks`). Ties go to the lowest row-major index; padding is never picked. A building
    block for selections (`PolicyLossSpec.select`): KL-Cov's is this over the covariance."""
    mask = check_mask(response_mask)
    _check_fraction("fraction", fraction, upper=1.0)
    return _top_valid(
        scores,
        mask,
        lambda n: max(_fraction_count(fraction, n, round_up=False), 1),
        across_ranks=across_ranks,
    )


def _ppo_clipped(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> Tensor:
    """Tokens where PPO's clipped term wins, L2 > L1, with the unclamped ratio of Clip-Cov."""
    ratio = torch.exp(log_prob.detach() - old_log_prob.detach())
    l1 = -advantages * ratio
    l2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return l2 > l1


def _check_clip_range(clip_low: float, clip_high: float) -> None:
    if not (math.isfinite(clip_low) and 0 <= clip_low <= 1):
        raise SettingError(
            "clip_low", f"must be in [0, 1] (ratio clamped to [1 - clip_low, ...]), got {clip_low}"
        )
    if not (math.isfinite(clip_high) and clip_high >= 0):
        raise SettingError("clip_high", f"must be a finite number >= 0, got {clip_high}")


def _check_bounds(lb: float, ub: float) -> None:
    if not (math.isfinite(lb) and math.isfinite(ub) and lb < ub):
        raise SettingError("lb", f"and ub: need finite lb < ub, got lb={lb}, ub={ub}")


def clip_cov_select(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    ratio: float = 2e-4,
    lb: float = 1.0,
    ub: float = 5.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    generator: torch.Generator | None = None,
    across_ranks: bool = False,
) -> Tensor:
    """Tokens whose Clip-Cov loss term is detached (algorithms.md §4), as a bool mask (B, T).

    Candidates: valid tokens not clipped by PPO (L2 > L1 with `ratio_t = exp(logp - old_logp)`
    unclamped, as in the reference) with `lb < cov < ub` strictly, cov of algorithms.md §3 over the
    scope. Picks `n = max(floor(ratio * N), 1)` of them uniformly at random (all if fewer), N the
    valid tokens in the scope: a prefix of `torch.randperm(#candidates, generator=generator)` over
    the candidates in row-major order. The scope is the tensors passed; with `across_ranks` and
    torch.distributed running it is every rank's tensors (in rank order), and `generator` must be
    seeded identically on all ranks.
    """
    check_same_shape(
        log_prob=log_prob,
        old_log_prob=old_log_prob,
        advantages=advantages,
        response_mask=response_mask,
    )
    mask = check_mask(response_mask)
    _check_fraction("ratio", ratio, upper=1.0)
    _check_clip_range(clip_low, clip_high)
    _check_bounds(lb, ub)
    check_finite("log_prob", log_prob, mask)
    check_finite("old_log_prob", old_log_prob, mask)
    check_finite("advantages", advantages, mask)
    logp, old, adv = (_zero_padding(t, mask) for t in (log_prob, old_log_prob, advantages))

    cov = token_covariance(logp, adv, mask, across_ranks=across_ranks)
    clipped = _ppo_clipped(logp, old, adv, clip_low, clip_high)
    candidates = mask & ~clipped & (cov > lb) & (cov < ub)

    n_valid = mask.sum()
    if across_ranks:
        n_valid = distributed.all_reduce_sum(n_valid)
    n_pick = max(_fraction_count(ratio, int(n_valid), round_up=False), 1)

    flat_cand = candidates.reshape(-1).nonzero().squeeze(1)
    gathered, offset = distributed.all_gather_cat(flat_cand) if across_ranks else (flat_cand, 0)
    device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(gathered.numel(), generator=generator, device=device)
    chosen = perm[: min(n_pick, gathered.numel())].to(mask.device)
    mine = chosen[(chosen >= offset) & (chosen < offset + flat_cand.numel())] - offset
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    out[flat_cand[mine]] = True
    return out.view_as(mask)


def kl_cov_select(
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    ratio: float = 2e-3,
    across_ranks: bool = False,
) -> Tensor:
    """Tokens that get KL-Cov's penalty (algorithms.md §4), as a bool mask (B, T).

    Exactly the top `k = max(floor(ratio * N), 1)` valid tokens by cov (algorithms.md §3), N the
    valid tokens in the scope; ties go to the lowest row-major index; padding is never picked. The
    scope is the tensors passed, or every rank's (in rank order) with `across_ranks` and
    torch.distributed on.
    """
    check_same_shape(log_prob=log_prob, advantages=advantages, response_mask=response_mask)
    mask = check_mask(response_mask)
    _check_fraction("ratio", ratio, upper=1.0)
    check_finite("log_prob", log_prob, mask)
    check_finite("advantages", advantages, mask)
    logp, adv = _zero_padding(log_prob, mask), _zero_padding(advantages, mask)
    cov = token_covariance(logp, adv, mask, across_ranks=across_ranks)
    return top_fraction(cov, mask, ratio, across_ranks=across_ranks)


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
    _check_fraction("rho", rho, upper=1.0)
    check_finite("entropy", entropy, mask)
    return _top_valid(
        entropy, mask, lambda n: _fraction_count(rho, n, round_up=True), across_ranks=across_ranks
    )


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


@dataclass
class PPOSettings:
    clip_low: float = 0.2
    """Lower clip: the ratio is clamped to [1 - clip_low, ...]; in [0, 1]."""
    clip_high: float = 0.2
    """Upper clip: [..., 1 + clip_high]; DAPO's clip-higher is 0.28."""
    clip_ratio_c: float = 3.0
    """Dual clip for negative advantages: the loss is at most -A*clip_ratio_c; > 1."""

    def validate(self) -> None:
        _check_clip_range(self.clip_low, self.clip_high)
        if not (math.isfinite(self.clip_ratio_c) and self.clip_ratio_c > 1):
            raise SettingError(
                "clip_ratio_c", f"(dual clip) must be a finite number > 1, got {self.clip_ratio_c}"
            )


@dataclass
class ClipCovSettings:
    ratio: float = 2e-4
    """Fraction of the valid tokens of the scope detached: n = max(floor(ratio * N), 1)."""
    lb: float = 1.0
    """Candidates have lb < cov < ub (absolute values: they depend on the advantage scale)."""
    ub: float = 5.0
    """Upper bound of the candidates' covariance (see lb)."""
    clip_low: float = 0.2
    """PPO clip range of the loss and of the candidate filter (the authors' runs use 1 and 1)."""
    clip_high: float = 0.2
    """Upper end of that clip range: [1 - clip_low, 1 + clip_high]."""

    def validate(self) -> None:
        _check_fraction("ratio", self.ratio, upper=1.0)
        _check_bounds(self.lb, self.ub)
        _check_clip_range(self.clip_low, self.clip_high)


@dataclass
class KLCovSettings:
    ratio: float = 2e-3
    """Fraction of the valid tokens of the scope penalised: k = max(floor(ratio * N), 1)
    (2e-3 for 7B models, 2e-4 for 32B in the paper)."""
    coef: float = 1.0
    """Weight of |logp - old_logp| on the selected tokens; >= 0."""

    def validate(self) -> None:
        _check_fraction("ratio", self.ratio, upper=1.0)
        if not (math.isfinite(self.coef) and self.coef >= 0):
            raise SettingError("coef", f"must be a finite number >= 0, got {self.coef}")


def _clip_cov_selection(
    log_prob, old_log_prob, advantages, response_mask, s, *, generator, across_ranks
) -> Tensor:
    """Clip-Cov's `Selection`: `clip_cov_select` with the loss's settings."""
    return clip_cov_select(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        ratio=s.ratio,
        lb=s.lb,
        ub=s.ub,
        clip_low=s.clip_low,
        clip_high=s.clip_high,
        generator=generator,
        across_ranks=across_ranks,
    )


def _kl_cov_selection(
    log_prob, old_log_prob, advantages, response_mask, s, *, generator, across_ranks
) -> Tensor:
    """KL-Cov's `Selection`: `kl_cov_select` (deterministic, no generator)."""
    return kl_cov_select(
        log_prob, advantages, response_mask, ratio=s.ratio, across_ranks=across_ranks
    )


def _metrics(mask: Tensor, **per_token: Tensor) -> dict[str, float]:
    """Means over the valid tokens passed (0 when there are none: an empty micro-batch)."""
    n = mask.sum().clamp(min=1)
    values = torch.stack(
        [torch.where(mask, v.detach(), 0).sum().to(torch.float64) / n for v in per_token.values()]
    )
    return dict(zip(per_token, values.tolist(), strict=True))


@register_policy_loss("ppo", settings=PPOSettings)
def ppo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    denominators: LossDenominators | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with dual clip, the GRPO/DAPO policy loss (algorithms.md §4).

        r  = exp(clamp(logp - old_logp, -20, 20))
        L1 = -A*r,   L2 = -A*clamp(r, 1 - clip_low, 1 + clip_high),   L = max(L1, L2)
        L  = min(L, -A*clip_ratio_c)   where A < 0   (dual clip, clip_ratio_c > 1)

    aggregated with `loss_agg_mode` (algorithms.md §5), each token's L times its `weights` when
    given. DAPO's clip-higher is `clip_high=0.28`. Metrics: pg_loss; pg_clipfrac, fraction of
    valid tokens with L2 > L1; pg_clipfrac_lower, fraction with A < 0 and max(L1, L2) > -A*c;
    ppo_kl, mean(old_logp - logp) over valid tokens.
    """
    log_prob, old_log_prob, advantages, mask = _check_loss_inputs(
        log_prob, old_log_prob, advantages, response_mask, loss_agg_mode
    )
    PPOSettings(clip_low, clip_high, clip_ratio_c).validate()
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(torch.clamp(log_ratio, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    l1 = -advantages * ratio
    l2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(l1, l2)
    l3 = -advantages * clip_ratio_c
    negative = advantages < 0
    loss_mat = torch.where(negative, torch.minimum(clipped, l3), clipped)
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode, denominators=denominators, weights=weights)
    metrics = _metrics(
        mask,
        pg_clipfrac=(l2 > l1).to(torch.float64),
        pg_clipfrac_lower=(negative & (clipped > l3)).to(torch.float64),
        ppo_kl=-log_ratio,
    )
    return loss, {"pg_loss": loss.item(), **metrics}


@register_policy_loss("clip_cov", settings=ClipCovSettings, select=_clip_cov_selection)
def clip_cov_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    ratio: float = 2e-4,
    lb: float = 1.0,
    ub: float = 5.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_agg_mode: str = "token-mean",
    generator: torch.Generator | None = None,
    selected: Tensor | None = None,
    denominators: LossDenominators | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clip-Cov policy loss of Cui et al. (algorithms.md §4).

        r = exp(logp - old_logp)   (not clamped, as in the reference)
        L = 0 on the selected tokens (no gradient; they still count in the denominators),
            max(-A*r, -A*clamp(r, 1 - clip_low, 1 + clip_high)) elsewhere;   no dual clip
        times `weights` per token when given

    `selected` is the mask from `clip_cov_select` over the trainer's scope (the whole mini-batch);
    None selects over the tensors passed with `ratio`, `lb`, `ub`, `generator` (the reference
    per-micro-batch behaviour). Metrics, over the tensors passed: pg_loss, pg_clipfrac (L2 > L1),
    pg_clipfrac_lower (0, no dual clip), ppo_kl, clip_cov_frac (fraction of valid tokens detached).
    """
    log_prob, old_log_prob, advantages, mask = _check_loss_inputs(
        log_prob, old_log_prob, advantages, response_mask, loss_agg_mode
    )
    _check_clip_range(clip_low, clip_high)
    if selected is None:
        selected = clip_cov_select(
            log_prob,
            old_log_prob,
            advantages,
            mask,
            ratio=ratio,
            lb=lb,
            ub=ub,
            clip_low=clip_low,
            clip_high=clip_high,
            generator=generator,
        )
    selected = _check_selected(selected, mask)
    log_ratio = log_prob - old_log_prob
    r = torch.exp(log_ratio)
    l1 = -advantages * r
    l2 = -advantages * torch.clamp(r, 1 - clip_low, 1 + clip_high)
    # where (not a product with 0) keeps a selected token's term 0 even if r overflowed to inf.
    loss_mat = torch.where(selected, torch.zeros_like(l1), torch.maximum(l1, l2))
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode, denominators=denominators, weights=weights)
    metrics = _metrics(
        mask,
        pg_clipfrac=(l2 > l1).to(torch.float64),
        ppo_kl=-log_ratio,
        clip_cov_frac=selected.to(torch.float64),
    )
    return loss, {
        "pg_loss": loss.item(),
        "pg_clipfrac": metrics["pg_clipfrac"],
        "pg_clipfrac_lower": 0.0,
        "ppo_kl": metrics["ppo_kl"],
        "clip_cov_frac": metrics["clip_cov_frac"],
    }


@register_policy_loss(
    "kl_cov",
    settings=KLCovSettings,
    select=_kl_cov_selection,
    summed_metrics=("kl_cov_selected",),
    on_policy_note=(
        "KL-Cov with one mini-batch and one epoch is plain policy gradient: on the first update "
        "logp == old_logp, so |logp - old_logp| and its gradient are 0 (algorithms.md §4.3). "
        "Use several mini-batches or epochs."
    ),
)
def kl_cov_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    ratio: float = 2e-3,
    coef: float = 1.0,
    loss_agg_mode: str = "token-mean",
    selected: Tensor | None = None,
    denominators: LossDenominators | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """KL-Cov policy loss of Cui et al. (algorithms.md §4).

        r = exp(logp - old_logp)   (no clipping)
        L = -A*r + coef*|logp - old_logp| on the selected tokens,   -A*r elsewhere
        times `weights` per token when given, the penalty included (as verl)

    `selected` is the mask from `kl_cov_select` over the trainer's scope; None selects the top
    `max(floor(ratio*N), 1)` tokens by cov over the tensors passed (the reference behaviour).
    The penalty and its gradient vanish while logp == old_logp (the first mini-batch of a rollout
    step). Metrics: pg_loss, pg_clipfrac and pg_clipfrac_lower (0, no clipping), ppo_kl;
    kl_cov_abs_diff, mean |logp - old_logp| over all valid tokens (not only the selected ones, as in
    the reference); kl_cov_selected, the number of selected tokens in the tensors passed.
    """
    log_prob, old_log_prob, advantages, mask = _check_loss_inputs(
        log_prob, old_log_prob, advantages, response_mask, loss_agg_mode
    )
    if not (math.isfinite(coef) and coef >= 0):
        raise SettingError("coef", f"must be a finite number >= 0, got {coef}")
    if selected is None:
        selected = kl_cov_select(log_prob, advantages, mask, ratio=ratio)
    selected = _check_selected(selected, mask)
    log_ratio = log_prob - old_log_prob
    pg = -advantages * torch.exp(log_ratio)
    loss_mat = torch.where(selected, pg + coef * log_ratio.abs(), pg)
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode, denominators=denominators, weights=weights)
    metrics = _metrics(mask, ppo_kl=-log_ratio, kl_cov_abs_diff=log_ratio.abs())
    return loss, {
        "pg_loss": loss.item(),
        "pg_clipfrac": 0.0,
        "pg_clipfrac_lower": 0.0,
        **metrics,
        "kl_cov_selected": float(selected.sum().item()),
    }


# --------------------------------------------------------------------------------------------------
# CE-GPPO (algorithms.md §4.8)


@dataclass
class CEGPPOSettings:
    clip_low: float = 0.2
    """PPO's clip range [1 - clip_low, 1 + clip_high]; outside it the bounded gradient applies."""
    clip_high: float = 0.2
    """The upper end of that range, 1 + clip_high."""
    clip_ratio_c: float = 3.0
    """Dual clip for negative advantages, as PPO's; > 1 (the authors' scripts set 10)."""
    beta1: float = 0.75
    """Gradient weight of tokens with A < 0 below 1 - clip_low (the authors' README value)."""
    beta2: float = 1.0
    """Gradient weight of tokens with A > 0 above 1 + clip_high."""

    def validate(self) -> None:
        PPOSettings(self.clip_low, self.clip_high, self.clip_ratio_c).validate()
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SettingError(name, f"must be a finite number >= 0, got {value}")


@register_policy_loss(
    "ce_gppo",
    settings=CEGPPOSettings,
    on_policy_note=(
        "CE-GPPO with one mini-batch and one epoch is PPO: on the first update logp == old_logp, "
        "so no token lies outside the clip range for its bounded gradient (algorithms.md §4.8). "
        "Use several mini-batches or epochs."
    ),
)
def ce_gppo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    beta1: float = 0.75,
    beta2: float = 1.0,
    loss_agg_mode: str = "token-mean",
    denominators: LossDenominators | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """CE-GPPO of Su et al. (algorithms.md §4.8): PPO whose clipped tokens keep a bounded gradient.

        r    = exp(clamp(logp - old_logp, -20, 20)),   s = r / sg(r)   (value 1, gradient of logp)
        low  = A < 0 and r < 1 - clip_low,   high = A > 0 and r > 1 + clip_high
        L    = -beta1 * (1 - clip_low) * s * A    on low
               -beta2 * (1 + clip_high) * s * A   on high
               -r * A                             elsewhere
        L    = min(L, -A*clip_ratio_c)   where A < 0   (dual clip)

    On low and high tokens PPO's value, (1 - clip_low) or (1 + clip_high) times -A, is kept up to
    the factor beta, and the gradient is beta times that value's times grad logp. Aggregated with
    `loss_agg_mode`, each token's L times its `weights` when given. Metrics: pg_loss;
    pg_clipfrac, fraction of valid tokens on low or high (PPO's clip fraction); pg_clipfrac_lower,
    fraction with A < 0 whose loss the dual clip caps; ppo_kl; ce_gppo_low_frac, ce_gppo_high_frac.
    """
    log_prob, old_log_prob, advantages, mask = _check_loss_inputs(
        log_prob, old_log_prob, advantages, response_mask, loss_agg_mode
    )
    CEGPPOSettings(clip_low, clip_high, clip_ratio_c, beta1, beta2).validate()
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(torch.clamp(log_ratio, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    kept_gradient = ratio / ratio.detach()
    low = (advantages < 0) & (ratio < 1 - clip_low)
    high = (advantages > 0) & (ratio > 1 + clip_high)
    unclipped = -advantages * ratio
    loss_mat = torch.where(
        low,
        -beta1 * (1 - clip_low) * kept_gradient * advantages,
        torch.where(high, -beta2 * (1 + clip_high) * kept_gradient * advantages, unclipped),
    )
    l3 = -advantages * clip_ratio_c
    negative = advantages < 0
    capped = negative & (loss_mat > l3)
    loss_mat = torch.where(negative, torch.minimum(loss_mat, l3), loss_mat)
    loss = aggregate_loss(loss_mat, mask, loss_agg_mode, denominators=denominators, weights=weights)
    metrics = _metrics(
        mask,
        pg_clipfrac=(low | high).to(torch.float64),
        pg_clipfrac_lower=capped.to(torch.float64),
        ppo_kl=-log_ratio,
        ce_gppo_low_frac=low.to(torch.float64),
        ce_gppo_high_frac=high.to(torch.float64),
    )
    return loss, {"pg_loss": loss.item(), **metrics}


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
    selected = _check_selected(selected, mask)
    if selected_denominators is None:
        selected_denominators = loss_denominators(selected, across_ranks=False, allow_empty=True)
    if selected_denominators is None:  # S is empty over the whole scope
        term = ppo.new_zeros(())
    else:
        log_ratio = _zero_padding(log_prob, mask) - _zero_padding(old_log_prob, mask)
        ratio = torch.exp(torch.clamp(log_ratio, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
        term = aggregate_loss(
            -ratio * _zero_padding(advantages, mask).abs(),
            selected,
            loss_agg_mode,
            denominators=selected_denominators,
        )
    loss = ppo + alpha * term
    metrics |= _metrics(mask, entropic_high_prob_frac=selected.to(torch.float64))
    return loss, {**metrics, "pg_loss": loss.item(), "entropic_term": term.item()}


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
