"""Countdown task: verifier, reward, problem generation, enumeration of solutions, JSONL files."""

from __future__ import annotations

import json
from fractions import Fraction
from itertools import permutations

import pytest
from hypothesis import given, settings, strategies as st

from entroprl.tasks.countdown import (
    MAX_EXPRESSION_CHARS,
    CountdownProblem,
    countdown_reward,
    expression_values,
    generate_problems,
    load_jsonl,
    problem_space,
    save_jsonl,
    solutions,
    verify,
)

P = CountdownProblem


def rpn_values(numbers: tuple[int, ...]) -> set[Fraction]:
    """Every value reachable with each number used at most once, by brute force over RPN programs.

    Independent of the library: a stack machine run over every sequence of pushes and operators.
    """
    found: set[Fraction] = set()

    def run(stack: list[Fraction], unused: tuple[int, ...]) -> None:
        if len(stack) == 1:
            found.add(stack[0])
        for i, x in enumerate(unused):
            run([*stack, Fraction(x)], unused[:i] + unused[i + 1 :])
        if len(stack) >= 2:
            a, b = stack[-2], stack[-1]
            rest = stack[:-2]
            run([*rest, a + b], unused)
            run([*rest, a - b], unused)
            run([*rest, a * b], unused)
            if b != 0:
                run([*rest, a / b], unused)

    run([], numbers)
    return found


# ---------------------------------------------------------------- verify


@pytest.mark.parametrize(
    ("expr", "numbers", "target"),
    [
        ("3*5+7", (3, 5, 7), 22),
        (" 3 * 5 + 7 ", (3, 5, 7), 22),
        ("(3*5)+7", (3, 5, 7), 22),
        ("7+5*3", (3, 5, 7), 22),
        ("3+5", (3, 5, 7), 8),  # fewer numbers than given is allowed
        ("7", (3, 5, 7), 7),
        ("3*3+7", (3, 3, 7), 16),  # a repeated number may be used as often as it is given
        ("6/3*4", (3, 4, 6), 8),
        ("8/(4/3)", (3, 4, 8), 6),  # exact fractional intermediate 4/3
        ("(9-5)*6", (9, 5, 6), 24),
        ("5-7+3", (3, 5, 7), 1),  # negative intermediate
        ("12+3", (12, 3, 1), 15),  # multi-digit literal
    ],
)
def test_verify_accepts_correct_answers(expr, numbers, target):
    assert verify(expr, P(numbers, target))


@pytest.mark.parametrize(
    ("expr", "numbers", "target"),
    [
        ("3*5+7", (3, 5, 7), 23),  # wrong value
        ("7+7+5", (3, 5, 7), 19),  # 7 used twice
        ("3*3+7", (3, 5, 7), 16),  # 3 used twice
        ("15+7", (3, 5, 7), 22),  # 15 is not a given number
        ("35-13", (3, 5, 7), 22),  # digits glued into other numbers
        ("5/(1-1)", (1, 1, 5), 5),  # division by zero
        ("8/3", (8, 3, 1), 2),  # 8/3 is not 2 (no floor division)
        ("", (3, 5, 7), 0),
        ("   ", (3, 5, 7), 0),
        ("3*", (3, 5, 7), 3),
        ("3**2", (3, 2, 1), 9),
        ("3//2", (3, 2, 1), 1),
        ("-3+5", (3, 5, 7), 2),
        ("+3", (3, 5, 7), 3),
        ("3 5", (3, 5, 7), 35),
        ("(3)(5)", (3, 5, 7), 15),
        ("3.0+5", (3, 5, 7), 8),
        ("0x3+5", (3, 5, 7), 8),
        ("1_0", (10, 1, 2), 10),
        ("07+1", (7, 1, 2), 8),
        ("3e0", (3, 5, 7), 3),
        ("True+2", (1, 2, 3), 3),
        ("__import__('os')", (1, 2, 3), 0),
        ("3 % 2", (3, 2, 1), 1),
        ("3\n+5", (3, 5, 7), 8),
    ],
)
def test_verify_rejects(expr, numbers, target):
    assert not verify(expr, P(numbers, target))


def test_verify_caps_the_length():
    depth_ok = (MAX_EXPRESSION_CHARS - 1) // 2
    ok = "(" * depth_ok + "3" + ")" * depth_ok
    assert len(ok) <= MAX_EXPRESSION_CHARS
    assert verify(ok, P((3, 5), 3))
    too_long = "(" * (depth_ok + 1) + "3" + ")" * (depth_ok + 1)
    assert len(too_long) > MAX_EXPRESSION_CHARS
    assert not verify(too_long, P((3, 5), 3))


def _tree(numbers: tuple[int, ...]):
    """Strategy: (fully parenthesised text, exact value, literals used) of a tree over `numbers`."""
    leaves = st.sampled_from(numbers).map(lambda x: (str(x), Fraction(x), (x,)))

    def combine(children):
        def join(pair, op):
            (lt, lv, lu), (rt, rv, ru) = pair
            if op == "/" and rv == 0:
                return None
            value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else 0}[op]
            return f"({lt}{op}{rt})", value, lu + ru

        return st.builds(join, st.tuples(children, children), st.sampled_from("+-*/"))

    return st.recursive(leaves, lambda c: combine(c).filter(lambda t: t is not None), max_leaves=4)


@settings(max_examples=150, deadline=None)
@given(
    numbers=st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple),
    data=st.data(),
)
def test_verify_matches_exact_arithmetic_on_random_trees(numbers, data):
    text, value, used = data.draw(_tree(numbers))
    within_multiset = all(used.count(x) <= numbers.count(x) for x in set(used))
    fits = len(text) <= MAX_EXPRESSION_CHARS
    if value.denominator == 1 and value >= 0:
        assert verify(text, P(numbers, int(value))) == (within_multiset and fits)
        assert not verify(text, P(numbers, int(value) + 1))
    else:  # a negative or fractional value matches no integer target around it
        for t in {max(int(value), 0), max(int(value) + 1, 0)}:
            assert not verify(text, P(numbers, t))


# ---------------------------------------------------------------- reward and prompt


def test_prompt_format():
    assert P((3, 5, 7), 22).prompt == "3 5 7>22="
    assert P((12, 1), 4).prompt == "12 1>4="


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("3*5+7", 1.0),
        ("3*5+7<eos>", 1.0),
        ("3*5+7<eos><pad><pad>", 1.0),
        ("3*5+7<eos>garbage after eos", 1.0),
        ("  3*5+7 \n", 1.0),
        ("3*5+7 and more", 0.0),
        ("3*5+8<eos>", 0.0),
        ("<eos>3*5+7", 0.0),
        ("", 0.0),
    ],
)
def test_countdown_reward(completion, reward):
    assert countdown_reward(completion, P((3, 5, 7), 22)) == reward


@pytest.mark.parametrize(
    ("numbers", "target"),
    [((), 3), ((1, -2), 3), ((1, 2), -1), ((1.5, 2), 3), ((True, 2), 3), ((1, 2), "3")],
)
def test_problem_rejects_bad_fields(numbers, target):
    with pytest.raises(ValueError, match="CountdownProblem"):
        P(numbers, target)


# ---------------------------------------------------------------- solutions


@pytest.mark.parametrize(
    ("numbers", "target", "expected"),
    [
        ((2, 3), 6, {"2*3", "3*2"}),
        ((2, 3), 5, {"2+3", "3+2"}),
        ((2, 3), 1, {"3-2"}),
        ((2, 2), 4, {"2+2", "2*2"}),
        ((2, 2), 1, {"2/2"}),
        ((2, 3), 7, set()),
        ((9, 5, 6), 24, {"(9-5)*6", "6*(9-5)"}),
        (
            (2, 3, 4),
            9,
            {"2+3+4", "2+4+3", "3+2+4", "3+4+2", "4+2+3", "4+3+2"},
        ),
        # 0 from {1, 2, 3}: only a difference of equal parts, in every distinct spelling.
        (
            (1, 2, 3),
            0,
            {
                "1+2-3",
                "2+1-3",
                "1-3+2",
                "2-3+1",
                "3-1-2",
                "3-2-1",
                "1-(3-2)",
                "2-(3-1)",
                "3-(1+2)",
                "3-(2+1)",
            },
        ),
    ],
)
def test_solutions_small_cases_by_hand(numbers, target, expected):
    got = solutions(P(numbers, target))
    assert set(got) == expected
    assert len(got) == len(set(got))


def test_solutions_are_sorted_and_truncated():
    p = P((1, 2, 3), 6)
    full = solutions(p)
    assert full == sorted(full, key=lambda s: (len(s), s))
    assert solutions(p, max_solutions=3) == full[:3]
    with pytest.raises(ValueError, match="max_solutions"):
        solutions(p, max_solutions=0)


@settings(max_examples=40, deadline=None)
@given(
    numbers=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    target=st.integers(0, 60),
)
def test_solutions_verify_and_exist_exactly_when_brute_force_finds_one(numbers, target):
    p = P(numbers, target)
    got = solutions(p)
    assert all(verify(s, p) for s in got)
    assert len(got) == len(set(got))
    assert bool(got) == (Fraction(target) in rpn_values(numbers))


def test_solutions_include_every_commuted_form():
    # For each correct a op b (op commutative), b op a is a distinct correct answer.
    for p in generate_problems(30, seed=3):
        got = set(solutions(p))
        for a, b in permutations(p.numbers, 2):
            for op in "+*":
                if f"{a}{op}{b}" in got:
                    assert f"{b}{op}{a}" in got


def test_expression_values_use_all():
    every = expression_values((2, 3), use_all=True)
    assert every == {
        "2+3": 5,
        "3+2": 5,
        "2-3": -1,
        "3-2": 1,
        "2*3": 6,
        "3*2": 6,
        "2/3": Fraction(2, 3),
        "3/2": Fraction(3, 2),
    }
    some = expression_values((2, 3))
    assert some == {**every, "2": 2, "3": 3}


# ---------------------------------------------------------------- problem generation


def test_generate_problems_is_deterministic_and_seeded():
    a = generate_problems(50, seed=7)
    assert a == generate_problems(50, seed=7)
    assert a != generate_problems(50, seed=8)
    assert generate_problems(0, seed=7) == []


def test_generated_problems_are_valid_and_solvable():
    for split in ("train", "test"):
        for p in generate_problems(150, seed=0, split=split, max_target=30):
            assert len(p.numbers) == 3
            assert all(1 <= x <= 9 for x in p.numbers)
            assert 1 <= p.target <= 30
            assert p.target not in p.numbers
            assert p.split == split
            # Reachable using all three numbers (an independent brute force over orders and ops).
            assert any(
                Fraction(p.target) in _all_numbers_values(order)
                for order in permutations(p.numbers)
            )
            assert solutions(p)


def _all_numbers_values(order: tuple[int, ...]) -> set[Fraction]:
    a, b, c = map(Fraction, order)
    ops = [
        lambda x, y: x + y,
        lambda x, y: x - y,
        lambda x, y: x * y,
        lambda x, y: x / y if y else None,
    ]
    out = set()
    for f in ops:
        for g in ops:
            ab = f(a, b)
            if ab is not None and (v := g(ab, c)) is not None:
                out.add(v)
            bc = g(b, c)
            if bc is not None and (v := f(a, bc)) is not None:
                out.add(v)
    return out


def test_train_and_test_are_disjoint_and_cover_the_space():
    key = lambda p: (tuple(sorted(p.numbers)), p.target)  # noqa: E731
    train_space = set(problem_space("train", 3, 9, 20))
    test_space = set(problem_space("test", 3, 9, 20))
    assert train_space and test_space
    assert not train_space & test_space
    # Every (multiset, target) with a target reachable by all three numbers is in one of them.
    expected = set()
    for a in range(1, 10):
        for b in range(a, 10):
            for c in range(b, 10):
                reach = set().union(*(_all_numbers_values(o) for o in permutations((a, b, c))))
                for t in range(1, 21):
                    if t not in (a, b, c) and Fraction(t) in reach:
                        expected.add(((a, b, c), t))
    assert train_space | test_space == expected
    assert 0.1 < len(test_space) / len(expected) < 0.3
    train = {key(p) for p in generate_problems(len(train_space), seed=1, max_target=20)}
    test = {key(p) for p in generate_problems(len(test_space), seed=1, split="test", max_target=20)}
    assert train == train_space  # without replacement while the space lasts
    assert test == test_space


def test_more_problems_than_the_space_repeats_it():
    space = problem_space("test", 2, 4, 8)
    got = generate_problems(
        3 * len(space) + 1, seed=0, split="test", num_numbers=2, max_number=4, max_target=8
    )
    keys = [(tuple(sorted(p.numbers)), p.target) for p in got]
    assert set(keys) == set(space)
    assert len(keys) == 3 * len(space) + 1


def test_generate_problems_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate_problems(3, seed=0, split="validation")
    with pytest.raises(ValueError, match="n must be"):
        generate_problems(-1, seed=0)
    with pytest.raises(ValueError, match="max_number"):
        generate_problems(3, seed=0, max_number=0)
    with pytest.raises(ValueError, match="no test problem"):
        generate_problems(3, seed=0, split="test", num_numbers=1, max_number=1, max_target=1)


# ---------------------------------------------------------------- JSONL


def test_jsonl_round_trip(tmp_path):
    problems = generate_problems(20, seed=2)
    path = tmp_path / "p.jsonl"
    save_jsonl(problems, path)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {
        "numbers": list(problems[0].numbers),
        "target": problems[0].target,
    }
    assert load_jsonl(path) == problems


@pytest.mark.parametrize(
    "bad_line",
    [
        "not json",
        '{"numbers": [1, 2]}',
        '{"numbers": [1, 2], "target": 3, "extra": 1}',
        '{"numbers": 12, "target": 3}',
        '{"numbers": [1, 2.5], "target": 3}',
        '{"numbers": [1, 2], "target": "3"}',
        '{"numbers": [1, true], "target": 3}',
        '{"numbers": [], "target": 3}',
        "[1, 2, 3]",
    ],
)
def test_load_jsonl_names_the_bad_line(tmp_path, bad_line):
    path = tmp_path / "p.jsonl"
    path.write_text('{"numbers": [1, 2], "target": 3}\n\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:3: invalid Countdown problem"):
        load_jsonl(path)
