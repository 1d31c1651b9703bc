"""Countdown: reach a target from a few small numbers with + - * / (each number at most once).

The built-in verifiable task of the demo. A problem is shown to a character-level model as a short
prompt, ``"3 5 7>22="``, and the model answers with an arithmetic expression such as ``"3*5+7"``
followed by EOS. The verifier is exact: the expression is parsed with `ast` (never evaluated as
Python), computed with `fractions.Fraction`, and must use each given number at most once.

Problem space. For every multiset of `num_numbers` numbers in ``1..max_number``, the targets are
the integers in ``1..max_target`` reachable by an expression that uses *all* the numbers, leaving
out targets equal to one of the numbers (a one-number answer). Answers may still use fewer numbers.
Each (multiset, target) pair belongs to the train or the test split by a hash of the pair, so the
splits are disjoint and stable across calls, seeds and machines.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from itertools import combinations_with_replacement, permutations
from pathlib import Path
from typing import Any

from entroprl.algos.checks import check_choice
from entroprl.errors import ConfigError, InputError
from entroprl.tasks.base import Example, Task
from entroprl.tasks.data import DataConfig

MAX_EXPRESSION_CHARS = 64
"""Longer answers are rejected before parsing (bounds the parser's work on adversarial text)."""

TEST_PERCENT = 20
"""Share of the problem space, in percent, that belongs to the test split."""

EOS_TEXT = "<eos>"

_ALLOWED_CHARS = frozenset("0123456789+-*/() ")
_OPS = "+-*/"
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


@dataclass(frozen=True)
class CountdownProblem:
    """Numbers available (each usable at most once) and the target to reach."""

    numbers: tuple[int, ...]
    target: int

    def __post_init__(self) -> None:
        if not self.numbers:
            raise InputError("CountdownProblem.numbers is empty")
        for x in (*self.numbers, self.target):
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise InputError(
                    f"CountdownProblem needs non-negative ints, got numbers={self.numbers!r} "
                    f"target={self.target!r}"
                )

    @property
    def prompt(self) -> str:
        """Prompt text, e.g. ``"3 5 7>22="``: numbers, ``>``, target, ``=``."""
        return " ".join(map(str, self.numbers)) + f">{self.target}="

    @property
    def split(self) -> str:
        """``"test"`` or ``"train"``: a hash of the sorted numbers and the target decides."""
        return _split_of(tuple(sorted(self.numbers)), self.target)


def _split_of(sorted_numbers: tuple[int, ...], target: int) -> str:
    key = f"{','.join(map(str, sorted_numbers))}|{target}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b


@cache
def _reachable_with_all(numbers: tuple[int, ...]) -> frozenset[Fraction]:
    """Values of every expression using each of the sorted `numbers` exactly once (exact).

    Cached on the sorted tuple, so the sub-multisets shared between problems are computed once.
    """
    if len(numbers) == 1:
        return frozenset({Fraction(numbers[0])})
    out: set[Fraction] = set()
    n = len(numbers)
    splits = {
        (
            tuple(numbers[i] for i in range(n) if mask >> i & 1),
            tuple(numbers[i] for i in range(n) if not mask >> i & 1),
        )
        for mask in range(1, (1 << n) - 1)
    }
    for left, right in splits:
        for a in _reachable_with_all(left):
            for b in _reachable_with_all(right):
                for op in _OPS:
                    v = _apply(op, a, b)
                    if v is not None:
                        out.add(v)
    return frozenset(out)


@cache
def problem_space(
    split: str, num_numbers: int, max_number: int, max_target: int
) -> tuple[tuple[tuple[int, ...], int], ...]:
    """All (sorted numbers, target) pairs of one split, in a fixed order (see module docstring)."""
    check_choice("split", split, ("train", "test"))
    if num_numbers < 1 or max_number < 1 or max_target < 1:
        raise InputError(
            f"num_numbers, max_number and max_target must be >= 1, got {num_numbers}, "
            f"{max_number}, {max_target}"
        )
    pairs = []
    for nums in combinations_with_replacement(range(1, max_number + 1), num_numbers):
        reachable = _reachable_with_all(nums)
        for target in range(1, max_target + 1):
            if target in nums or Fraction(target) not in reachable:
                continue
            if _split_of(nums, target) == split:
                pairs.append((nums, target))
    return tuple(pairs)


def generate_problems(
    n: int,
    *,
    seed: int,
    split: str = "train",
    num_numbers: int = 3,
    max_number: int = 9,
    max_target: int = 40,
) -> list[CountdownProblem]:
    """`n` solvable problems of one split, deterministic in `seed`.

    Problems are drawn without replacement from the split's problem space; when `n` exceeds its
    size, further passes over a reshuffled space follow (problems repeat only then). The numbers
    of each problem are shown in a random order.
    """
    if n < 0:
        raise InputError(f"n must be >= 0, got {n}")
    space = problem_space(split, num_numbers, max_number, max_target)
    if not space:
        raise InputError(
            f"no {split} problem with num_numbers={num_numbers}, max_number={max_number}, "
            f"max_target={max_target}"
        )
    rng = random.Random(seed)
    out: list[CountdownProblem] = []
    while len(out) < n:
        order = list(range(len(space)))
        rng.shuffle(order)
        for i in order[: n - len(out)]:
            nums, target = space[i]
            shown = list(nums)
            rng.shuffle(shown)
            out.append(CountdownProblem(tuple(shown), target))
    return out


def _evaluate(node: ast.AST, used: list[int]) -> Fraction | None:
    """Exact value of an arithmetic AST, collecting its literals into `used`; None if disallowed."""
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:
            return None
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        left = _evaluate(node.left, used)
        right = _evaluate(node.right, used)
        if left is None or right is None:
            return None
        return _apply(_AST_OPS[type(node.op)], left, right)
    return None


def verify(expression: str, problem: CountdownProblem) -> bool:
    """True iff `expression` is an arithmetic expression over `problem.numbers` equal to the target.

    Allowed: non-negative integer literals, binary ``+ - * /``, parentheses, spaces between
    tokens. Each given number may be used at most once (as a multiset). Division is exact;
    division by zero, unary operators, other characters, malformed text and text longer than
    `MAX_EXPRESSION_CHARS` make it False.
    """
    if len(expression) > MAX_EXPRESSION_CHARS or not set(expression) <= _ALLOWED_CHARS:
        return False
    try:
        # A leading space would be an indentation error to the parser.
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return False
    used: list[int] = []
    value = _evaluate(tree.body, used)
    if value is None:
        return False
    if Counter(used) - Counter(problem.numbers):
        return False
    return value == problem.target


def extract_answer(completion: str) -> str:
    """The answer part of a decoded response: text before the first EOS marker, stripped."""
    return completion.split(EOS_TEXT, 1)[0].strip()


def countdown_reward(completion: str, problem: CountdownProblem) -> float:
    """1.0 if the decoded response (cut at EOS, whitespace stripped) verifies, else 0.0."""
    return 1.0 if verify(extract_answer(completion), problem) else 0.0


def _expressions(items: tuple[int, ...]) -> Iterator[tuple[str, int, Fraction]]:
    """(text, precedence, value) of every expression tree over `items` in this left-to-right order.

    Text uses the fewest parentheses that keep the tree's value: a child is wrapped when it binds
    looser than its parent, and a right child of equal precedence is wrapped under ``-`` and ``/``.
    """
    if len(items) == 1:
        yield str(items[0]), 3, Fraction(items[0])
        return
    for cut in range(1, len(items)):
        lefts = list(_expressions(items[:cut]))
        rights = list(_expressions(items[cut:]))
        for op in _OPS:
            prec = _PRECEDENCE[op]
            for lt, lp, lv in lefts:
                ltext = f"({lt})" if lp < prec else lt
                for rt, rp, rv in rights:
                    value = _apply(op, lv, rv)
                    if value is None:
                        continue
                    wrap = rp < prec or (rp == prec and op in "-/")
                    yield f"{ltext}{op}({rt})" if wrap else f"{ltext}{op}{rt}", prec, value


def expression_values(numbers: tuple[int, ...], *, use_all: bool = False) -> dict[str, Fraction]:
    """Every distinct expression over `numbers` (each used at most once) mapped to its value.

    Every ordering of every sub-multiset of the numbers (of all of them with `use_all`), every
    operator and every bracketing is tried; each is written with the fewest parentheses, so
    ``a+(b+c)`` and ``(a+b)+c`` are the one text ``a+b+c``, while ``a+b+c`` and ``b+a+c`` are two.
    Expressions that divide by zero are left out.
    """
    out: dict[str, Fraction] = {}
    sizes = [len(numbers)] if use_all else range(1, len(numbers) + 1)
    for size in sizes:
        for idx in permutations(range(len(numbers)), size):
            for text, _, value in _expressions(tuple(numbers[i] for i in idx)):
                out[text] = value
    return out


def solutions(problem: CountdownProblem, *, max_solutions: int | None = None) -> list[str]:
    """Distinct correct answers (see `expression_values`), shortest first then in string order.

    Every returned string passes `verify`; `max_solutions` keeps the first ones.
    """
    if max_solutions is not None and max_solutions < 1:
        raise InputError(f"max_solutions must be >= 1 or None, got {max_solutions}")
    found = [t for t, v in expression_values(problem.numbers).items() if v == problem.target]
    ordered = sorted(found, key=lambda s: (len(s), s))
    return ordered if max_solutions is None else ordered[:max_solutions]


def save_jsonl(problems: Iterable[CountdownProblem], path: str | Path) -> None:
    """Write one JSON object per line: ``{"numbers": [...], "target": ...}``."""
    with Path(path).open("w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"numbers": list(p.numbers), "target": p.target}) + "\n")


def load_jsonl(path: str | Path) -> list[CountdownProblem]:
    """Read problems written by `save_jsonl`; blank lines are skipped.

    Raises ValueError naming the file and line number of the first invalid line.
    """
    path = Path(path)
    problems = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or set(record) != {"numbers", "target"}:
                    raise InputError('expected an object with exactly "numbers" and "target"')
                numbers = record["numbers"]
                if not isinstance(numbers, list):
                    raise InputError('"numbers" must be a list of ints')
                problems.append(CountdownProblem(tuple(numbers), record["target"]))
            except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
                raise InputError(f"{path}:{lineno}: invalid Countdown problem: {err}") from None
    return problems


def countdown_task(cfg: DataConfig, tokenizer: Any = None) -> Task:
    """The Countdown task of the `data` section: problems generated (`train_size`, `test_size`,
    `seed`) or read from `train_file` / `test_file`. Its prompts are the model's own short
    format: the tokenizer plays no part."""

    def problems(file: str | None, size: int, split: str, key: str):
        if file is None:
            return generate_problems(size, seed=cfg.seed, split=split)
        if not Path(file).is_file():
            raise ConfigError(f"data.{key}: file not found: {file}")
        return load_jsonl(file)

    train = problems(cfg.train_file, cfg.train_size, "train", "train_file")
    test = problems(cfg.test_file, cfg.test_size, "test", "test_file")
    as_examples = lambda ps: [Example(p.prompt, p) for p in ps]  # noqa: E731
    return Task("countdown", as_examples(train), as_examples(test), countdown_reward)
