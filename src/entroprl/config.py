"""The typed run configuration: one object, loaded from YAML, overridden by `key=value` arguments.

Every field is validated where it enters; an unknown or ill-typed key is rejected with its dotted
name, so a typo never silently runs the default.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
import reprlib
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from entroprl.algos import advantages, losses, mismatch
from entroprl.errors import ConfigError, SettingError
from entroprl.tasks import math_problems
from entroprl.tasks.data import DataConfig
from entroprl.tasks.registry import TASKS
from entroprl.train.schedule import SCHEDULES

DTYPES = ("float32", "bfloat16", "float16")
TEMPERATURES = (1e-2, 1e2)
"""The sampling temperatures accepted (and 0, greedy, for evaluation): beyond them logits /
temperature is an overflow or a uniform draw, never a sensible run."""
DEVICE = re.compile(r"auto|(cpu|cuda|mps|xpu)(:\d+)?")
STRATEGIES = ("ddp", "fsdp")
"""How the policy is laid out over ranks (`entroprl.train.parallel`): replicated or sharded."""
BACKENDS = ("hf", "vllm")
"""Rollout engines (`entroprl.rollout.backend.make_backend`)."""
COV_SCOPES = ("minibatch", "micro")
COV_LOGPS = ("exact", "old")
DYNAMIC_SAMPLING_METRICS = ("score", "reward")
MOVED_KEYS = {
    f"algorithm.{old}": f"algorithm.loss.{new}"
    for old, new in {
        "clip_low": "<ppo|clip_cov>.clip_low",
        "clip_high": "<ppo|clip_cov>.clip_high",
        "clip_ratio_c": "ppo.clip_ratio_c",
        "clip_cov_ratio": "clip_cov.ratio",
        "clip_cov_lb": "clip_cov.lb",
        "clip_cov_ub": "clip_cov.ub",
        "kl_cov_ratio": "kl_cov.ratio",
        "kl_cov_coef": "kl_cov.coef",
    }.items()
} | {
    "trainer.measure_entropy_change": "trainer.entropy_change_every (0: never)",
    "trainer.tensorboard": "trainer.report_to (a list; [tensorboard] by default, [] for none)",
    "trainer.wandb": "trainer.report_to=[tensorboard,wandb]",
    "trainer.wandb_project": "trainer.project",
}
"""Keys of earlier versions, named in the error that rejects them."""
SEED_RANGE = (0, 2**32 - 1)
"""Accepted `trainer.seed`s: the trainer derives its generators' seeds from it by multiplying by up
to 15,485,863 and adding the step, which stays inside torch's 64-bit seed range for these."""
MAX_YAML_VALUES = 100_000
"""Most values a configuration may hold once its YAML aliases are expanded: a real one holds a few
hundred, and an "alias bomb" of a few hundred bytes expands to billions (then takes minutes and
all the memory to build or to print)."""
MAX_OVERRIDE_CHARS = 10_000
"""Longest `key=value` override accepted (a path is at most 4,096 bytes on Linux)."""
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
FREE_ON_RESUME = frozenset(
    {
        # how long, and what is measured, logged and kept
        "trainer.steps",
        "trainer.eval_every",
        "trainer.save_every",
        "trainer.keep_checkpoints",
        "trainer.rollout_samples",
        "trainer.entropy_change_every",
        "trainer.max_nonfinite_updates",
        "trainer.report_to",
        "trainer.project",
        "trainer.progress",
        "trainer.peak_tflops",
        "trainer.out_dir",
        # where and how it runs, the same updates (to float rounding) either way
        "trainer.device",
        "trainer.strategy",
        "model.gradient_checkpointing",
        "model.fused_head",
        "model.compile",
        "optim.micro_batch_size",
        "optim.log_prob_micro_batch_size",
        "optim.micro_batch_tokens",
        "optim.log_prob_micro_batch_tokens",
        "optim.shared_prefix",
        "rollout.generation_batch_size",
        "rollout.static_cache",
        "rollout.gpu_memory_utilization",
        "rollout.enforce_eager",
    }
)
"""The keys a resumed run may change freely (`resume_changes`): none changes what the run
computes. Any other change (the model, the data, the batch sizes, the seed, the algorithm, the
optimizer, the dtypes, the evaluation's samples) makes the steps after the checkpoint those of
another run, so `entroprl train --resume` refuses it unless told otherwise; `trainer.steps` too
when a learning-rate schedule depends on it."""


@dataclass
class ModelConfig:
    path: str | None = None
    """A Hugging Face model: a local directory or a hub id (`Qwen/Qwen2.5-0.5B`, resolved through
    huggingface_hub's cache; HF_HUB_OFFLINE=1 keeps it to the cache); None builds the demo's
    warm-started tiny model."""
    dtype: str = "float32"
    """Dtype of the trained weights, their gradients and the AdamW state."""
    compute_dtype: str | None = None
    """Mixed precision: the training forwards and backward in this dtype (`bfloat16`) while the
    weights, their gradients and AdamW stay in `dtype` (`entroprl.train.precision`): FSDP's gathered
    weights under trainer.strategy=fsdp, else (one process only) a bfloat16 copy of the model.
    The HF backend samples from that copy on a GPU and in `dtype` on the CPU; vLLM samples in
    this dtype. Refused on a CPU without native bfloat16, where it is many times slower (speeds:
    docs/benchmarks.md)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them
    (transformers' non-reentrant checkpointing): less memory for about a third more compute.
    Not with optim.shared_prefix."""
    compile: bool = False
    """`torch.compile` each decoder layer for the training forwards, their backward and the no-grad
    log-prob passes (`entroprl.train.compiled`); sampling runs them eagerly. The first steps pay
    the compilation (tens of seconds). With trainer.strategy=fsdp each sharded layer is compiled,
    FSDP's gathers running outside the compiled code, as torchtitan does."""
    fused_head: bool = False
    """Compute the training forwards' and no-grad passes' log-probs and entropies from the last
    hidden states through the output layer in chunks (`forward.fuse_head`, verl's
    `use_fused_kernels`): no (B, R, vocabulary) logits in the model's dtype, nor their gradient,
    for one more output-layer product per chunk in the backward (memory: docs/benchmarks.md).
    Refused for a model that transforms its logits after the output layer (soft-capping,
    scaling)."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank instead of the weights (`entroprl.train.lora`, needs
    `entroprl[lora]`); 0: full training. One process, DDP or FSDP (the adapters sharded with
    their layers); the vLLM backend samples from the merged weights."""
    lora_alpha: float = 16.0
    """LoRA's scale: the adapters' update is multiplied by lora_alpha / lora_rank."""
    lora_target_modules: str = "all-linear"
    """The modules that get adapters: `all-linear` or comma-separated names (`q_proj,v_proj`)."""

    def validate(self) -> None:
        _need(self.dtype in DTYPES, "model.dtype", " or ".join(DTYPES))
        _need(
            self.compute_dtype in (None, *DTYPES),
            "model.compute_dtype",
            f"{' or '.join(DTYPES)} (or null for model.dtype)",
        )
        _need(self.lora_rank >= 0, "model.lora_rank", "must be >= 0 (0: no LoRA)")
        _need(self.lora_alpha > 0, "model.lora_alpha", "must be > 0")


@dataclass
class RolloutConfig:
    backend: str = "hf"
    """What samples the rollouts: `hf`, the training model itself through
    `entroprl.rollout.sampler`, or `vllm`, a vLLM engine synced with the policy before each
    rollout."""
    prompts_per_step: int = 16
    """Prompts sampled per step, over all ranks (divisible by the number of ranks)."""
    n: int = 8
    """Responses per prompt: the group size G."""
    temperature: float = 1.0
    """Sampling temperature; the old log-probs and the ratio use the same temperature, the
    logged entropy is at temperature 1 (algorithms.md §1.4)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability exceeds top_p (1: the
    whole distribution)."""
    max_new_tokens: int = 16
    """Longest response, in tokens; a response stops earlier at the tokenizer's EOS."""
    generation_batch_size: int = 256
    """HF backend: sequences sampled together (the prompts' groups split into chunks of at most
    this many rows). On a GPU one chunk of the whole batch is fastest where memory allows: each
    decoding step costs about the same for few rows as for many."""
    static_cache: bool | None = None
    """HF backend: decode every row to the end in a cache of fixed shape, each step's forward
    replayed as a CUDA graph (`entroprl.rollout.sampler`). None: on a GPU (for a model that is not
    sharded over ranks); false: never (finished rows leave the batch instead, the CPU's
    default); true: also on the CPU, where no graph is captured. The same tokens either way."""
    gpu_memory_utilization: float = 0.5
    """vLLM: the fraction of each GPU its engine takes (weights and KV cache); the rest is left
    for training. On vLLM's CPU backend: the fraction of the machine's memory given to its KV
    cache, whatever the training process already holds (0.05 to 0.1 is plenty for a small
    model)."""
    enforce_eager: bool = False
    """vLLM: run the model eagerly, without torch.compile and CUDA graphs (verl's
    ``rollout.enforce_eager``): a faster engine start, slower sampling on GPUs."""

    def validate(self) -> None:
        low, high = TEMPERATURES
        _need(self.backend in BACKENDS, "rollout.backend", " or ".join(BACKENDS))
        _need(0 < self.gpu_memory_utilization < 1, "rollout.gpu_memory_utilization", "in (0, 1)")
        _need(self.n >= 1, "rollout.n", "must be >= 1")
        _need(self.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
        _need(self.generation_batch_size >= 1, "rollout.generation_batch_size", "must be >= 1")
        _need(low <= self.temperature <= high, "rollout.temperature", f"must be in [{low}, {high}]")
        _need(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _need(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")


@dataclass
class AlgorithmConfig:
    plugins: list[str] = field(default_factory=list)
    """Python modules imported before the rest of the configuration is read: they register policy
    losses (`entroprl.algos.losses.register_policy_loss`) or advantage estimators under new names.
    Each must be importable (installed, or on PYTHONPATH)."""
    advantage: str = "grpo"
    """A registered advantage estimator (`entroprl.algos.advantages.ADVANTAGE_ESTIMATORS`,
    algorithms.md §6): grpo, dr_grpo, rloo, reinforce_pp_baseline, qae, passk, or a plug-in's."""
    advantage_settings: dict[str, Any] = field(default_factory=dict)
    """Each estimator's own settings, `advantage_settings.<name>.<setting>` (e.g.
    `advantage_settings.qae.quantile`); those of `advantage` not given take their defaults."""
    policy_loss: str = "ppo"
    """A registered policy loss (`entroprl.algos.losses.POLICY_LOSSES`): ppo, clip_cov, kl_cov,
    ce_gppo, entropic, or a plug-in's."""
    loss: dict[str, Any] = field(default_factory=dict)
    """Each loss's own settings, `loss.<name>.<setting>` (e.g. `loss.clip_cov.ratio`); the
    settings of `policy_loss` not given here take their defaults (`losses.PPOSettings`,
    `ClipCovSettings`, `KLCovSettings`, `CEGPPOSettings`, `EntroPICSettings`)."""
    loss_agg_mode: str = "token-mean"
    """How token losses become one loss (algorithms.md §5.1): `token-mean`, `seq-mean-token-
    mean`, `seq-mean-token-sum`, `seq-mean-token-sum-norm` (verl's names)."""
    cov_scope: str = "minibatch"
    """Scope of a loss's token selection (Clip-Cov, KL-Cov): `minibatch`, the whole optimizer
    mini-batch on all ranks (algorithms.md §3.3); `micro`, per micro-batch per rank, the
    reference."""
    cov_logp: str = "exact"
    """`exact`: select with current log-probs from a no-grad forward over the mini-batch first;
    `old`: select with the rollout-time log-probs (no extra forward; exact on the first
    mini-batch of a step only)."""
    entropy_coef: float = 0.0
    """Entropy bonus: `- entropy_coef * H` added to the loss (algorithms.md §4.4); 0: off. With
    entropy_target, the controller's starting value."""
    entropy_target: float | None = None
    """Set to switch the entropy bonus to the adaptive controller aiming at this entropy."""
    entropy_coef_delta: float = 1e-4
    """Adaptive entropy bonus: the step by which the coefficient moves each step towards
    entropy_target."""
    entropy_coef_min: float = 0.0
    """Adaptive entropy bonus: the lowest coefficient."""
    entropy_coef_max: float = 1e-2
    """Adaptive entropy bonus: the highest coefficient."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the initial policy (a frozen reference model; algorithms.md
    §4.5); 0: no reference model."""
    kl_estimator: str = "k3"
    """Estimator of that KL per token: `k1`, `k2`, `k3` (`low_var_kl`, its clamped form as verl
    computes it)."""
    high_entropy_rho: float | None = None
    dynamic_sampling: bool = False
    """DAPO: groups whose scores are all equal leave the loss (algorithms.md §6)."""
    dynamic_sampling_metric: str = "score"
    """What must differ within a group for it to stay: `score`, the verifier's (DAPO's
    filter_groups.metric=acc), or `reward`, the score with the overlong penalty added (with which
    an all-wrong group of different lengths stays)."""
    dynamic_sampling_max_batches: int = 1
    """With dynamic_sampling: sample up to this many batches per step, keeping groups whose
    scores differ, until every rank has its share of prompts_per_step (DAPO's
    max_num_gen_batches); places still empty after the last are masked out of the loss. 1: one
    batch, filtered groups masked out."""
    dynamic_sampling_gen_prompts: int | None = None
    """With dynamic_sampling: prompts per sampled batch (DAPO's data.gen_batch_size, 3 x the
    train batch in the papers' scripts); the step keeps prompts_per_step of their groups,
    informative ones first. None: rollout.prompts_per_step."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment (algorithms.md §6.7): responses longer than
    rollout.max_new_tokens minus this many tokens lose up to overlong_factor of reward; 0: off."""
    overlong_factor: float = 1.0
    """The largest overlong punishment, reached at rollout.max_new_tokens."""
    ppl_shaping_alpha: float = 0.0
    """Perplexity shaping (Deng et al., algorithms.md §7.1): advantages scaled by clamp(1 -
    alpha * w, 0.8, 1.2), w the response's standardised log-perplexity in its group; 0: off."""
    position_shaping_alpha: float = 0.0
    """Position shaping (Deng et al., algorithms.md §7.2): later tokens' |A| raised by up to
    alpha, in the plateau stage (position_shaping_start/_end, or detected); 0: off."""
    position_shaping_start: int | None = None
    """First step of position shaping; None detects the plateau stage from the run's entropy."""
    position_shaping_end: int | None = None
    plateau_window: int = 15
    """Steps of the moving average and of the slope window with which the trainer detects the
    plateau stage online (`law.detect_plateau_online`; odd, >= 3). Once found, the plateau stays:
    position shaping is on from then to the end of the run."""
    low_prob_alpha: float = 0.0
    """Low-probability token reweighting (Yang et al., algorithms.md §8.1): A * (alpha * p + 1
    - alpha); 0: off."""
    lopti_eta: float | None = None
    rollout_is: str | None = None
    """Truncated importance sampling on the rollout/training mismatch (`entroprl.algos.mismatch`,
    verl's ``rollout_correction.rollout_is``): `token` or `sequence` weights
    min(pi_train / pi_rollout, rollout_is_threshold) on each token's policy loss (KL-Cov's
    penalty included, as verl); None: off. Needs the engine's log-probs, which
    rollout.backend=vllm reports."""
    rollout_is_threshold: float = 2.0
    """The truncation C of rollout_is."""

    def validate(self) -> None:
        _need(
            self.policy_loss in losses.POLICY_LOSSES,
            "algorithm.policy_loss",
            f"unknown loss {_show(self.policy_loss)}; known: {sorted(losses.POLICY_LOSSES)}",
        )
        _need(
            self.advantage in advantages.ADVANTAGE_ESTIMATORS,
            "algorithm.advantage",
            f"unknown estimator {_show(self.advantage)}; "
            f"known: {sorted(advantages.ADVANTAGE_ESTIMATORS)}",
        )
        _need(
            self.loss_agg_mode in losses.LOSS_AGG_MODES,
            "algorithm.loss_agg_mode",
            f"unknown mode {_show(self.loss_agg_mode)}; known: {sorted(losses.LOSS_AGG_MODES)}",
        )
        chosen = (
            ("loss", self.loss, self.policy_loss, losses.POLICY_LOSSES),
            (
                "advantage_settings",
                self.advantage_settings,
                self.advantage,
                advantages.ADVANTAGE_ESTIMATORS,
            ),
        )
        for key, store, name, registry in chosen:
            # the chosen one's defaults are checked too where none are given
            every = store if name in store else {**store, name: registry[name].settings()}
            for entry, settings in every.items():
                try:
                    settings.validate()
                except SettingError as e:
                    raise ConfigError(f"algorithm.{key}.{entry}.{e.key}: {e.why}") from None
        self._validate_options()

    def _validate_options(self) -> None:
        _need(self.cov_scope in COV_SCOPES, "algorithm.cov_scope", " or ".join(COV_SCOPES))
        _need(self.cov_logp in COV_LOGPS, "algorithm.cov_logp", " or ".join(COV_LOGPS))
        _need(
            self.kl_estimator in losses.KL_ESTIMATORS,
            "algorithm.kl_estimator",
            " or ".join(losses.KL_ESTIMATORS),
        )
        _need(
            self.high_entropy_rho is None or 0 < self.high_entropy_rho <= 1,
            "algorithm.high_entropy_rho",
            "must be in (0, 1]",
        )
        _need(self.lopti_eta is None or 0 < self.lopti_eta < 1, "algorithm.lopti_eta", "in (0, 1)")
        _need(0 <= self.low_prob_alpha <= 1, "algorithm.low_prob_alpha", "must be in [0, 1]")
        _need(self.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0")
        _need(self.overlong_factor >= 0, "algorithm.overlong_factor", "must be >= 0")
        _need(
            self.rollout_is is None or self.rollout_is in mismatch.ROLLOUT_IS_LEVELS,
            "algorithm.rollout_is",
            f"{' or '.join(mismatch.ROLLOUT_IS_LEVELS)} (or null: off)",
        )
        _need(self.rollout_is_threshold > 0, "algorithm.rollout_is_threshold", "must be > 0")
        _need(
            self.rollout_is is None
            or _takes_keyword(losses.POLICY_LOSSES[self.policy_loss].fn, "weights"),
            "algorithm.rollout_is",
            f"policy loss {self.policy_loss!r} takes no `weights` argument, through which the "
            "importance weights reach its per-token loss (entroprl.algos.losses.PolicyLoss)",
        )
        _need(
            self.dynamic_sampling_max_batches >= 1,
            "algorithm.dynamic_sampling_max_batches",
            "must be >= 1",
        )
        _need(
            self.dynamic_sampling or self.dynamic_sampling_max_batches == 1,
            "algorithm.dynamic_sampling_max_batches",
            "more than one batch needs algorithm.dynamic_sampling=true",
        )
        _need(
            self.dynamic_sampling_metric in DYNAMIC_SAMPLING_METRICS,
            "algorithm.dynamic_sampling_metric",
            " or ".join(DYNAMIC_SAMPLING_METRICS),
        )
        _need(
            self.plateau_window >= 3 and self.plateau_window % 2 == 1,
            "algorithm.plateau_window",
            "must be an odd number >= 3",
        )


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """AdamW's learning rate (the peak of the schedule)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.999
    """AdamW's second-moment decay."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr / warmup_steps to lr."""
    schedule: str = "constant"
    """The learning rate after warm-up: `constant`, `cosine` (to 0 at trainer.steps) or
    `linear` (to 0)."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping of each optimizer step."""
    epochs: int = 1
    """Passes over each rollout batch (PPO epochs)."""
    mini_batch_size: int = 128
    """Responses per optimizer step (per rank); the rollout batch is split into mini-batches."""
    micro_batch_size: int = 32
    """Responses per forward/backward; gradients accumulate over a mini-batch."""
    log_prob_micro_batch_size: int | None = None
    """Responses per forward of the no-grad passes (old, reference and selection log-probs,
    verl's log_prob_micro_batch_size); None: micro_batch_size. They keep no activations for a
    backward, so they can take several times more."""
    micro_batch_tokens: int | None = None
    """At most this many tokens per forward/backward besides micro_batch_size responses: the
    micro-batch's responses x (the prompt width + its longest response), right padding not
    counted (`entroprl.train.micro_batches`). verl's dynamic batch size (use_dynamic_bsz,
    ppo_max_token_len_per_gpu): short responses share a micro-batch, long ones take few, so set
    micro_batch_size high and this to what the memory holds. A response longer than it runs
    alone. null: responses only."""
    log_prob_micro_batch_tokens: int | None = None
    """The same for the no-grad passes (verl's log_prob_max_token_len_per_gpu); null:
    micro_batch_tokens."""

    shared_prefix: bool = False
    """Compute each group's prompt once in the training forwards and the no-grad passes, its
    responses attending to its keys and values ("Prefix Grouper", `forward.shared_prefix_forward`):
    the same log-probs and gradients, to float rounding, with the prompt's share of the compute
    divided by the group size (benchmarks/bench_prefix.py measures when it pays). Not with
    model.gradient_checkpointing (which turns the KV cache off)."""

    @property
    def log_prob_rows(self) -> int:
        return self.log_prob_micro_batch_size or self.micro_batch_size

    @property
    def log_prob_tokens(self) -> int | None:
        return self.log_prob_micro_batch_tokens or self.micro_batch_tokens

    def validate(self) -> None:
        _need(0 < self.lr <= 1, "optim.lr", "must be in (0, 1]")
        _need(
            self.weight_decay >= 0 and self.lr * self.weight_decay < 1,
            "optim.weight_decay",
            "must be >= 0, with lr * weight_decay < 1 (AdamW scales the weights by "
            "1 - lr * weight_decay every step)",
        )
        _need(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)")
        _need(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)")
        _need(self.grad_clip > 0, "optim.grad_clip", "must be > 0 (the largest gradient norm)")
        _need(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _need(self.schedule in SCHEDULES, "optim.schedule", " or ".join(SCHEDULES))
        _need(self.epochs >= 1, "optim.epochs", "must be >= 1")
        _need(self.micro_batch_size >= 1, "optim.micro_batch_size", "must be >= 1")
        _need(
            self.log_prob_micro_batch_size is None or self.log_prob_micro_batch_size >= 1,
            "optim.log_prob_micro_batch_size",
            "must be >= 1 (or null: optim.micro_batch_size)",
        )
        for key in ("micro_batch_tokens", "log_prob_micro_batch_tokens"):
            value = getattr(self, key)
            _need(value is None or value >= 1, f"optim.{key}", "must be >= 1 (or null)")
        _need(
            self.mini_batch_size >= self.micro_batch_size,
            "optim.mini_batch_size",
            "must be >= optim.micro_batch_size",
        )
        _need(
            self.mini_batch_size % self.micro_batch_size == 0,
            "optim.mini_batch_size",
            "must be a multiple of optim.micro_batch_size",
        )


@dataclass
class TrainerConfig:
    steps: int = 100
    """RL steps of the run (a resumed run continues to this step)."""
    seed: int = 0
    """Seeds the prompt order, the sampling and the selections of every step (a resumed run
    draws what the uninterrupted one would)."""
    out_dir: str = "runs/default"
    """The run directory: config, metrics.jsonl, TensorBoard events, checkpoints, rollout
    samples."""
    device: str = "auto"
    """`auto` (this rank's GPU if there is one, else the CPU), `cpu`, `cuda` (this rank's GPU:
    torchrun's LOCAL_RANK) or `cuda:N`."""
    strategy: str = "ddp"
    """`ddp`: every rank holds the whole model (replicated); `fsdp`: parameters, gradients and
    AdamW state sharded over the ranks (FSDP2), for models too large to replicate."""
    eval_every: int = 10
    """Held-out evaluation every this many steps, before the first and at the last; 0: never."""
    eval_samples: int = 4
    """Samples per held-out problem: pass@1 is their mean accuracy, pass@k uses all of them."""
    eval_temperature: float = 1.0
    """Sampling temperature of the held-out evaluation (0: greedy)."""
    save_every: int = 50
    """A checkpoint every this many steps, and at the last."""
    keep_checkpoints: int = 2
    """Checkpoints kept: the newest and the ones before it (`entroprl.train.checkpoint.prune`)."""
    rollout_samples: int = 8
    """Rollouts per step saved with per-token log-prob, entropy, advantage and covariance."""
    max_nonfinite_updates: int = 5
    """Steps in a row with an update skipped for a NaN or infinite loss or gradient that stop the
    run (see `Trainer.train` for the whole NaN policy)."""
    entropy_change_every: int = 10
    """Every this many steps, recompute the entropy on the same rollouts after the update (one
    no-grad forward) and log the measured change, `dynamics/entropy_change`; 0: never. Every 10
    steps keeps its cost near 1% of training."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers the metrics also go to, under the same names (`entroprl.train.trackers`,
    through Accelerate's tracker layer): tensorboard (events in out_dir/tb), wandb
    (`pip install 'entroprl[wandb]'`; `WANDB_MODE=offline` keeps it in out_dir/wandb), mlflow,
    trackio, aim, comet_ml, clearml, dvclive, swanlab; [] for none."""
    project: str = "entroprl"
    """The project (W&B, trackio, ...) or experiment (MLflow) of the trackers' runs, which are named
    after out_dir."""
    progress: bool = True
    """Progress bars on long work (steps, sampling chunks, updates)."""
    peak_tflops: float | None = None
    """The dense bfloat16 peak of one of the run's GPUs in TFLOP/s, for `perf/mfu/actor`; null:
    looked up by the GPU's name (`entroprl.train.perf.DEVICE_PEAK_TFLOPS`). On a CPU, or a GPU
    the table does not name, no MFU is logged unless it is set."""

    def validate(self) -> None:
        low, high = TEMPERATURES
        _need(
            self.eval_temperature == 0 or low <= self.eval_temperature <= high,
            "trainer.eval_temperature",
            f"must be 0 (greedy) or in [{low}, {high}]",
        )
        _need(self.steps >= 1, "trainer.steps", "must be >= 1")
        low_seed, high_seed = SEED_RANGE
        _need(low_seed <= self.seed <= high_seed, "trainer.seed", f"must be in [0, {high_seed:,}]")
        _need(self.entropy_change_every >= 0, "trainer.entropy_change_every", "must be >= 0")
        _need(self.eval_samples >= 1, "trainer.eval_samples", "must be >= 1")
        _need(self.eval_every >= 0, "trainer.eval_every", "must be >= 0 (0: no evaluation)")
        _need(self.save_every >= 1, "trainer.save_every", "must be >= 1")
        _need(self.keep_checkpoints >= 1, "trainer.keep_checkpoints", "must be >= 1")
        _need(self.max_nonfinite_updates >= 1, "trainer.max_nonfinite_updates", "must be >= 1")
        _need(self.rollout_samples >= 0, "trainer.rollout_samples", "must be >= 0")
        _need(self.out_dir.strip() != "", "trainer.out_dir", "must name a directory")
        if self.report_to:
            from entroprl.train import trackers  # Accelerate: imported only where one is named

            known = trackers.names()
            for i, name in enumerate(self.report_to):
                _need(name in known, f"trainer.report_to[{i}]", f"one of {known}")
        _need(
            DEVICE.fullmatch(self.device) is not None,
            "trainer.device",
            f"unknown device {_show(self.device)}; expected auto, cpu, cuda, cuda:N or mps",
        )
        _need(self.strategy in STRATEGIES, "trainer.strategy", " or ".join(STRATEGIES))
        _need(
            self.peak_tflops is None or self.peak_tflops > 0,
            "trainer.peak_tflops",
            "must be > 0, or null (looked up by the GPU's name)",
        )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def loss_settings(self) -> Any:
        """The settings of `algorithm.policy_loss` (a `PolicyLossSpec.settings` instance)."""
        a = self.algorithm
        return a.loss.get(a.policy_loss) or losses.POLICY_LOSSES[a.policy_loss].settings()

    def estimator_settings(self) -> Any:
        """The settings of `algorithm.advantage` (an `AdvantageEstimatorSpec.settings`
        instance)."""
        a = self.algorithm
        chosen = a.advantage_settings.get(a.advantage)
        return chosen or advantages.ADVANTAGE_ESTIMATORS[a.advantage].settings()

    def validate(self) -> Config:
        """Check value ranges and names, each section by itself and then what ties sections
        together; raise ConfigError naming the key at fault. Changes nothing (the settings of the
        loss and estimator chosen are filled in by `with_default_settings`, where a configuration
        is read)."""
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            _check_numbers(section.name, values)
            if section.name == "data":
                _validate_data(values)
            else:
                values.validate()
        self._validate_across_sections()
        return self

    def _validate_across_sections(self) -> None:
        a, r, o, t, m, d = (
            self.algorithm,
            self.rollout,
            self.optim,
            self.trainer,
            self.model,
            self.data,
        )
        _need(
            0 <= a.overlong_buffer <= r.max_new_tokens,
            "algorithm.overlong_buffer",
            "must be in [0, rollout.max_new_tokens]",
        )
        _need(
            a.rollout_is is None or r.backend == "vllm",
            "algorithm.rollout_is",
            "needs the rollout engine's log-probs, which only rollout.backend=vllm reports",
        )
        _need(
            a.dynamic_sampling_gen_prompts is None
            or (a.dynamic_sampling and a.dynamic_sampling_gen_prompts >= r.prompts_per_step),
            "algorithm.dynamic_sampling_gen_prompts",
            "needs algorithm.dynamic_sampling=true and must be >= rollout.prompts_per_step",
        )
        _need(
            not (o.shared_prefix and m.gradient_checkpointing),
            "optim.shared_prefix",
            "needs the KV cache, which model.gradient_checkpointing turns off",
        )
        _need(
            m.compute_dtype in (None, "bfloat16", m.dtype) or t.strategy == "fsdp",
            "model.compute_dtype",
            "bfloat16 without FSDP (float16 needs trainer.strategy=fsdp)",
        )
        _need(
            d.task not in math_problems.FORMATS or t.eval_every == 0 or d.test_file is not None,
            "data.test_file",
            f"task {_show(d.task)} evaluates on a file: set it, or trainer.eval_every=0",
        )

    def with_default_settings(self) -> Config:
        """This configuration with the settings of its policy loss and advantage estimator
        filled in with their defaults where none are given (a copy; `self` is left as it is), so
        that the run directory's config.yaml holds every value the run uses."""
        a = self.algorithm
        loss, estimator = dict(a.loss), dict(a.advantage_settings)
        if a.policy_loss in losses.POLICY_LOSSES:
            loss.setdefault(a.policy_loss, losses.POLICY_LOSSES[a.policy_loss].settings())
        if a.advantage in advantages.ADVANTAGE_ESTIMATORS:
            spec = advantages.ADVANTAGE_ESTIMATORS[a.advantage]
            estimator.setdefault(a.advantage, spec.settings())
        algorithm = dataclasses.replace(a, loss=loss, advantage_settings=estimator)
        return dataclasses.replace(self, algorithm=algorithm)


def _need(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


def _check_numbers(name: str, section: Any) -> None:
    """Every float of a section finite, every int inside torch's 64 bits."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float):
            _need(math.isfinite(value), f"{name}.{f.name}", "must be finite")
        elif isinstance(value, int) and not isinstance(value, bool):
            # torch holds counts and seeds in 64 bits: a larger one overflows deep inside
            _need(abs(value) < 2**63, f"{name}.{f.name}", "does not fit in 64 bits")


def _validate_data(d: DataConfig) -> None:
    """The `data` section (its dataclass lives with the tasks, whose names it is checked
    against here)."""
    _need(d.task in TASKS, "data.task", f"unknown task {_show(d.task)}; known: {sorted(TASKS)}")
    _need(d.train_size >= 1, "data.train_size", "must be >= 1")
    _need(d.test_size >= 1, "data.test_size", "must be >= 1")
    _need(d.max_prompt_chars >= 1, "data.max_prompt_chars", "must be >= 1")
    _need(
        d.reward is None or d.reward in math_problems.REWARDS or ":" in d.reward,
        "data.reward",
        f"unknown reward {_show(d.reward)}; known: {sorted(math_problems.REWARDS)}, or "
        "module:function for your own",
    )
    _need(d.reward_timeout > 0, "data.reward_timeout", "must be > 0")
    _need("{message}" in d.plain_template, "data.plain_template", "must contain {message}")
    _need(d.train_limit is None or d.train_limit >= 1, "data.train_limit", "must be >= 1")
    _need(d.test_limit is None or d.test_limit >= 1, "data.test_limit", "must be >= 1")


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxstring, _repr.maxother = 3, 3, 3, 40, 40


def _show(value: Any) -> str:
    """`repr(value)`, cut short: an error message stays one short line for any value."""
    text = _repr.repr(value)
    return text if len(text) <= 120 else f"{text[:100]}...{text[-17:]}"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation, converting ints to floats where a float is due."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        (item,) = typing.get_args(annotation)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and type(value) is annotation:
        return value
    raise ConfigError(
        f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {_show(value)}"
    )


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            if dotted in MOVED_KEYS:
                raise ConfigError(f"{dotted}: now {MOVED_KEYS[dotted]}")
            raise ConfigError(f"{dotted}: unknown key; known keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) or dotted in _REGISTRIES:
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping, got {_show(value)}")
            if dotted in _REGISTRIES:
                _apply_registered_settings(current, value, dotted)
            else:
                _apply(current, value, f"{dotted}.")
        else:
            setattr(obj, key, _coerce(dotted, value, hints[key]))


_REGISTRIES = {
    "algorithm.loss": ("loss", lambda: losses.POLICY_LOSSES),
    "algorithm.advantage_settings": ("estimator", lambda: advantages.ADVANTAGE_ESTIMATORS),
}
"""Keys holding `<name>.<setting>` for each entry of a registry: (what an entry is, the registry,
read when the key is applied, after the plug-ins have registered theirs)."""


def _apply_registered_settings(store: dict[str, Any], values: dict[str, Any], key: str) -> None:
    """`<key>.<name>.<setting>`: the own settings dataclass of each registered loss or
    estimator."""
    kind, registry = _REGISTRIES[key][0], _REGISTRIES[key][1]()
    for name, settings in values.items():
        if name not in registry:
            raise ConfigError(
                f"{key}.{name}: unknown {kind}; known: {sorted(registry)} "
                f"(a plug-in's {kind} needs its module in algorithm.plugins)"
            )
        if not isinstance(settings, dict):
            raise ConfigError(f"{key}.{name}: expected a mapping, got {_show(settings)}")
        target = store.setdefault(name, registry[name].settings())
        _apply(target, settings, f"{key}.{name}.")


def _takes_keyword(fn, name: str) -> bool:
    parameters = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def _import_plugins(values: dict[str, Any]) -> None:
    """Import the modules of `algorithm.plugins` first: the losses they register may be named
    anywhere else in the configuration. A module that is not a dotted name or fails to import,
    whatever it raises, is a ConfigError naming its entry (and where in it the error is)."""
    section = values.get("algorithm")
    modules = section.get("plugins") if isinstance(section, dict) else None
    for i, name in enumerate(_coerce("algorithm.plugins", modules or [], list[str])):
        key = f"algorithm.plugins[{i}]"
        if not MODULE_NAME.fullmatch(name):
            raise ConfigError(f"{key}: {_show(name)} is not a module name (a.b.c, no leading dot)")
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as e:  # the user's code: any error in it is theirs
            raise ConfigError(f"{key}: cannot import {name!r}: {_error_in_module(e)}") from None


def _error_in_module(error: BaseException) -> str:
    """`error` in one line, with the file and line of the code that raised it."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    if isinstance(error, SyntaxError) and error.filename:
        return f"{text} ({error.filename}:{error.lineno})"
    frames = traceback.extract_tb(error.__traceback__)
    if frames and not isinstance(error, ImportError):
        return f"{text} ({frames[-1].filename}:{frames[-1].lineno})"
    return text


def _apply_all(config: Config, values: dict[str, Any]) -> None:
    values = _fix_yaml_floats(values)
    _import_plugins(values)
    _apply(config, values)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['optim.lr=1e-5', 'algorithm.policy_loss=kl_cov'] into a nested dict (YAML scalars)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if len(item) > MAX_OVERRIDE_CHARS:
            raise ConfigError(
                f"override {_show(item)}: {len(item):,} characters, more than the "
                f"{MAX_OVERRIDE_CHARS:,} accepted"
            )
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-5")
        value = _fix_yaml_floats(load_yaml(raw, f"override {key}")) if raw else None
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is given a value and keys")
        node[leaf] = value
    return nested


def load_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)`, refusing, with a ConfigError naming `where`, a document whose
    aliases expand to more than `MAX_YAML_VALUES` values or refer to themselves, before any of it
    is built, and one nested too deeply for the parser."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_YAML_VALUES:
            raise ConfigError(
                f"{where}: its aliases expand to more than {MAX_YAML_VALUES:,} values "
                "(a YAML alias bomb?)"
            )
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{where}: not valid YAML: {e.problem or e.context}{at}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a configuration") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """The number of values `node` stands for once every alias in it is expanded (shared nodes
    counted once per use, each computed once); a node inside itself counts as too many."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:  # a recursive structure: it expands without end
        return MAX_YAML_VALUES + 1
    open_.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes, open_) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(
            _expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value
        )
    open_.discard(id(node))
    sizes[id(node)] = size = min(size, MAX_YAML_VALUES + 1)
    return size


def _fix_yaml_floats(values: Any) -> Any:
    """YAML 1.1 reads `1e-5` as a string (it wants `1.0e-5`); accept the form people type."""
    if isinstance(values, dict):
        return {k: _fix_yaml_floats(v) for k, v in values.items()}
    if isinstance(values, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", values):
        return float(values)
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then the `key=value` overrides; validated."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        values = load_yaml(path.read_text(), str(path)) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _apply_all(config, values)
    if overrides:
        _apply_all(config, parse_overrides(overrides))
    return config.validate().with_default_settings()


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict) or not values:
        return {prefix.rstrip("."): values} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in values.items():
        out |= _flatten(value, f"{prefix}{key}.")
    return out


def resume_changes(before: dict[str, Any], after: Config) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ between the configuration `before` (as written to a run
    directory) and `after`, with both values. A key `before` lacks (written by an earlier
    version) counts as its default; a key `after` lacks (since removed) is ignored."""
    now = _flatten(yaml.safe_load(yaml.safe_dump(after.to_dict())))  # as a file holds them
    then = _flatten(Config().to_dict()) | _flatten(before)
    return {key: (then.get(key), value) for key, value in now.items() if then.get(key) != value}


def meaning_changes(changes: dict[str, tuple[Any, Any]], after: Config) -> list[str]:
    """The `changes` (`resume_changes`) that make the resumed steps those of another run, one
    "key: old -> new" each: the keys not in `FREE_ON_RESUME`, and `trainer.steps` when the
    learning-rate schedule stretches over them."""
    out = []
    for key, (old, new) in changes.items():
        free = key in FREE_ON_RESUME
        if key == "trainer.steps" and after.optim.schedule != "constant":
            free = False  # the learning rate of every later step moves with it
        if not free:
            out.append(f"{key}: {_show(old)} -> {_show(new)}")
    return out


def config_from_dict(values: dict[str, Any]) -> Config:
    config = Config()
    _apply_all(config, values)
    return config.validate().with_default_settings()
