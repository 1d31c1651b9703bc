"""Completions designed to hang, crash or fool the math and GSM8K rewards, and reward functions that
misbehave on purpose (for `score_batch`). Kept apart from the tests so that sandbox processes can
import it cheaply.

Every completion is wrong against `GOLD` ("42") and must score 0.0, quickly, without raising.
"""

from __future__ import annotations

import os
import sys
import time

GOLD = "42"

_MB = 1_000_000


def _box(content: str) -> str:
    return f"The final answer is $\\boxed{{{content}}}$."


ADVERSARIAL: dict[str, str] = {
    # Numbers too large to build.
    "python_power_tower": _box("9**9**9**9"),
    "latex_power_tower": _box("9^{9^{9^{9}}}"),
    "ten_tower": _box("10^{10^{10}}"),
    "negative_ten_tower": _box("10^{-10^{10}}"),
    "sqrt_of_tower": _box("\\sqrt{10^{10^{10}}}"),
    "reciprocal_tower": _box("\\frac{1}{10^{10^{10}}}"),
    "cancelling_towers": _box("10^{10^{10}} - 10^{10^{10}} + 41"),
    "two_tower": _box("2^{2^{2^{2^{2^{2}}}}}"),
    "e_tower": _box("e^{e^{e^{100}}}"),
    "root_tower": _box("\\sqrt[10^{10}]{2}^{10^{10}}"),
    "huge_power": _box("99999^{99999}"),
    "huge_power_of_e": _box("e^{10^{9}}"),
    "power_of_ten_power": _box("(10^{100})^{10^{100}}"),
    "scientific_overflow": _box("1e100000000"),
    "ten_thousand_nines": _box("9" * 10_000),
    "symbolic_huge_exponent": _box("x^{10^{10}}"),
    "polynomial_blowup": _box("(x+1)^{9999} - (x-1)^{9999}"),
    "huge_factorial": _box("1000000!"),
    "factorial_of_power": _box("(10^{10})!"),
    "double_factorial": _box("100000!!"),
    "nested_factorial": _box("((10!)!)!"),
    "huge_binomial": _box("\\binom{10^{10}}{5000}"),
    "huge_gamma": _box("\\Gamma(10^{9})"),
    "huge_sum": _box("\\sum_{k=1}^{10^{12}} k^{k}"),
    "huge_product": _box("\\prod_{k=1}^{10^{7}} k"),
    "huge_integral": _box("\\int_0^{10^{10}} e^{-x^2} \\sin(x^{x}) \\, dx"),
    "matrix_power": _box("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}^{100000}"),
    "big_matrix": _box(
        "\\begin{pmatrix}" + "\\\\".join("&".join(["9"] * 12) for _ in range(6)) + "\\end{pmatrix}"
    ),
    # Structure: nesting, braces, chains.
    "deep_braces_10000": _box("{" * 10_000 + "1" + "}" * 10_000),
    "deep_parens_10000": _box("(" * 10_000 + "1" + ")" * 10_000),
    "deep_frac_chain": _box("\\frac{1}{" * 500 + "2" + "}" * 500),
    "wide_frac_chain": _box("+".join(["\\frac{1}{3}"] * 80)),
    "frac_without_arguments": _box("\\frac" * 300),
    "unclosed_box": "so the answer is \\boxed{41",
    "unclosed_braces_in_box": "\\boxed{" + "{" * 1000 + "41",
    "closing_braces_only": "\\boxed}}}}}}" + "}" * 1000,
    "escaped_closing_brace": "\\boxed{41\\}",
    "empty_box": "\\boxed{}",
    "blank_box": "\\boxed{   \n\t }",
    "box_of_braces": "\\boxed{{}{}{{}}}",
    "nested_boxes": "\\boxed{" * 5000 + "41" + "}" * 5000,
    "many_boxes": "\\boxed{41}" * 100_000,
    "mismatched_delimiters": _box("\\left(\\right]\\left\\{ 41"),
    "backslash_soup": _box("\\\\\\\\\\\\"),
    "unknown_commands": _box("\\foo{\\bar}{\\baz{41}}"),
    "array_spec_bomb": _box("\\begin{array}{" + "c" * 900 + "}\\end{array}"),
    "long_text_answer": _box("\\text{" + "a" * 900 + "}"),
    "division_by_zero": _box("\\frac{41}{0}"),
    "infinity_minus_infinity": _box("\\infty - \\infty"),
    "equation_chain": _box("=".join(["x"] * 400)),
    # Bytes and unicode.
    "null_bytes": _box("\x00\x00\x00") + "\x00" * 1000,
    "control_characters": _box("\x1b[31m41\x1b[0m\x07"),
    "lone_surrogate": _box("\ud800"),
    "reversed_surrogates": "\udfff\ud800 " + _box("\udfff\ud800"),
    "invalid_unicode_escape": _box("\\u12G4\\x4"),
    "arabic_indic_digits": _box("٤١") + " ٤١",
    "right_to_left_override": _box("\u202e24\u202c"),
    "zero_width_joiners": _box("4\u200d1"),
    # Size and pathological patterns for the extractors.
    "megabyte_of_text_then_box": "a" * _MB + _box("41"),
    "box_then_megabyte_of_text": _box("41") + " word" * (_MB // 5),
    "megabyte_answer_in_box": _box("1+" * (_MB // 2) + "1"),
    "megabyte_of_backslashes": "\\" * _MB,
    "megabyte_of_digits": "1" * _MB,
    "megabyte_of_dollars": "$" * _MB,
    "megabyte_of_hashes": "#" * _MB,
    "hashes_then_huge_number": "#### " + "9" * _MB,
    "comma_chain": "1," * (_MB // 2),
    "thousands_chain": "999," * (_MB // 4) + "999",
    "minus_signs": "-" * _MB + "41",
    "dots": "." * _MB + "41",
    "final_answer_anchors": "final answer is " * 50_000,
    "inline_math_soup": "\\(" * 100_000 + "\\)" * 100_000,
    "dollar_pairs": "$1$ " * 100_000 + "41",
    "markdown_heading_number": "#### 1. Setup\nThe result is 41.",
}


def sleepy_reward(completion: str, ground_truth: str) -> float:
    """Hangs on "sleep", otherwise 1.0 when the completion equals the reference."""
    if completion == "sleep":
        time.sleep(3600)
    return float(completion == ground_truth)


def crashing_reward(completion: str, ground_truth: str) -> float:
    """Kills its own process on "crash", otherwise 1.0 when the completion equals the reference."""
    if completion == "crash":
        os._exit(3)
    return float(completion == ground_truth)


def raising_reward(completion: str, ground_truth: str) -> float:
    """Raises on "raise", returns NaN on "nan", otherwise 1.0 when equal to the reference."""
    if completion == "raise":
        raise RuntimeError("bad completion")
    if completion == "nan":
        return float("nan")
    return float(completion == ground_truth)


def pid_reward(completion: str, ground_truth: str) -> float:
    """The id of the process that scored the item (to see where `score_batch` ran it)."""
    return float(os.getpid())


class _MakeDirectory:
    """Unpickling this calls os.mkdir(path): code run by whoever loads the pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def hijacking_reward(completion: str, ground_truth: str) -> float:
    """A reward function gone bad inside a sandbox (as a sympy exploit would be): it writes a
    pickle to the reply pipe (file descriptor `sys.argv[3]` of the helper) that creates the
    directory `completion` when unpickled, then scores 1.0."""
    from multiprocessing.connection import Connection

    reply = Connection(os.dup(int(sys.argv[3])), readable=False)
    reply.send(("ok", _MakeDirectory(completion)))
    reply.close()
    return 1.0
