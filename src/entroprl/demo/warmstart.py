"""Warm start for the Countdown demo: a tiny model fine-tuned on diverse correct answers, cached.

RL needs a starting policy that already solves some problems (so groups get non-zero rewards) and
that spreads its probability over several valid answers (so there is entropy to lose). The warm
start trains a tiny model from scratch with next-token loss on the response tokens of
(prompt, answer) pairs, where every training problem contributes several *different* correct
answers and, optionally, a share of wrong ones (expressions over the same numbers that miss the
target) so that accuracy stays well below saturation. The result is cached under
``cache_dir / <hash of the config>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from entroprl.demo.models import build_model, publish_dir, tiny_config
from entroprl.demo.tokenizer import build_char_tokenizer
from entroprl.rollout.hf import HFBackend
from entroprl.rollout.sampler import position_ids
from entroprl.tasks.countdown import (
    CountdownProblem,
    countdown_reward,
    expression_values,
    generate_problems,
    solutions,
)
from entroprl.train import schedule
from entroprl.train.forward import batched_log_probs
from entroprl.train.micro_batches import Budget
from entroprl.train.progress import bars

INFO_FILE = "warmstart.json"
"""Written last into a warm-start directory: its presence marks the directory as complete."""

_CACHE_VERSION = 2
"""Part of the cache key: bump it when a change to this module changes what a config produces."""


@dataclass(frozen=True)
class WarmStartConfig:
    """Everything that determines a warm start (its hash is the cache key)."""

    # Model.
    arch: str = "qwen2"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # Task (the RL run should use the same values).
    num_numbers: int = 3
    max_number: int = 9
    max_target: int = 40
    # Data: each training problem contributes up to `solutions_per_problem` distinct correct
    # answers; a share `wrong_fraction` of training pairs gets a wrong answer instead.
    num_problems: int = 1000
    solutions_per_problem: int = 4
    wrong_fraction: float = 0.3
    # Optimisation.
    steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    # Held-out measurement.
    eval_problems: int = 200
    eval_samples: int = 4
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        positive = (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_problems",
            "solutions_per_problem",
            "batch_size",
            "eval_samples",
            "max_new_tokens",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"WarmStartConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.warmup_steps < 0 or self.eval_problems < 0:
            raise ValueError("WarmStartConfig.steps, warmup_steps and eval_problems must be >= 0")
        if not 0.0 <= self.wrong_fraction < 1.0:
            raise ValueError(f"wrong_fraction must be in [0, 1), got {self.wrong_fraction}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")

    def cache_key(self) -> str:
        """Short hex digest of the config's fields and the module's cache version."""
        payload = json.dumps(
            {"version": _CACHE_VERSION, **dataclasses.asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EvalResult:
    """Accuracy and entropy of responses sampled (or decoded greedily) for a set of problems.

    `mean_entropy` is the paper's batch policy entropy (algorithms.md §1): the mean over responses
    of each response's mean token entropy, at temperature 1. `token_mean_entropy` weights every
    token equally (what verl and TRL log).
    """

    accuracy: float
    mean_entropy: float
    token_mean_entropy: float
    mean_length: float
    num_responses: int


@torch.no_grad()
def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[CountdownProblem],
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    greedy: bool = False,
    batch_size: int = 256,
    max_new_tokens: int = 16,
    seed: int = 0,
) -> EvalResult:
    """Generate `num_samples` responses per problem and score them with `countdown_reward`.

    Sampled by `HFBackend` at `temperature` (or greedy), `batch_size` sequences at a time, the RNG
    seeded with `seed` and restored afterwards. Entropy is measured on the generated tokens at
    temperature 1, by one forward over prompts and responses.
    """
    if not problems:
        raise ValueError("evaluate_accuracy got no problems")
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("num_samples, batch_size and max_new_tokens must be >= 1")
    if not greedy and not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    backend = HFBackend(model, tokenizer, batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = backend.generate(
            [p.prompt for p in problems],
            n=num_samples,
            temperature=0.0 if greedy else temperature,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
        )
    was_training = model.training
    model.eval()
    _, entropy = batched_log_probs(model, batch, Budget(batch_size), temperature=1.0)
    mask = batch.response_mask
    entropy = entropy * mask
    per_response = mask.sum(dim=1)
    seq_entropy = float((entropy.sum(dim=1) / per_response.clamp(min=1)).sum())
    items = [p for p in problems for _ in range(num_samples)]
    correct = sum(countdown_reward(t, p) for t, p in zip(batch.texts, items, strict=True))
    lengths = int(per_response.sum())
    model.train(was_training)
    n = len(items)
    return EvalResult(
        accuracy=correct / n,
        mean_entropy=seq_entropy / n,
        token_mean_entropy=float(entropy.sum()) / max(lengths, 1),
        mean_length=lengths / n,
        num_responses=n,
    )


def _wrong_answers(problem: CountdownProblem, limit: int, rng: random.Random) -> list[str]:
    """Up to `limit` expressions using all the numbers whose value is an integer != the target."""
    found = sorted(
        text
        for text, value in expression_values(problem.numbers, use_all=True).items()
        if value.denominator == 1 and value != problem.target
    )
    return rng.sample(found, min(limit, len(found)))


def build_sft_pairs(
    config: WarmStartConfig, rng: random.Random
) -> list[tuple[list[tuple[str, str]], list[tuple[str, str]]]]:
    """Per training problem: (its correct (prompt, answer) pairs, its wrong pairs).

    Each pair shows the problem's numbers in its own random order (the answers do not depend on
    it), so a problem is seen in several orders.
    """
    problems = generate_problems(
        config.num_problems,
        seed=config.seed,
        split="train",
        num_numbers=config.num_numbers,
        max_number=config.max_number,
        max_target=config.max_target,
    )
    out = []
    for p in problems:
        good = solutions(p)
        good = rng.sample(good, min(config.solutions_per_problem, len(good)))
        bad = _wrong_answers(p, config.solutions_per_problem, rng) if config.wrong_fraction else []
        out.append(
            (
                [(_shuffled_prompt(p, rng), s) for s in good],
                [(_shuffled_prompt(p, rng), s) for s in bad],
            )
        )
    return out


def _shuffled_prompt(problem: CountdownProblem, rng: random.Random) -> str:
    """The prompt with the numbers in a random order: the answer does not depend on it."""
    numbers = list(problem.numbers)
    rng.shuffle(numbers)
    return CountdownProblem(tuple(numbers), problem.target).prompt


def _encode_pairs(
    pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded ids of prompt+answer+EOS, attention mask, and the mask of answer+EOS tokens."""
    seqs, resp_lens = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + a)
        resp_lens.append(len(a))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    resp = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, r) in enumerate(zip(seqs, resp_lens, strict=True)):
        ids[i, width - len(s) :] = torch.tensor(s)
        attn[i, width - len(s) :] = 1
        resp[i, width - r :] = True
    return ids, attn, resp


def sft_loss(model: PreTrainedModel, ids: Tensor, attn: Tensor, resp: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the response tokens (answer and EOS) only.

    Position ids count real tokens only, as generation does with left padding.
    """
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits
    target_mask = resp[:, 1:].float()
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
    ).view_as(target_mask)
    return (nll * target_mask).sum() / target_mask.sum()


def _train(
    config: WarmStartConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Next-token training on the SFT pairs: AdamW, linear warm-up then cosine decay to 0."""
    rng = random.Random(config.seed)
    per_problem = build_sft_pairs(config, rng)
    good = [pair for g, _ in per_problem for pair in g]
    bad = [pair for _, b in per_problem for pair in b]
    good_owner = torch.tensor(
        [i for i, (g, _) in enumerate(per_problem) for _ in g], dtype=torch.long
    )
    bad_owner = torch.tensor(
        [i for i, (_, b) in enumerate(per_problem) for _ in b], dtype=torch.long
    )
    ids, attn, resp = _encode_pairs(good + bad, tokenizer)
    # Rows of each problem's correct (then wrong) answers are contiguous: a batch row is a random
    # problem, then a random answer of the chosen kind, so every problem weighs the same whatever
    # its number of answers.
    good_start, good_count = _spans(good_owner, len(per_problem))
    bad_start, bad_count = _spans(bad_owner, len(per_problem))
    bad_start = bad_start + len(good)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # the factor of the peak: the schedule at lr 1
    factor = partial(
        schedule.learning_rate,
        lr=1.0,
        warmup_steps=config.warmup_steps,
        total_steps=config.steps,
        schedule="cosine",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    bar = tqdm(range(config.steps), desc="warm start", leave=False, disable=not bars(True))
    for _ in bar:
        prob = torch.randint(len(per_problem), (config.batch_size,), generator=gen)
        wrong = torch.rand(config.batch_size, generator=gen) < config.wrong_fraction
        wrong &= bad_count[prob] > 0
        start = torch.where(wrong, bad_start[prob], good_start[prob])
        count = torch.where(wrong, bad_count[prob], good_count[prob])
        row = start + (torch.rand(config.batch_size, generator=gen) * count).long()
        loss = sft_loss(model, ids[row], attn[row], resp[row])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def _spans(owner: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """First row and row count of each group, for rows sorted by group."""
    count = torch.bincount(owner, minlength=num_groups)
    return count.cumsum(0) - count, count


def measure(
    config: WarmStartConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> dict[str, float]:
    """Held-out greedy accuracy, sampled (temperature 1) accuracy and entropy of the warm start."""
    if config.eval_problems == 0:
        return {}
    problems = generate_problems(
        config.eval_problems,
        seed=config.seed + 1,
        split="test",
        num_numbers=config.num_numbers,
        max_number=config.max_number,
        max_target=config.max_target,
    )
    kw = {"max_new_tokens": config.max_new_tokens, "seed": config.seed}
    greedy = evaluate_accuracy(model, tokenizer, problems, greedy=True, **kw)
    sampled = evaluate_accuracy(model, tokenizer, problems, num_samples=config.eval_samples, **kw)
    return {
        "heldout_greedy_accuracy": greedy.accuracy,
        "heldout_sampled_accuracy": sampled.accuracy,
        "heldout_mean_entropy": sampled.mean_entropy,
        "heldout_token_mean_entropy": sampled.token_mean_entropy,
        "heldout_mean_length": sampled.mean_length,
    }


def default_cache_dir() -> Path:
    """``$ENTROPRL_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/entroprl/warmstart``.

    ``XDG_CACHE_HOME`` defaults to ``~/.cache``.
    """
    if os.environ.get("ENTROPRL_CACHE_DIR"):
        return Path(os.environ["ENTROPRL_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "entroprl" / "warmstart"


def read_info(path: str | Path) -> dict | None:
    """The info JSON of a complete warm-start directory, or None if it is missing or unreadable."""
    try:
        return json.loads((Path(path) / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def warm_start(config: WarmStartConfig, cache_dir: str | Path) -> Path:
    """Train (or fetch from the cache) the warm-start model; return its directory.

    The directory ``cache_dir / config.cache_key()`` holds the model (safetensors), the tokenizer
    and `INFO_FILE` (the config, the measured held-out accuracy and entropy, the training time).
    A directory without a readable `INFO_FILE` is treated as incomplete and rebuilt. Writing goes
    to a temporary directory that is renamed into place.
    """
    target = Path(cache_dir) / config.cache_key()
    if read_info(target) is not None:
        return target
    # A model this small runs fastest on one thread: with two, every tiny matmul pays for thread
    # synchronisation (measured 4 to 9 times slower per step on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _build(config, target)
    finally:
        torch.set_num_threads(threads)
    return target


def _build(config: WarmStartConfig, target: Path) -> None:
    """Train, measure and save the warm start of `config` to `target` (atomically)."""
    tokenizer = build_char_tokenizer()
    prompt_len = len(
        CountdownProblem((config.max_number,) * config.num_numbers, config.max_target).prompt
    )
    model = build_model(
        tiny_config(
            len(tokenizer),
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            max_position=max(64, prompt_len + config.max_new_tokens),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            arch=config.arch,
        ),
        seed=config.seed,
    )
    started = time.perf_counter()
    _train(config, model, tokenizer)
    train_seconds = time.perf_counter() - started
    metrics = measure(config, model, tokenizer)
    info = {
        "config": dataclasses.asdict(config),
        "cache_key": config.cache_key(),
        "train_seconds": train_seconds,
        "metrics": metrics,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        # Another process may have finished the same warm start meanwhile: keep its copy.
        if read_info(target) is None:
            publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
