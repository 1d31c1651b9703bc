"""Clip-Cov, KL-Cov and the covariance diagnostics inside TRL's `GRPOTrainer` (docs/trl.md).

    from entroprl.integrations.trl import CovGRPOConfig, CovGRPOTrainer
    args = CovGRPOConfig(..., loss_type="kl_cov", steps_per_generation=4)
    trainer = CovGRPOTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)

Both loss types run on TRL's own loss code. `cov_base_loss_type` (one of TRL's "grpo", "bnpo",
"dr_grpo", "dapo") gives the aggregation; on top of it:

- clip_cov: the selected tokens get advantage 0, which zeroes their loss term and its gradient and
  leaves them in every denominator: Clip-Cov's detached token (algorithms.md §4), with TRL's clipped
  surrogate, importance-sampling correction, masks, KL and entropy terms untouched.
- kl_cov: TRL's surrogate with the clip range set to infinity (KL-Cov clips nothing), plus
  `kl_cov_coef * |logp - old_logp|` on the selected tokens, weighted by the masks and importance
  ratios TRL applies to its own per-token loss and aggregated as the base loss type aggregates.

Selection scope. The tokens are selected over all the gradient-accumulation micro-batches of an
optimizer step on every data-parallel rank, from a no-grad forward of the current policy over them
when the step starts (parameters do not change within a step, so these are the log-probs of the
training forwards). TRL generates a generation batch lazily, in the micro-batch that first needs
it: when an optimizer step spans several generation batches (`steps_per_generation *
num_iterations` not a multiple of `gradient_accumulation_steps`), each generation batch's
micro-batches of the step form one scope. With TRL's default `steps_per_generation =
gradient_accumulation_steps` the scope is always the whole step. A step has the micro-batches the
training loop accumulates for it: `current_gradient_accumulation_steps`, fewer than
`gradient_accumulation_steps` in an epoch's last step when the epoch does not divide evenly.

Diagnostics, per optimizer step over the same micro-batches and ranks, from the training forwards'
log-probs and entropies (at TRL's sampling temperature, like its `entropy`): `cov/all`,
`cov/top_0.02%` ... `cov/top_50%`, `dynamics/predicted_entropy_change` (-cov/all) and
`entropy_seq_mean` (the paper's H, next to TRL's token-weighted `entropy`); per micro-batch,
`clip_cov_frac` or `kl_cov_frac` (fraction of loss tokens selected) and `kl_cov_abs_diff`. They go
through TRL's `_metrics`, so they reach `trainer_state.json` and every `report_to` logger.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from entroprl.algos import dynamics, losses
from entroprl.algos.advantages import PassKSettings, QAESettings, passk_advantages, qae_advantages
from entroprl.algos.checks import check_choice
from entroprl.algos.entropy import batch_entropy
from entroprl.train import distributed, seeds

COV_LOSS_TYPES = ("clip_cov", "kl_cov")
ENTROPRL_LOSS_TYPES = (*COV_LOSS_TYPES, "ce_gppo")
"""The loss types this trainer adds, each on top of `cov_base_loss_type`'s TRL loss."""
ADVANTAGE_ESTIMATORS = ("grpo", "qae", "passk")
"""`advantage_estimator`: TRL's own advantages, or entroprl's from the same rewards."""
# TRL's loss types built on the clipped token-level surrogate, whose aggregation the new types take
BASE_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# The model inputs beside the token ids that TRL's `_compute_loss` passes to its forward
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


logger = logging.getLogger(__name__)


@dataclass
class CovGRPOConfig(GRPOConfig):
    """TRL's `GRPOConfig` with entroprl's settings; `loss_type` also takes clip_cov and kl_cov."""

    clip_cov_ratio: float = field(
        default=losses.ClipCovSettings.ratio,
        metadata={
            "help": "Clip-Cov: fraction of an optimizer step's loss tokens whose gradient is "
            "detached, drawn among the unclipped tokens with clip_cov_lb < cov < clip_cov_ub. "
            "0 switches Clip-Cov off (the base loss type remains)."
        },
    )
    clip_cov_lb: float = field(
        default=losses.ClipCovSettings.lb,
        metadata={"help": "Clip-Cov: lower bound on a token's covariance."},
    )
    clip_cov_ub: float = field(
        default=losses.ClipCovSettings.ub,
        metadata={"help": "Clip-Cov: upper bound on a token's covariance."},
    )
    kl_cov_ratio: float = field(
        default=losses.KLCovSettings.ratio,
        metadata={
            "help": "KL-Cov: fraction of an optimizer step's loss tokens, those of largest "
            "covariance, that get the |logp - old_logp| penalty. 0 switches the penalty off."
        },
    )
    kl_cov_coef: float = field(
        default=losses.KLCovSettings.coef,
        metadata={"help": "KL-Cov: coefficient of the |logp - old_logp| penalty."},
    )
    cov_base_loss_type: str = field(
        default="dapo",
        metadata={
            "help": "The TRL loss type whose aggregation clip_cov and kl_cov use: 'grpo', "
            "'bnpo', 'dr_grpo' or 'dapo' (TRL's default)."
        },
    )
    ce_gppo_beta1: float = field(
        default=losses.CEGPPOSettings.beta1,
        metadata={
            "help": "CE-GPPO: gradient weight of tokens with a negative advantage below "
            "1 - epsilon (TRL's clip gives them none)."
        },
    )
    ce_gppo_beta2: float = field(
        default=losses.CEGPPOSettings.beta2,
        metadata={
            "help": "CE-GPPO: gradient weight of tokens with a positive advantage above "
            "1 + epsilon_high."
        },
    )
    advantage_estimator: str = field(
        default="grpo",
        metadata={
            "help": "'grpo': TRL's advantages; 'qae' (quantile baseline) or 'passk' (pass@k "
            "training): entroprl's, from the same summed rewards, per group of num_generations."
        },
    )
    qae_quantile: float = field(
        default=QAESettings.quantile, metadata={"help": "QAE: K, the baseline's group quantile."}
    )
    pass_k: int = field(
        default=PassKSettings.k, metadata={"help": "Pass@k training: k <= num_generations."}
    )
    cov_diagnostics: bool = field(
        default=True,
        metadata={
            "help": "Log cov/*, dynamics/predicted_entropy_change and entropy_seq_mean once per "
            "optimizer step (any loss type)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_choice("cov_base_loss_type", self.cov_base_loss_type, BASE_LOSS_TYPES)
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not (math.isfinite(self.clip_cov_lb) and math.isfinite(self.clip_cov_ub)):
            raise ValueError("clip_cov_lb and clip_cov_ub must be finite")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(
                f"need clip_cov_lb < clip_cov_ub, got {self.clip_cov_lb}, {self.clip_cov_ub}"
            )
        if not (math.isfinite(self.kl_cov_coef) and self.kl_cov_coef >= 0):
            raise ValueError(f"kl_cov_coef must be a finite number >= 0, got {self.kl_cov_coef}")
        check_choice("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        losses.CEGPPOSettings(beta1=self.ce_gppo_beta1, beta2=self.ce_gppo_beta2).validate()
        QAESettings(quantile=self.qae_quantile).validate()
        PassKSettings(k=self.pass_k).validate()
        if (
            self.advantage_estimator != "grpo"
            and self.multi_objective_aggregation != "sum_then_normalize"
        ):
            raise ValueError(
                f"advantage_estimator={self.advantage_estimator!r} reads the summed rewards: it "
                "needs multi_objective_aggregation='sum_then_normalize'"
            )
        if self.loss_type in ENTROPRL_LOSS_TYPES and self.importance_sampling_level != "token":
            raise ValueError(
                f"loss_type={self.loss_type!r} selects tokens: it needs "
                f"importance_sampling_level='token', got {self.importance_sampling_level!r}"
            )


def on_policy_kl_cov(args: CovGRPOConfig) -> bool:
    """Whether KL-Cov is asked for where it cannot act: every optimizer step the first on its
    generation batch (steps_per_generation * num_iterations divides the accumulation)."""
    generate_every = args.steps_per_generation * args.num_iterations
    return (
        args.loss_type == "kl_cov"
        and args.kl_cov_ratio > 0
        and args.gradient_accumulation_steps % generate_every == 0
    )


def loss_mask(inputs: dict[str, Any]) -> Tensor:
    """The tokens of TRL's loss: the completion, less tool outputs."""
    mask = inputs["completion_mask"]
    return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask


def _old_logps(inputs: dict[str, Any], logps: Tensor) -> Tensor:
    """TRL's old log-probs, or the training forward's, detached, when it skipped them
    (on-policy)."""
    old = inputs.get("old_per_token_logps")
    return logps.detach() if old is None else old


def token_advantages(inputs: dict[str, Any]) -> Tensor:
    """TRL's advantages, one per sequence (or already per token), as (B, T)."""
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages.expand(inputs["completion_ids"].shape)


class CovGRPOTrainer(GRPOTrainer):
    """TRL's `GRPOTrainer` with entroprl's Clip-Cov and KL-Cov loss types and covariance
    diagnostics; constructed like it, with a `CovGRPOConfig`."""

    def __init__(self, model, reward_funcs=None, args: CovGRPOConfig | None = None, **kwargs):
        if not isinstance(args, CovGRPOConfig):
            raise TypeError(
                f"CovGRPOTrainer needs args=CovGRPOConfig(...), got {type(args).__name__}"
            )
        if on_policy_kl_cov(args):
            # one line at start-up (a warning's traceback-style two lines get lost in TRL's log)
            logger.warning(
                "loss_type='kl_cov' is plain policy gradient here: every optimizer step is the "
                "first on its generation batch, where logp == old_logp and the |logp - old_logp| "
                "penalty is 0; set steps_per_generation to a multiple of "
                "gradient_accumulation_steps (e.g. 4x, as the paper's 8 mini-batches per "
                "rollout) or num_iterations >= 2"
            )
        self._selected: dict[int, Tensor] = {}  # step -> its micro-batch's selection
        self._window_end = 0  # the first step after the current accumulation window
        self._capture = False
        self._forward: tuple[Tensor, Tensor | None, Tensor | None] | None = None
        self._window: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        super().__init__(model, reward_funcs, args, **kwargs)

    # -- the loss ------------------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._capture:  # the training forward of `_compute_loss`
            self._forward = out
        return out

    @contextlib.contextmanager
    def _base_loss(self) -> Iterator[None]:
        """TRL's `_compute_loss` as the base loss type, capturing its forward's outputs."""
        saved = self.loss_type, self.epsilon_low, self.epsilon_high
        if self.loss_type in ENTROPRL_LOSS_TYPES:
            self.loss_type = self.args.cov_base_loss_type
        if saved[0] == "kl_cov":
            # KL-Cov clips no ratio (Cui et al.): the clipped surrogate with an infinite range
            self.epsilon_low = self.epsilon_high = math.inf
        self._capture = True
        try:
            yield
        finally:
            self.loss_type, self.epsilon_low, self.epsilon_high = saved
            self._capture = False

    def _compute_loss(self, model, inputs):
        train = self.model.training
        ratio = {"clip_cov": self.args.clip_cov_ratio, "kl_cov": self.args.kl_cov_ratio}
        selected = None
        if train and ratio.get(self.loss_type, 0) > 0:
            selected = self._step_selection(model)
        base_inputs = inputs
        if self.loss_type == "clip_cov" and selected is not None:
            # An advantage of 0 zeroes a token's loss term and its gradient and keeps the token in
            # every denominator: Clip-Cov's detached token, through TRL's own loss code.
            advantages = torch.where(selected, 0.0, token_advantages(inputs))
            base_inputs = {**inputs, "advantages": advantages}
        with self._base_loss():
            loss = super()._compute_loss(model, base_inputs)
        (logps, entropies, _), self._forward = self._forward, None
        mask = loss_mask(inputs)
        if selected is not None:
            penalty_sum = 0.0
            if self.loss_type == "kl_cov":
                penalty, penalty_sum = self._kl_cov_penalty(inputs, logps, entropies, selected)
                loss = loss + penalty
            self._log_selection(selected, mask, penalty_sum)
        if self.loss_type == "ce_gppo":
            correction, low, high = self._ce_gppo_correction(inputs, logps, entropies)
            loss = loss + correction
            self._log_fractions(mask, ce_gppo_low_frac=low, ce_gppo_high_frac=high)
        if train and self.args.cov_diagnostics:
            self._collect_diagnostics(logps, entropies, mask, token_advantages(inputs))
        return loss

    def _kl_cov_penalty(
        self, inputs: dict[str, Any], logps: Tensor, entropies: Tensor, selected: Tensor
    ) -> tuple[Tensor, Tensor]:
        """KL-Cov's `coef * |logp - old_logp|` on the selected tokens, weighted and aggregated as
        TRL weights and aggregates its own per-token loss; and the sum of |logp - old_logp| over
        the loss tokens (for the kl_cov_abs_diff metric)."""
        mask = loss_mask(inputs)
        abs_diff = (logps - _old_logps(inputs, logps)).abs()
        per_token = torch.where(selected, self.args.kl_cov_coef * abs_diff, 0.0)
        penalty = self._as_trl_token_loss(per_token, inputs, logps, entropies)
        return penalty, torch.where(mask.bool(), abs_diff.detach(), 0.0).sum()

    def _ce_gppo_correction(
        self, inputs: dict[str, Any], logps: Tensor, entropies: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """What turns TRL's clipped surrogate into CE-GPPO (algorithms.md §4.8): on a token TRL
        clips, its loss is the constant -bound * A; CE-GPPO's is -beta * bound * A * r / sg(r).
        Their difference, weighted and aggregated as TRL's own per-token loss; and the low and
        high masks (for the metrics)."""
        advantages = token_advantages(inputs)
        ratio = torch.exp(logps - _old_logps(inputs, logps))
        kept = ratio / ratio.detach()  # value 1, gradient of logp
        lower, upper = 1 - self.epsilon_low, 1 + self.epsilon_high
        low = (advantages < 0) & (ratio < lower)
        high = (advantages > 0) & (ratio > upper)
        a = self.args
        per_token = torch.where(
            low,
            -lower * advantages * (a.ce_gppo_beta1 * kept - 1),
            torch.where(high, -upper * advantages * (a.ce_gppo_beta2 * kept - 1), 0.0),
        )
        return self._as_trl_token_loss(per_token, inputs, logps, entropies), low, high

    def _as_trl_token_loss(
        self, per_token: Tensor, inputs: dict[str, Any], logps: Tensor, entropies: Tensor
    ) -> Tensor:
        """A per-token loss beside TRL's, weighted by the masks and importance ratios TRL applies
        to its own per-token loss and aggregated as `cov_base_loss_type` aggregates."""
        mask = loss_mask(inputs)
        old = _old_logps(inputs, logps)
        if self.off_policy_mask_threshold is not None:
            per_token = per_token * self.get_off_policy_mask(
                advantages=token_advantages(inputs)[:, :1],
                per_token_logps=logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
        if self.top_entropy_quantile < 1.0:
            per_token = per_token * self.get_high_entropy_mask(
                entropies, mask, 1 - self.top_entropy_quantile
            )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token = per_token * inputs["importance_sampling_ratio"]
        mode, denominators = self._base_aggregation(inputs)
        return losses.aggregate_loss(per_token, mask, mode, denominators=denominators)

    def _base_aggregation(self, inputs: dict[str, Any]) -> tuple[str, losses.LossDenominators]:
        """entroprl's aggregation that equals TRL's for `cov_base_loss_type` on this micro-batch
        (TRL 1.16 `_compute_loss`; training mode, where the loss is scaled for accumulation)."""
        mask = loss_mask(inputs)
        rows, tokens = mask.shape[0], max(int(mask.sum()), 1)
        steps = self.current_gradient_accumulation_steps
        base = self.args.cov_base_loss_type
        if base == "grpo":  # mean over rows of each row's token mean
            return "seq-mean-token-mean", losses.LossDenominators(tokens, rows * steps)
        if base == "bnpo":  # this micro-batch's token mean
            return "token-mean", losses.LossDenominators(tokens * steps, rows)
        if base == "dr_grpo":  # token sum over rows * max_completion_length
            constant = rows * self.max_completion_length * steps
        else:  # dapo: token sum over the tokens of the step on all ranks
            items = float(inputs["num_items_in_batch"].clamp(min=1.0))
            procs, per_gen = self.accelerator.num_processes, self.args.steps_per_generation
            constant = items / procs * steps / per_gen
        return "seq-mean-token-sum-norm", losses.LossDenominators(tokens, rows, constant)

    # -- selection -----------------------------------------------------------------------------

    def _step_selection(self, model) -> Tensor:
        """This micro-batch's selected tokens, selecting over its scope when it opens one: the
        rest of its accumulation window within its generation batch. A window is the
        `current_gradient_accumulation_steps` micro-batches from the one that opens it, as the
        training loop counts them: the last window of an epoch can be shorter than
        `gradient_accumulation_steps`, and the next epoch opens a new one."""
        step = self._step
        if step >= self._window_end:
            self._window_end = step + self.current_gradient_accumulation_steps
        if step not in self._selected:
            period = self.args.steps_per_generation * self.num_iterations
            self._select(model, range(step, min(self._window_end, step - step % period + period)))
        return self._selected.pop(step)

    def _select(self, model, steps: range) -> None:
        """Select over the micro-batches of `steps` (all already generated) on every rank."""
        per_generation = self.args.steps_per_generation
        parts = [self._buffered_inputs[t % per_generation] for t in steps]
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
        ):
            logps = [self._policy_logps(model, part) for part in parts]
        selected = self.select_tokens(
            torch.cat(logps),
            torch.cat(
                [
                    logp if part.get("old_per_token_logps") is None else part["old_per_token_logps"]
                    for logp, part in zip(logps, parts, strict=True)
                ]
            ),
            torch.cat([token_advantages(part) for part in parts]),
            torch.cat([loss_mask(part) for part in parts]),
            first_step=steps[0],
        )
        sizes = [logp.shape[0] for logp in logps]
        self._selected.update(zip(steps, selected.split(sizes), strict=True))

    def select_tokens(
        self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, first_step: int
    ) -> Tensor:
        """`losses.clip_cov_select` or `losses.kl_cov_select` over these tensors on every rank,
        with this trainer's settings; nothing when no rank has a loss token."""
        if distributed.all_reduce_sum(mask.sum()).item() == 0:
            return torch.zeros_like(mask, dtype=torch.bool)
        a = self.args
        if self.loss_type == "kl_cov":
            return losses.kl_cov_select(
                logp, advantages, mask, ratio=a.kl_cov_ratio, across_ranks=True
            )
        # one seed per scope, the same on every rank, as the global selection needs
        generator = torch.Generator().manual_seed(seeds.derive("update", a.seed, first_step))
        settings = losses.ClipCovSettings(
            ratio=a.clip_cov_ratio,
            lb=a.clip_cov_lb,
            ub=a.clip_cov_ub,
            clip_low=self.epsilon_low,
            clip_high=self.epsilon_high,
        )
        return losses.get_policy_loss("clip_cov").select(
            logp, old_logp, advantages, mask, settings, generator=generator, across_ranks=True
        )

    def _policy_logps(self, model, inputs: dict[str, Any]) -> Tensor:
        """Log-probs of the completion tokens under the current policy, as `_compute_loss`'s
        forward computes them."""
        completion_ids = inputs["completion_ids"]
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            completion_ids.size(1),
            **{key: inputs.get(key) for key in _FORWARD_KEYS},
        )
        return logps

    # -- metrics -------------------------------------------------------------------------------

    def _log_selection(self, selected: Tensor, mask: Tensor, abs_diff_sum: Tensor | float) -> None:
        counts = torch.stack(
            [
                selected.sum().to(torch.float64),
                mask.sum().to(torch.float64),
                torch.as_tensor(abs_diff_sum, dtype=torch.float64, device=mask.device),
            ]
        )
        n_selected, n_tokens, abs_diff = distributed.all_reduce_sum(counts).tolist()
        n_tokens = max(n_tokens, 1.0)
        metrics = self._metrics["train"]
        metrics[f"{self.loss_type}_frac"].append(n_selected / n_tokens)
        if self.loss_type == "kl_cov":
            metrics["kl_cov_abs_diff"].append(abs_diff / n_tokens)

    def _log_fractions(self, mask: Tensor, **flags: Tensor) -> None:
        """Log each (B, T) bool flag's fraction of the loss tokens, over every rank."""
        counts = torch.stack(
            [mask.sum().to(torch.float64)]
            + [(flag & mask.bool()).sum().to(torch.float64) for flag in flags.values()]
        )
        n_tokens, *n_flagged = distributed.all_reduce_sum(counts).tolist()
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name, count in zip(flags, n_flagged, strict=True):
            metrics[name].append(count / max(n_tokens, 1.0))

    # -- advantages ----------------------------------------------------------------------------

    def _calculate_rewards(self, *args, **kwargs):
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        self._rewards_per_func = rewards_per_func  # every process's, as TRL gathers them
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.args.advantage_estimator != "grpo":
            output["advantages"] = self.entroprl_advantages(output["advantages"].shape[0])
        return output

    def entroprl_advantages(self, local_rows: int) -> Tensor:
        """This process's advantages from `advantage_estimator` (QAE or pass@k, algorithms.md
        §6.8, §6.9), computed from the summed weighted rewards TRL just gathered from every
        process, each run of `num_generations` completions one group (TRL's layout)."""
        per_func = self._rewards_per_func
        rewards = (per_func * self.reward_weights.to(per_func)).nansum(dim=1)
        train = self.model.training
        size = self.num_generations if train else self.num_generations_eval
        groups = torch.arange(rewards.shape[0], device=rewards.device) // size
        a = self.args
        if a.advantage_estimator == "qae":
            values = qae_advantages(rewards, groups, quantile=a.qae_quantile)
        else:
            values = passk_advantages(rewards, groups, k=a.pass_k)
        start = self.accelerator.process_index * local_rows
        return values[start : start + local_rows]

    def _collect_diagnostics(
        self, logps: Tensor, entropies: Tensor, mask: Tensor, advantages: Tensor
    ) -> None:
        """Keep this micro-batch; at the optimizer step's last one, log the step's covariance
        groups, predicted entropy change and sequence-mean entropy over every rank."""
        self._window.append((logps.detach(), entropies.detach(), mask, advantages.detach()))
        if not self.accelerator.sync_gradients:
            return
        window, self._window = self._window, []
        # micro-batches from different generation batches can be padded to different lengths
        length = max(part[0].shape[1] for part in window)
        logp, entropy, m, adv = (
            torch.cat([F.pad(part[i], (0, length - part[i].shape[1])) for part in window])
            for i in range(4)
        )
        if distributed.all_reduce_sum(m.sum()).item() == 0:
            return
        cov = dynamics.token_covariance(logp, adv, m, across_ranks=True)
        summary = dynamics.covariance_summary(cov, m, across_ranks=True)
        metrics = self._metrics["train"]
        for group, value in summary.items():
            metrics[f"cov/{group}"].append(value)
        metrics["dynamics/predicted_entropy_change"].append(-summary["all"])
        metrics["entropy_seq_mean"].append(batch_entropy(entropy, m)["seq_mean_token_mean"])
