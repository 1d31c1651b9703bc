"""Held-out evaluation: sampled accuracy (pass@1 as the mean over samples), unbiased pass@k, maj@k.

`evaluate` is the trainer's periodic check on its task's held-out set. `run_benchmarks` (and
`run_eval`, behind ``entroprl eval``) evaluates a model on benchmark files with the papers'
protocol: greedy pass@1 on every benchmark, and on small ones (at most `Protocol.small_max`
problems, such as AIME and AMC) also `Protocol.samples` samples per problem at
`Protocol.temperature`, reported as avg@k (the mean accuracy over the samples), the unbiased
pass@k and maj@k. A benchmark's score is its avg@k when it was sampled, else its greedy pass@1;
the average is over benchmarks, as the papers report it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from math import comb
from pathlib import Path
from typing import Any

import numpy as np
import torch

from entroprl.errors import InputError
from entroprl.tasks import math_problems
from entroprl.tasks.base import Example, Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021):

    pass@k = 1 - C(n - c, k) / C(n, k)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise InputError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def maj_at_k(answers: Sequence[Any], correct: Sequence[bool]) -> float:
    """1.0 if the most frequent answer among the samples is a correct one (ties: first seen)."""
    if len(answers) != len(correct) or not answers:
        raise InputError("maj@k needs one correctness flag per answer, and at least one answer")
    top, _ = Counter(answers).most_common(1)[0]
    return float(correct[list(answers).index(top)])


def score_samples(correct: np.ndarray, ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Summaries of a (problems, samples) 0/1 matrix: `mean@n` (pass@1) and `pass@k` for each k."""
    correct = np.asarray(correct, dtype=bool)
    n = correct.shape[1]
    counts = correct.sum(1)
    out = {f"mean@{n}": float(correct.mean())}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in counts]))
    return out


def evaluate(
    backend,
    task: Task,
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    top_p: float = 1.0,
    problems: Sequence[Example] | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Sample `samples` responses per held-out problem of `task` (temperature 0 is greedy) and
    score them with `Task.score`; `problems` replaces `task.test` (a rank's share of it).

    Returns the summaries (`mean@n`, which is pass@1, and `pass@n`) and the (problems, samples)
    0/1 matrix.
    """
    problems = task.test if problems is None else problems
    prompts = [e.prompt for e in problems]
    texts = sample_texts(
        backend,
        prompts,
        n=samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        prompts_per_call=len(prompts),
    )
    correct = _scored(task, texts, problems)
    return score_samples(correct, ks=[samples] if samples > 1 else []), correct


# -- benchmarks ------------------------------------------------------------------------------------

GENERIC_STEMS = ("test", "train", "validation", "val", "dev", "data")
"""File names that say nothing about the benchmark: its name is then the parent folder's."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: Task
    """Its problems are `task.test`, scored by `task.score`."""
    reward: str | None
    """`math` or `gsm8k`: how a completion's final answer is read for maj@k; None: the whole
    completion (stripped) is the answer."""
    source: str


@dataclass(frozen=True)
class Protocol:
    samples: int = 32
    """Samples per problem on small benchmarks (k of avg@k, pass@k, maj@k); 0: greedy only."""
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 1024
    small_max: int = 100
    """Benchmarks with at most this many problems are also sampled."""
    prompts_per_call: int = 256
    """Prompts handed to the backend at once (each with all its samples)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 0 or self.max_new_tokens < 1 or self.prompts_per_call < 1:
            raise InputError(
                "samples must be >= 0, max_new_tokens and prompts_per_call >= 1; got "
                f"{self.samples}, {self.max_new_tokens}, {self.prompts_per_call}"
            )
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise InputError(
                f"sampling needs temperature > 0 and top_p in (0, 1], got {self.temperature}, "
                f"{self.top_p}"
            )


def parse_benchmark_spec(spec: str) -> tuple[str, str, str]:
    """``[NAME=]FORMAT:PATH`` -> (name, format, path).

    FORMAT is one of `tasks.math_problems.FORMATS`. Without a NAME the benchmark is named after the
    file, or after its folder when the file's name is generic (``math500/test.jsonl`` ->
    ``math500``).
    """
    name, fmt_path = "", spec
    head, eq, tail = spec.partition("=")
    if eq and ":" not in head:
        name, fmt_path = head.strip(), tail
    fmt, colon, path = fmt_path.partition(":")
    if not colon or not path or fmt not in math_problems.FORMATS:
        raise InputError(
            f"benchmark {spec!r}: expected [NAME=]FORMAT:PATH with FORMAT one of "
            f"{list(math_problems.FORMATS)}, e.g. math500=math:data/math500/test.jsonl"
        )
    if not name:
        p = Path(path)
        stem = p.name.split(".")[0]
        name = p.parent.name if stem.lower() in GENERIC_STEMS and p.parent.name else stem
    return name, fmt, path


def load_benchmark(
    spec: str, cfg: Any, tokenizer: Any = None, *, limit: int | None = None
) -> Benchmark:
    """The benchmark of ``[NAME=]FORMAT:PATH``, its prompts rendered as the `DataConfig` `cfg`
    says (keys, instruction, chat template), its first `limit` problems (None: all), scored with
    ``cfg.reward`` or the format's reward."""
    name, fmt, path = parse_benchmark_spec(spec)
    examples = math_problems.load_configured_examples(path, fmt, cfg, tokenizer, limit=limit)
    reward = cfg.reward or math_problems.default_reward(fmt)
    return Benchmark(name, math_problems.make_task(name, [], examples, reward), reward, path)


def sample_texts(
    backend: Any,
    prompts: Sequence[str],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    prompts_per_call: int = 256,
) -> list[list[str]]:
    """`n` completions of each prompt (temperature 0: greedy), asked for `prompts_per_call`
    prompts at a time; ``out[i]`` holds those of ``prompts[i]``."""
    out: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(prompts), prompts_per_call):
        batch = backend.generate(
            list(prompts[start : start + prompts_per_call]),
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
        )
        for group, text in zip(batch.group_ids.tolist(), batch.texts, strict=True):
            out[start + group].append(text)
    return out


def majority_correct(votes: Sequence[str | None], correct: Sequence[bool]) -> float:
    """maj@k over the samples that have an answer (`maj_at_k`); 0.0 when none has one."""
    kept = [(v, c) for v, c in zip(votes, correct, strict=True) if v is not None]
    if not kept:
        return 0.0
    return maj_at_k([v for v, _ in kept], [c for _, c in kept])


def pass_ks(n: int) -> list[int]:
    """The k of the reported pass@k: powers of two up to n, and n."""
    return sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | {n})


def _scored(task: Task, texts: list[list[str]], examples: list[Example]) -> np.ndarray:
    """Whether each sampled text (one row of samples per example) is correct."""
    flat = [t for row in texts for t in row]
    each = [e for e, row in zip(examples, texts, strict=True) for _ in row]
    rewards = task.score(flat, [e.answer for e in each], [e.prompt for e in each])
    return (np.asarray(rewards) >= 1.0).reshape(len(texts), -1)


def evaluate_benchmark(
    backend: Any, bench: Benchmark, protocol: Protocol
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics of one benchmark under `protocol`, and one record per problem (its completions
    and their correctness). Seeds torch's RNG with ``protocol.seed`` first, so that sampling with
    the HF backend is reproducible."""
    examples = bench.task.test
    prompts, answers = [e.prompt for e in examples], [e.answer for e in examples]
    p = protocol
    torch.manual_seed(p.seed)
    greedy = sample_texts(
        backend,
        prompts,
        n=1,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=p.max_new_tokens,
        prompts_per_call=p.prompts_per_call,
    )
    greedy_ok = _scored(bench.task, greedy, examples)[:, 0]
    metrics: dict[str, Any] = {"problems": len(examples), "greedy@1": float(greedy_ok.mean())}
    records = [
        {
            "index": i,
            "prompt": prompts[i],
            "answer": answers[i],
            "greedy": greedy[i][0],
            "greedy_correct": bool(greedy_ok[i]),
        }
        for i in range(len(examples))
    ]
    sampled = p.samples > 0 and len(examples) <= p.small_max
    if sampled:
        k = p.samples
        texts = sample_texts(
            backend,
            prompts,
            n=k,
            temperature=p.temperature,
            top_p=p.top_p,
            max_new_tokens=p.max_new_tokens,
            prompts_per_call=max(1, p.prompts_per_call // k),
        )
        correct = _scored(bench.task, texts, examples)
        metrics |= score_samples(correct, ks=pass_ks(k))
        metrics[f"avg@{k}"] = metrics.pop(f"mean@{k}")
        votes = [[_vote(t, bench.reward) for t in row] for row in texts]
        metrics[f"maj@{k}"] = float(
            np.mean([majority_correct(v, c) for v, c in zip(votes, correct, strict=True)])
        )
        for record, row, ok in zip(records, texts, correct, strict=True):
            record |= {"samples": row, "correct": ok.tolist()}
    metrics["score"] = metrics[f"avg@{p.samples}"] if sampled else metrics["greedy@1"]
    return metrics, records


def _vote(text: str, reward: str | None) -> str | None:
    if reward is None:
        return text.strip() or None
    return math_problems.voted_answer(text, reward)


def run_benchmarks(
    backend: Any, benchmarks: Sequence[Benchmark], protocol: Protocol
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Evaluate every benchmark; the report (protocol, per-benchmark metrics, averages over the
    benchmarks of `score` and `greedy@1`) and the per-problem records of each."""
    names = [b.name for b in benchmarks]
    if not benchmarks or len(set(names)) != len(names):
        raise InputError(f"need at least one benchmark, with distinct names; got {names}")
    results, records = {}, {}
    for bench in benchmarks:
        metrics, records[bench.name] = evaluate_benchmark(backend, bench, protocol)
        results[bench.name] = {"source": bench.source, **metrics}
    average = {
        key: float(np.mean([r[key] for r in results.values()])) for key in ("score", "greedy@1")
    }
    return {"protocol": asdict(protocol), "benchmarks": results, "average": average}, records


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table, accuracies in percent."""
    k = report["protocol"]["samples"]
    sampled = [f"avg@{k}", f"pass@{k}", f"maj@{k}"] if k > 0 else []
    columns = ["greedy@1", *sampled, "score"]
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "| benchmark | problems | " + " | ".join(columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for name, r in report["benchmarks"].items():
        cells = [pct(r.get(c)) for c in columns]
        lines.append(f"| {name} | {r['problems']} | " + " | ".join(cells) + " |")
    avg = report["average"]
    cells = [pct(avg.get(c)) for c in columns]
    lines.append("| average | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    report: dict[str, Any], records: dict[str, list[dict[str, Any]]], out_dir: str | Path
) -> Path:
    """``results.json``, ``results.md`` (the table) and ``generations/NAME.jsonl`` in `out_dir`."""
    out = Path(out_dir)
    (out / "generations").mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(format_table(report) + "\n")
    for name, rows in records.items():
        with open(out / "generations" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row, default=_structured_answer) + "\n" for row in rows)
    return out


def _structured_answer(value: Any) -> dict[str, Any]:
    """A task's answer that is a dataclass (a Countdown problem) as its fields, for JSON."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# -- the `entroprl eval` command -------------------------------------------------------------------
