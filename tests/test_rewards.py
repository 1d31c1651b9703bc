"""Tests of entroprl.tasks.rewards: extraction, math and GSM8K rewards, the never-hang guarantees,
and score_batch.

Expected values are written by hand, built into the generated inputs (hypothesis), or computed by
code in this file (GSM8K's "####" line, math-verify called directly for the math-equal pairs).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from entroprl.tasks import rewards
from entroprl.tasks.rewards import (
    MATH_TIMEOUT_S,
    extract_boxed,
    extract_gsm8k_answer,
    format_reward,
    gsm8k_reward,
    math_reward,
    score_batch,
)
from tests.adversarial_completions import (
    ADVERSARIAL,
    GOLD,
    crashing_reward,
    hijacking_reward,
    pid_reward,
    raising_reward,
    sleepy_reward,
)

SHARED = Path(__file__).parents[2] / "shared"
MATH500 = SHARED / "data" / "math500" / "test.jsonl"
GSM8K = SHARED / "data" / "gsm8k" / "test.jsonl"

# A call's documented bound: the kill of the sympy step after MATH_TIMEOUT_S, plus the start of a
# replacement helper when the previous call killed one (0.7 s idle, up to 1.7 s on a loaded CPU).
CALL_BOUND_S = MATH_TIMEOUT_S + 3.0
# Pure string work (extraction, GSM8K) on a megabyte: a linear scan takes milliseconds, a quadratic
# one minutes. The bound only has to tell the two apart, also on a CPU that other jobs load.
FAST_S = 5.0


def _load(path: Path) -> list[dict]:
    if not path.exists():
        pytest.skip(f"data file {path} is missing (the shared folder sits beside the repository)")
    with path.open() as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module", autouse=True)
def _warm_helpers():
    """Start the helper processes once so that timed calls do not count their start."""
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(math_reward, ["\\boxed{1}"] * 4, ["1"] * 4)) == [1.0] * 4


# ---------------------------------------------------------------------------------------------
# extract_boxed / format_reward


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed {7}", "7"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{a \\\\ {b}}", "a \\\\ {b}"),
        ("\\boxed{}", ""),
        ("no box here", None),
        ("\\boxed{1} and \\boxed{2", None),
        ("\\boxed{12\\}", None),
        ("\\boxed 5", None),
        ("\\boxed{\\boxed{3}}", "3"),
    ],
)
def test_extract_boxed_cases(text, expected):
    assert extract_boxed(text) == expected


_PLAIN = st.text(alphabet=st.characters(blacklist_characters="\\{}", codec="utf-8"), max_size=8)
_CONTENT = st.recursive(
    st.lists(st.one_of(_PLAIN, st.sampled_from(["\\{", "\\}", "\\alpha ", "\\\\"])), max_size=4),
    lambda inner: st.lists(
        st.one_of(_PLAIN, inner.map(lambda parts: ["{", *parts, "}"])), max_size=4
    ),
    max_leaves=20,
)


def _flatten(parts) -> str:
    return "".join(p if isinstance(p, str) else _flatten(p) for p in parts)


@settings(max_examples=200, deadline=None)
@given(prefix=_PLAIN, content=_CONTENT, suffix=_PLAIN, earlier=st.booleans())
def test_extract_boxed_returns_the_balanced_content_it_was_built_from(
    prefix, content, suffix, earlier
):
    body = _flatten(content)
    text = ("\\boxed{9} " if earlier else "") + prefix + "\\boxed{" + body + "}" + suffix
    assert extract_boxed(text) == body


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" + "{" * 1_000_000,
        "\\boxed{" * 200_000,
        "\\boxed{" + "\\{" * 500_000,
        "x" * 1_000_000,
    ],
)
def test_extract_boxed_is_fast_on_a_megabyte(text):
    start = time.perf_counter()
    assert extract_boxed(text) is None
    assert time.perf_counter() - start < FAST_S


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}", 1.0),
        ("\\boxed{ 42 } is it", 1.0),
        ("no box", 0.0),
        ("\\boxed{1} \\boxed{2}", 0.0),
        ("\\boxed{\\boxed{2}}", 0.0),
        ("\\boxed{}", 0.0),
        ("\\boxed{  }", 0.0),
        ("\\boxed{42", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward(text, expected):
    assert format_reward(text) == expected


# ---------------------------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,450,000", "1450000"),
        ("#### -10", "-10"),
        ("####$5.50", "5.50"),
        ("##### 7 and later #### 8", "8"),
        ("#### Step 1: 3 + 4 = 7\nSo \\boxed{\\$1,234.}", "1234"),
        ("#### Step 2\nthe total is 12.", "12"),
        ("\\boxed{18 \\text{ dollars}} and 99 later", "18"),
        ("\\boxed{\\text{eighteen}} and 99 later", None),
        ("It costs $1,000.", "1000"),
        ("from 3-4 to 1,2,3", "3"),
        ("pick 2.5.", "2.5"),
        ("x - 5", "5"),
        ("= -5", "-5"),
        ("no numbers", None),
        ("9" * 65, None),
        ("9" * 64, "9" * 64),
        ("٤٢", None),
        (None, None),
    ],
)
def test_extract_gsm8k_answer_cases(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_extract_gsm8k_answer_finds_the_last_number_anywhere():
    tail = " a" * 500_000
    assert extract_gsm8k_answer("total 123456" + tail) == "123456"
    assert extract_gsm8k_answer("x 1234,567" + tail) == "567"
    assert extract_gsm8k_answer("x" * 300 + "1234,567") == "567"
    assert extract_gsm8k_answer("9" * 200 + tail) is None  # longer than 64 characters
    assert extract_gsm8k_answer("7 then " + "9" * 200 + tail) is None
    # A run of number characters longer than the 256-character window: undecidable, so None.
    assert extract_gsm8k_answer(",".join(map(str, range(1, 100))) + " done") is None
    assert extract_gsm8k_answer(", ".join(map(str, range(1, 100))) + " done") == "99"


_WORDS = st.text(alphabet="abc xyz!?\n", max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    value=st.decimals(min_value=-(10**9), max_value=10**9, places=2, allow_nan=False),
    commas=st.booleans(),
    dollar=st.booleans(),
    trailing_dot=st.booleans(),
    form=st.sampled_from(["hash", "boxed", "last"]),
    before=_WORDS,
    after=_WORDS,
)
def test_gsm8k_reward_reads_formatted_numbers(
    value, commas, dollar, trailing_dot, form, before, after
):
    number = f"{value:,}" if commas else f"{value}"
    number = "$" + number if dollar else number
    text = {
        "hash": f"{before}\n#### {number}",
        "boxed": f"{before} \\boxed{{{number}}} {after} 777",
        "last": f"{before} {number}{'.' if trailing_dot else ''}",
    }[form]
    assert gsm8k_reward(text, f"#### {value}") == 1.0
    assert gsm8k_reward(text, str(value + 1)) == 0.0
    assert Decimal(extract_gsm8k_answer(text)) == value


def _gsm8k_gold() -> list[tuple[str, str]]:
    rows = _load(GSM8K)
    return [(r["answer"], r["answer"].split("####")[-1].strip().replace(",", "")) for r in rows]


def test_gsm8k_gold_answers_agree():
    gold = _gsm8k_gold()
    agree = sum(gsm8k_reward(text, answer) for text, answer in gold) / len(gold)
    print(f"GSM8K gold agreement: {agree:.4f} of {len(gold)}")
    assert agree >= 0.995


def test_gsm8k_without_hash_line_uses_box_then_last_number():
    gold = _gsm8k_gold()
    boxed = [(t.split("####")[0] + f"So the answer is \\boxed{{{a}}}.", a) for t, a in gold]
    last = [(t.split("####")[0] + f"So the answer is {a}.", a) for t, a in gold]
    for name, pairs in (("boxed", boxed), ("last number", last)):
        agree = sum(gsm8k_reward(text, answer) for text, answer in pairs) / len(pairs)
        print(f"GSM8K {name} agreement: {agree:.4f}")
        assert agree >= 0.995


def test_gsm8k_other_problems_answers_score_zero():
    gold = _gsm8k_gold()
    n = len(gold)
    pairs = [(gold[i][0], gold[(i + 1) % n][1]) for i in range(n)]
    pairs = [
        (t, a) for t, a in pairs if Decimal(a) != Decimal(t.split("####")[-1].replace(",", ""))
    ]
    assert sum(gsm8k_reward(t, a) for t, a in pairs) == 0.0


# ---------------------------------------------------------------------------------------------
# math_reward


@pytest.mark.parametrize(
    ("completion", "ground_truth", "expected"),
    [
        ("so $\\boxed{\\frac{1}{2}}$", "0.5", 1.0),
        ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", 1.0),
        ("\\boxed{x = 5}", "5", 1.0),
        ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", 1.0),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("\\boxed{(1, 2]}", "(1,2]", 1.0),
        ("\\boxed{2^{10}}", "1024", 1.0),
        ("\\boxed{10^{4}}", "10000", 1.0),
        ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1.0),
        ("first \\boxed{3} then \\boxed{\\frac{1}{2}}", "\\frac12", 1.0),
        ("\\boxed{0.5}", "The answer is \\boxed{\\frac{1}{2}}.", 1.0),
        ("\\boxed{" + "1" * 100 + "}", "1" * 100, 1.0),
        ("\\boxed{" + "\\frac{1}{" * 10 + "7" + "}" * 10 + "}", "7", 1.0),
        ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
        ("\\boxed{x = 6}", "5", 0.0),
        ("\\boxed{\\{1, 3\\}}", "\\{1,2\\}", 0.0),
        ("\\boxed{(1, 2)}", "(1,2]", 0.0),
        ("the answer is 0.5", "0.5", 0.0),
        ("\\boxed{0.5", "0.5", 0.0),
        ("\\boxed{}", "0.5", 0.0),
        ("\\boxed{0.5}", "", 0.0),
        ("\\boxed{" + "1" * 101 + "}", "1" * 101, 0.0),
        ("\\boxed{" + "\\frac{1}{" * 12 + "7" + "}" * 12 + "}", "7", 0.0),
        ("\\boxed{" + "1" * 1001 + "}", "1", 0.0),
        (None, "1", 0.0),
        ("\\boxed{1}", None, 0.0),
        (b"\\boxed{1}", "1", 0.0),
    ],
)
def test_math_reward_cases(completion, ground_truth, expected):
    assert math_reward(completion, ground_truth) == expected


@settings(max_examples=30, deadline=None)
@given(
    p=st.integers(-500, 500),
    q=st.integers(1, 500),
    k=st.integers(1, 9),
)
def test_math_reward_on_fractions(p, q, k):
    reference = Fraction(p, q)
    gold = f"{reference.numerator}/{reference.denominator}"
    assert math_reward(f"\\boxed{{\\frac{{{k * p}}}{{{k * q}}}}}", gold) == 1.0
    assert math_reward(f"\\boxed{{\\frac{{{k * p + 1}}}{{{k * q}}}}}", gold) == 0.0


def _math_verify_equal(a: str, b: str) -> bool:
    """math-verify called directly (main thread, its own timeouts): are two answers equal?"""
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]
    parsed_a, parsed_b = parse(f"\\boxed{{{a}}}", config), parse(f"\\boxed{{{b}}}", config)
    return verify(parsed_a, parsed_b) or verify(parsed_b, parsed_a)


def test_math500_gold_solutions_score_one_and_other_answers_zero():
    rows = _load(MATH500)
    n = len(rows)
    solutions = [r["solution"] for r in rows]
    answers = [r["answer"] for r in rows]
    others = [answers[(i + 1) % n] for i in range(n)]
    start = time.perf_counter()
    gold = score_batch(math_reward, solutions, answers, num_workers=2, timeout=CALL_BOUND_S)
    crossed = score_batch(math_reward, solutions, others, num_workers=2, timeout=CALL_BOUND_S)
    seconds = time.perf_counter() - start
    failures = [answers[i] for i in range(n) if gold[i] != 1.0]
    # Negatives: pairs with different answer strings. A pair scored 1.0 is a false positive unless
    # math-verify, called directly, finds its two answers equal (then it is no negative at all).
    negatives = [i for i in range(n) if answers[i].strip() != others[i].strip()]
    equal = [
        i for i in negatives if crossed[i] != 0.0 and _math_verify_equal(answers[i], others[i])
    ]
    negatives = [i for i in negatives if i not in equal]
    false_positives = [(answers[i], others[i]) for i in negatives if crossed[i] != 0.0]
    print(
        f"MATH-500 gold: {1 - len(failures) / n:.4f}, failures {failures}; false positives "
        f"{len(false_positives)}/{len(negatives)}: {false_positives}; math-equal pairs "
        f"{[(answers[i], others[i]) for i in equal]}; {2 * n} calls in {seconds:.1f} s"
    )
    assert len(failures) <= 0.01 * n
    assert len(negatives) >= 0.98 * n
    assert len(false_positives) <= 0.01 * len(negatives)


# ---------------------------------------------------------------------------------------------
# The never-hang guarantees


def test_there_are_at_least_fifty_adversarial_completions():
    assert len(ADVERSARIAL) >= 50


def _timed(fn, completion, ground_truth):
    start = time.perf_counter()
    value = fn(completion, ground_truth)
    return value, time.perf_counter() - start


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_completion_scores_zero_in_bounded_time(name):
    completion = ADVERSARIAL[name]
    value, seconds = _timed(math_reward, completion, GOLD)
    assert value == 0.0
    assert seconds < CALL_BOUND_S
    value, seconds = _timed(gsm8k_reward, completion, GOLD)
    assert value == 0.0
    assert seconds < FAST_S
    assert format_reward(completion) in (0.0, 1.0)


def test_adversarial_completions_from_worker_threads():
    names = sorted(ADVERSARIAL)
    with ThreadPoolExecutor(4) as pool:
        math_results = list(pool.map(lambda n: _timed(math_reward, ADVERSARIAL[n], GOLD), names))
        gsm_results = list(pool.map(lambda n: _timed(gsm8k_reward, ADVERSARIAL[n], GOLD), names))
    for name, (value, seconds) in zip(names, math_results, strict=True):
        assert value == 0.0, name
        assert seconds < CALL_BOUND_S, name
    for name, (value, seconds) in zip(names, gsm_results, strict=True):
        assert value == 0.0, name
        assert seconds < 4 * FAST_S, name  # four threads share the interpreter lock


def test_adversarial_completions_through_score_batch():
    completions = list(ADVERSARIAL.values())
    golds = [GOLD] * len(completions)
    for fn in (math_reward, gsm8k_reward):
        start = time.perf_counter()
        scores = score_batch(fn, completions, golds, num_workers=2, timeout=CALL_BOUND_S)
        assert scores == [0.0] * len(completions)
        assert time.perf_counter() - start < 60.0


def test_math_reward_works_from_a_thread_and_gives_correct_rewards():
    results = []
    thread = threading.Thread(
        target=lambda: results.extend(
            [math_reward("\\boxed{\\frac{2}{4}}", "0.5"), math_reward("\\boxed{3}", "0.5")]
        )
    )
    thread.start()
    thread.join(timeout=30)
    assert results == [1.0, 0.0]


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_math_reward_works_in_a_daemonic_pool_process(method):
    # Daemonic processes may not start multiprocessing children; a forked child must not reuse
    # the parent's helpers.
    with multiprocessing.get_context(method).Pool(1) as pool:
        assert pool.apply(math_reward, ("\\boxed{\\frac{2}{4}}", "0.5")) == 1.0
        assert pool.apply(math_reward, ("\\boxed{10^{10^{10}}}", "1")) == 0.0


def test_a_hung_sympy_step_is_killed_and_the_helper_replaced():
    start = time.perf_counter()
    assert rewards._run_bounded(sleepy_reward, ("sleep", "sleep"), 1.0) == 0.0
    assert time.perf_counter() - start < 1.0 + 1.0
    value, seconds = _timed(math_reward, "\\boxed{\\frac{2}{4}}", "0.5")
    assert value == 1.0
    assert seconds < CALL_BOUND_S


def test_math_reward_is_fast_on_ordinary_answers():
    math_reward("\\boxed{\\frac{1}{2}}", "0.5")
    start = time.perf_counter()
    for _ in range(20):
        assert math_reward("so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    per_call = (time.perf_counter() - start) / 20
    print(f"math_reward: {per_call * 1e3:.2f} ms per ordinary call")
    assert per_call < 0.1


# ---------------------------------------------------------------------------------------------
# score_batch


def test_score_batch_matches_the_hand_computed_rewards_in_order():
    completions = ["#### 18", "\\boxed{7}", "the answer is 3.", "nothing", "#### 1,000"]
    golds = ["18", "#### 7", "4", "0", "1000"]
    expected = [1.0, 1.0, 0.0, 0.0, 1.0]
    assert score_batch(gsm8k_reward, completions, golds, num_workers=0) == expected
    assert score_batch(gsm8k_reward, completions, golds, num_workers=2) == expected
    assert score_batch(gsm8k_reward, [], [], num_workers=2) == []


def test_score_batch_runs_in_process_for_zero_or_one_worker_and_in_workers_otherwise():
    me = float(os.getpid())
    for workers in (0, 1):
        assert score_batch(pid_reward, ["a", "b"], ["a", "b"], num_workers=workers) == [me, me]
    pids = score_batch(pid_reward, list("abcd"), list("abcd"), num_workers=2)
    assert me not in pids
    assert len(set(pids)) <= 2


def test_score_batch_kills_and_replaces_a_hung_worker():
    completions = ["a", "sleep", "b", "c", "d"]
    start = time.perf_counter()
    scores = score_batch(sleepy_reward, completions, completions, num_workers=2, timeout=1.0)
    assert scores == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert time.perf_counter() - start < 1.0 + CALL_BOUND_S


def test_score_batch_survives_crashes_exceptions_and_nan():
    completions = ["a", "crash", "b", "crash", "c"]
    assert score_batch(crashing_reward, completions, completions, num_workers=2) == [
        1.0,
        0.0,
        1.0,
        0.0,
        1.0,
    ]
    completions = ["raise", "a", "nan", "b"]
    expected = [0.0, 1.0, 0.0, 1.0]
    assert score_batch(raising_reward, completions, completions, num_workers=2) == expected
    assert score_batch(raising_reward, completions, completions, num_workers=0) == expected


def test_score_batch_from_a_worker_thread():
    completions = ["\\boxed{\\frac{2}{4}}", "\\boxed{3}", "\\boxed{9^{9^{9^9}}}"]
    with ThreadPoolExecutor(2) as pool:
        future = pool.submit(score_batch, math_reward, completions, ["0.5"] * 3, num_workers=2)
        assert future.result(timeout=60) == [1.0, 0.0, 0.0]


def test_score_batch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="differ in length"):
        score_batch(gsm8k_reward, ["a"], [], num_workers=0)
    with pytest.raises(ValueError, match="num_workers"):
        score_batch(gsm8k_reward, ["a"], ["a"], num_workers=-1)
    for timeout in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout"):
            score_batch(gsm8k_reward, ["a"], ["a"], timeout=timeout)
    with pytest.raises(ValueError, match="picklable"):
        score_batch(lambda c, g: 1.0, ["a", "b"], ["a", "b"], num_workers=2)


def test_score_batch_names_a_reward_fn_the_workers_cannot_load(monkeypatch):
    ghost = types.ModuleType("entroprl_ghost_module_for_tests")

    def ghost_reward(completion, ground_truth):
        return 1.0

    ghost_reward.__module__ = ghost.__name__
    ghost_reward.__qualname__ = "ghost_reward"
    ghost.ghost_reward = ghost_reward
    monkeypatch.setitem(sys.modules, ghost.__name__, ghost)
    with pytest.raises(ValueError, match="could not be loaded"):
        score_batch(ghost_reward, ["a", "b"], ["a", "b"], num_workers=2)


def test_a_compromised_helper_cannot_run_code_in_the_caller(tmp_path):
    """Helpers reply in JSON: a pickle sent by a hijacked helper is never loaded by the caller
    (loading it would create the directory), and the item scores 0.0."""
    markers = [str(tmp_path / "pwned-a"), str(tmp_path / "pwned-b")]
    assert score_batch(hijacking_reward, markers, ["x", "y"], num_workers=2) == [0.0, 0.0]
    assert rewards._run_bounded(hijacking_reward, (str(tmp_path / "pwned-c"), "x"), 5.0) == 0.0
    assert list(tmp_path.iterdir()) == []
