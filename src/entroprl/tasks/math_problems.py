"""Math datasets: questions with reference answers, read from files and rendered as prompts.

Rows come from JSON lines (``.jsonl``, ``.json``: one object per line, not a JSON array), Parquet
(``.parquet``, ``.pq``; needs pyarrow, the ``data`` extra) or a directory written by
``datasets.Dataset.save_to_disk`` (needs ``datasets``, the same extra). A format says where the
question and the reference answer are:

- ``gsm8k``: the question is ``question``; the answer is the number after the last ``####`` of
  ``answer`` (a field holding just a number is accepted too), commas removed.
- ``math``: the question is ``problem``; the answer is the ``answer`` field, or when that is
  missing or empty the content of the last ``\\boxed{}`` of ``solution``.
- ``jsonl``: the question is ``question`` and the answer ``answer``, taken as they are.

``prompt_key`` and ``answer_key`` replace those field names; a dotted name reaches into nested
objects (``reward_model.ground_truth``). A row without a usable question or answer is never used,
nor one whose question is longer than `MAX_PROMPT_CHARS` characters (``data.max_prompt_chars``):
the rows left out are counted and the first of their line numbers reported in a `DataWarning`.

Each format comes with its reward: ``gsm8k`` scores with `gsm8k_reward`, ``math`` and ``jsonl``
with `math_reward`.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from entroprl.algos.checks import check_choice
from entroprl.errors import ConfigError, InputError
from entroprl.tasks.base import Example, Task
from entroprl.tasks.data import DEFAULT_INSTRUCTION, DEFAULT_PLAIN_TEMPLATE, DataConfig
from entroprl.tasks.rewards import (
    extract_boxed,
    extract_gsm8k_answer,
    gsm8k_reward,
    math_reward,
    score_batch,
)

FORMATS = ("gsm8k", "math", "jsonl")

DEFAULT_KEYS = {
    "gsm8k": ("question", "answer"),
    "math": ("problem", "answer"),
    "jsonl": ("question", "answer"),
}
"""(question field, answer field) of each format."""

MATH_SOLUTION_KEY = "solution"
"""The field whose last ``\\boxed{}`` gives a MATH answer when the answer field is absent."""

REWARDS: dict[str, Callable[[str, str], float]] = {"math": math_reward, "gsm8k": gsm8k_reward}
REWARD_WORKERS: dict[str, int | None] = {"math": None, "gsm8k": 0}
"""Processes that score a batch (`score_batch`): sympy-backed `math_reward` in parallel
(None: its default, up to 4), `gsm8k_reward` (string work, microseconds) in the caller."""

MAX_REPORTED_LINES = 10

MAX_PROMPT_CHARS = 16_000
"""Longest question used, in characters (MATH and GSM8K questions stay under 5,000): a 10 MB
question once exhausted memory inside the tokenizer, which aborts the process."""

ACCEPTED_FILES = (
    "JSON lines (.jsonl or .json, one object per line), Parquet (.parquet, .pq), or a directory "
    "saved with datasets.save_to_disk"
)

_BARE_NUMBER = re.compile(r"\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*\.?", re.ASCII)
_LOOSE_SPACE = re.compile(r"\s+")


class DataWarning(UserWarning):
    """Rows of a data file were left out; the message says how many and where."""


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    line: int
    """Line of the row in a JSON-lines file, or its 1-based row number in Parquet or `datasets`."""


@dataclass(frozen=True)
class BatchScoredTask(Task):
    """A task whose batches are scored by `score_batch`: in `num_workers` processes (None: the
    default of `score_batch`), each item bounded in time, a failing item scoring 0.0."""

    num_workers: int | None = 0

    def score(
        self, completions: list[str], answers: list[Any], prompts: list[str] | None = None
    ) -> list[float]:
        return score_batch(self.reward_fn, completions, answers, num_workers=self.num_workers)


def default_reward(fmt: str) -> str:
    check_choice("data format", fmt, FORMATS)
    return "gsm8k" if fmt == "gsm8k" else "math"


def make_task(name: str, train: list[Example], test: list[Example], reward: str) -> Task:
    """A task scored with the named reward (``math`` or ``gsm8k``), in parallel where it pays."""
    check_choice("reward", reward, REWARDS)
    return BatchScoredTask(name, train, test, REWARDS[reward], REWARD_WORKERS[reward])


# -- reading rows ----------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line or row number, row) of every record of a JSON-lines file, a Parquet file or a saved
    `datasets` directory. Blank lines are skipped; a line that is not a JSON object raises
    ValueError naming the file and the line."""
    path = Path(path)
    if path.is_dir():
        return _read_dataset_dir(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    raise InputError(f"{path}: unknown data file type {suffix!r}; expected {ACCEPTED_FILES}")


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with open(path, "rb") as f:
        # Bytes, decoded line by line: a decoding error then names its line.
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{number}: not UTF-8 text") from None
            if not line.strip():
                continue
            if not rows and line.lstrip().startswith("["):
                raise InputError(
                    f"{path}: a JSON array, not JSON lines; data files are {ACCEPTED_FILES}. "
                    f"Convert it with: jq -c '.[]' {path.name} > {path.stem}.jsonl"
                )
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}): "
                    f"{line.strip()[:80]!r}"
                ) from None
            except RecursionError:
                raise InputError(f"{path}:{number}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise InputError(
                    f"{path}:{number}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append((number, row))
    return rows


def _read_parquet(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'entroprl[data]'") from None
    return list(enumerate(pq.read_table(path).to_pylist(), 1))


def _read_dataset_dir(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"reading the datasets directory {path} needs the datasets package: "
            "pip install 'entroprl[data]'"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise InputError(
                f"{path} holds the splits {sorted(loaded)}: give one split's "
                f"directory, e.g. {path / sorted(loaded)[0]}"
            )
        loaded = next(iter(loaded.values()))
    return list(enumerate(loaded.to_list(), 1))


# -- questions and answers -------------------------------------------------------------------------


def get_field(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, following dots into nested objects; None where a step is missing."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _as_text(value: Any) -> str | None:
    """Stripped non-empty text; numbers (JSON answers such as 42) as their decimal text."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def gsm8k_reference(text: str) -> str | None:
    """The number after the last ``####`` of a GSM8K answer, or the text itself when it is just a
    number (``$`` and a final ``.`` allowed), commas removed; None otherwise."""
    tail = text.rsplit("####", 1)[-1].strip()
    match = _BARE_NUMBER.fullmatch(tail)
    return match.group(1).replace(",", "") if match else None


def reference_answer(row: dict[str, Any], fmt: str, answer_key: str | None = None) -> str | None:
    """The reference answer of `row` in format `fmt` (see the module docstring); None if absent."""
    check_choice("data format", fmt, FORMATS)
    raw = _as_text(get_field(row, answer_key or DEFAULT_KEYS[fmt][1]))
    if fmt == "gsm8k":
        return None if raw is None else gsm8k_reference(raw)
    if fmt == "math" and raw is None:
        solution = get_field(row, MATH_SOLUTION_KEY)
        boxed = extract_boxed(solution) if isinstance(solution, str) else None
        return None if boxed is None else boxed.strip() or None
    return raw


def load_problems(
    path: str | Path,
    fmt: str,
    *,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
    max_chars: int = MAX_PROMPT_CHARS,
) -> list[Problem]:
    """The first `limit` (None: all) usable problems of a data file in format `fmt`.

    Rows without a question or a reference answer, and rows whose question is longer than
    `max_chars` characters, are left out with a `DataWarning` giving their count and first line
    numbers; a file with no usable row raises ValueError.
    """
    check_choice("data format", fmt, FORMATS)
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1 or None, got {limit}")
    question_key = prompt_key or DEFAULT_KEYS[fmt][0]
    rows = read_rows(path)
    problems: list[Problem] = []
    left_out: list[int] = []
    too_long: list[int] = []
    for number, row in rows:
        question = _as_text(get_field(row, question_key))
        answer = reference_answer(row, fmt, answer_key)
        if question is None or answer is None:
            left_out.append(number)
            continue
        if len(question) > max_chars:
            too_long.append(number)
            continue
        problems.append(Problem(question, answer, number))
        if len(problems) == limit:
            break
    unit = "lines" if Path(path).suffix.lower() in (".jsonl", ".json") else "rows"

    def report(numbers: list[int], what: str) -> None:
        if numbers:
            shown = ", ".join(map(str, numbers[:MAX_REPORTED_LINES]))
            more = ", ..." if len(numbers) > MAX_REPORTED_LINES else ""
            message = f"{path}: left out {len(numbers)} {what}; {unit} {shown}{more}"
            warnings.warn(DataWarning(message), stacklevel=3)

    report(
        left_out,
        f"row(s) with a missing or empty question ({question_key!r}) or answer "
        f"({_answer_source(fmt, answer_key)})",
    )
    report(too_long, f"question(s) over {max_chars} characters (data.max_prompt_chars)")
    if not problems:
        raise InputError(
            f"{path}: none of its {len(rows)} rows has both a question "
            f"({question_key!r}) of at most {max_chars} characters and an answer "
            f"({_answer_source(fmt, answer_key)})"
        )
    return problems


def _answer_source(fmt: str, answer_key: str | None) -> str:
    key = repr(answer_key or DEFAULT_KEYS[fmt][1])
    if fmt == "gsm8k":
        return f"a number after '####' in {key}"
    if fmt == "math":
        return f"{key}, or a \\boxed{{}} in {MATH_SOLUTION_KEY!r}"
    return key


# -- prompts ---------------------------------------------------------------------------------------


def render_prompt(
    question: str,
    tokenizer: Any = None,
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    use_chat_template: bool = True,
    plain_template: str = DEFAULT_PLAIN_TEMPLATE,
) -> str:
    """The prompt text for `question`.

    The message is ``question + "\\n" + instruction`` (the question alone if `instruction` is
    empty). With a tokenizer that has a chat template (and `use_chat_template`), it is the one
    user turn of a chat followed by the assistant's generation prompt; otherwise `plain_template`
    with ``{message}`` replaced by it (a plain replace, so braces in the question are safe).
    """
    if "{message}" not in plain_template:
        raise InputError(f"plain_template must contain {{message}}, got {plain_template!r}")
    message = f"{question}\n{instruction}" if instruction else question
    if use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
    return plain_template.replace("{message}", message)


def load_examples(
    path: str | Path,
    fmt: str,
    tokenizer: Any = None,
    *,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
    max_chars: int = MAX_PROMPT_CHARS,
    instruction: str = DEFAULT_INSTRUCTION,
    use_chat_template: bool = True,
    plain_template: str = DEFAULT_PLAIN_TEMPLATE,
) -> list[Example]:
    """`load_problems`, each rendered by `render_prompt` into an `Example(prompt, answer)`."""
    problems = load_problems(
        path, fmt, prompt_key=prompt_key, answer_key=answer_key, limit=limit, max_chars=max_chars
    )
    return [
        Example(
            render_prompt(
                p.question,
                tokenizer,
                instruction=instruction,
                use_chat_template=use_chat_template,
                plain_template=plain_template,
            ),
            p.answer,
        )
        for p in problems
    ]


# -- answers for majority voting -------------------------------------------------------------------


def load_configured_examples(
    path: str | Path, fmt: str, cfg: DataConfig, tokenizer: Any = None, *, limit: int | None = None
) -> list[Example]:
    """`load_examples` with the keys and prompt rendering of a `DataConfig` `cfg`."""
    return load_examples(
        path,
        fmt,
        tokenizer,
        prompt_key=cfg.prompt_key,
        answer_key=cfg.answer_key,
        limit=limit,
        max_chars=cfg.max_prompt_chars,
        instruction=cfg.instruction,
        use_chat_template=cfg.chat_template,
        plain_template=cfg.plain_template,
    )


def voted_answer(completion: str, reward: str) -> str | None:
    """The final answer of a completion as majority voting compares it; None if it has none.

    ``math``: the last ``\\boxed{}`` content with all whitespace removed (so ``\\frac12`` and
    ``\\frac{1}{2}`` are different votes: voting is on the written answer, not its value).
    ``gsm8k``: the final number, normalised as a decimal (``18.00`` and ``18`` are one vote).
    """
    check_choice("reward", reward, REWARDS)
    if reward == "math":
        boxed = extract_boxed(completion)
        return (_LOOSE_SPACE.sub("", boxed) or None) if boxed is not None else None
    number = extract_gsm8k_answer(completion)
    if number is None:
        return None
    try:
        value = Decimal(number)
    except InvalidOperation:
        return None
    return "0" if value == 0 else format(value.normalize(), "f")


def file_examples(cfg: DataConfig, key: str, tokenizer: Any = None) -> list[Example]:
    """The examples of `data.<key>` (train_file or test_file) for a file task, prompts rendered
    with `tokenizer`'s chat template when it has one. A bad file raises ConfigError naming the
    key; rows left out are reported by a `DataWarning` naming the file."""
    path = getattr(cfg, key)
    if path is None:
        raise ConfigError(f"data.{key}: task {cfg.task!r} reads its problems from a file; set it")
    limit = cfg.train_limit if key == "train_file" else cfg.test_limit
    try:
        return load_configured_examples(path, cfg.task, cfg, tokenizer, limit=limit)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"data.{key}: {e}") from e


def file_task(cfg: DataConfig, tokenizer: Any = None) -> Task:
    """The gsm8k / math / jsonl task of the `data` section: problems from `train_file` and
    `test_file`, scored with `data.reward` or the format's own reward."""
    train = file_examples(cfg, "train_file", tokenizer)
    test = [] if cfg.test_file is None else file_examples(cfg, "test_file", tokenizer)
    reward = cfg.reward if cfg.reward in REWARDS else default_reward(cfg.task)
    return make_task(cfg.task, train, test, reward)  # a user's function replaces it after
