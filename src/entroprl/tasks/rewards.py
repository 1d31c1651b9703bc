"""Verifiable rewards for math answers that never hang and never raise.

- `math_reward`: the completion's last ``\\boxed{...}`` against a reference, by math-verify.
- `gsm8k_reward`: the final number of a GSM8K-style answer against the reference number.
- `format_reward`: a bonus for exactly one boxed answer.
- `score_batch`: any picklable reward function over a batch, in sandbox processes with a per-item
  time limit.

Why a sandbox. math-verify bounds its parsing and comparison with ``signal.alarm``: that works
only in the main thread (in another thread math-verify refuses to run), it counts whole seconds,
and a signal cannot interrupt one long C-level step such as the big-integer power behind
``9^{9^{9^9}}``. So the sympy step of `math_reward` runs in a helper process, a fresh interpreter
reached over two pipes, which the caller kills when it overruns (`MATH_TIMEOUT_S`) and replaces.
Cheap guards before and after parsing (answer length, nesting depth, digit runs, towers of numeric
powers, huge factorials) reject the usual pathological answers in milliseconds, so the kill is
the rare last resort.

Why fresh interpreters and not ``multiprocessing``: a ``fork`` of a process that runs other
threads (torch's intra-op pool, a trainer's threads) can deadlock the child on a lock held at
fork time; ``spawn`` and ``forkserver`` re-import the user's ``__main__`` (an unguarded training
script would start again; with torch imported there a start took 4 to 7 s here) and cannot be
started from a daemonic process (a ``DataLoader`` worker). A ``subprocess`` running ``python -c``
has none of these problems: the start of an interpreter with sympy and math-verify, about a
second, is paid once per helper (helpers stay alive between calls). POSIX only.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import numbers
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from multiprocessing.connection import Connection, wait
from typing import Any

from entroprl.errors import InputError

logger = logging.getLogger(__name__)

MATH_TIMEOUT_S = 5.0
"""Wall-clock limit of the sympy step of one `math_reward` call; past it the helper is killed."""

HELPER_START_TIMEOUT_S = 30.0
"""Longest wait for a new helper process to become ready (normally 0.5 to 1 s)."""

MAX_ANSWER_CHARS = 1000
"""Longest boxed answer handed to sympy (MATH-500, AIME and AMC answers: at most 53 characters)."""

MAX_NESTING = 10
"""Deepest nesting of ``{}``, ``()``, ``[]`` in an answer handed to sympy (MATH-500 needs 3).
math-verify's LaTeX parser slows down exponentially with bracket depth (about 2 s at depth 10)."""

MAX_DIGITS = 100
"""Longest run of digits in an answer handed to sympy."""

MAX_EXPONENT = 10_000
"""Largest magnitude of a numeric exponent on a numeric base, and of a factorial's argument."""

_SOFT_TIMEOUT_S = 2  # math-verify's own limits (whole seconds); a parse takes 0.5 s on a loaded CPU
_MAX_NUMBER_CHARS = 64  # longest GSM8K number text (with commas) converted to a Decimal
_NUMBER_WINDOW = 256  # characters before a text's last digit searched for its last number
_MAX_IDLE_WORKERS = 8
_MEMORY_LIMIT_BYTES = 4 << 30
_CPU_SLACK_S = 2  # the CPU limit of a sandbox task, past its wall-clock timeout

_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_BRACKET_TOKEN = re.compile(r"\\.|[{}()\[\]]", re.DOTALL)
_LONG_DIGIT_RUN = re.compile(rf"\d{{{MAX_DIGITS + 1}}}")
_NUMBER = r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER, re.ASCII)
_HASH_ANSWER = re.compile(rf"####(?!#)[ \t]*\$?[ \t]*({_NUMBER})", re.ASCII)
_NON_NUMBER_CHAR = re.compile(r"[^0-9,.\-]")

_IN_SANDBOX = False  # set in helper processes, whose parent bounds their time


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` of `text`, braces balanced; None if there is none.

    The last occurrence of ``\\boxed`` decides: when its braces never close (a truncated answer)
    the result is None, not an earlier box. Escaped braces ``\\{`` and ``\\}`` do not count.
    ``\\boxed{}`` gives "". Linear time: one ``rfind`` and one scan from there.
    """
    span = _boxed_span(text) if isinstance(text, str) else None
    return None if span is None else text[span[0] : span[1]]


def _boxed_span(text: str, max_chars: int | None = None) -> tuple[int, int] | None:
    """(start, end) of the last boxed content; None if absent, unbalanced or over `max_chars`."""
    start = text.rfind("\\boxed")
    opening = _BOXED_OPEN.match(text, start) if start >= 0 else None
    if opening is None:
        return None
    stop = len(text) if max_chars is None else min(len(text), opening.end() + max_chars + 1)
    depth = 1
    for token in _BRACE_TOKEN.finditer(text, opening.end(), stop):
        if token.group() == "{":
            depth += 1
        elif token.group() == "}":
            depth -= 1
            if depth == 0:
                return opening.end(), token.start()
    return None


def format_reward(completion: str) -> float:
    """Format bonus: 1.0 if the completion holds exactly one ``\\boxed`` and it is a closed,
    non-blank ``\\boxed{...}``; else 0.0 (no box, several boxes, nested boxes, a box left open).

    Optional shaping, off unless a task adds it to the correctness reward; never raises.
    """
    if not isinstance(completion, str) or completion.count("\\boxed") != 1:
        return 0.0
    content = extract_boxed(completion)
    return 1.0 if content is not None and content.strip() else 0.0


def extract_gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K-style text, commas removed; None if there is none.

    In order: the number right after the last ``####`` that is followed by one (``#### 42``,
    ``#### $1,000``: a markdown heading such as ``#### Step 1`` is not an answer); else the last
    number inside the last ``\\boxed{...}`` (None if that box holds no number); else the last number
    of the text. A number is an optional minus sign, digits with optional thousands commas, and an
    optional decimal part: ``$`` signs and a trailing ``.`` are not part of it. A number longer than
    64 characters, or a last number inside a run of over 256 characters of ``0-9,.-``, gives None.
    Linear time.
    """
    if not isinstance(text, str):
        return None
    hashed = _last_match(_HASH_ANSWER, text)
    if hashed is not None:
        return _clean_number(hashed.group(1))
    span = _boxed_span(text, MAX_ANSWER_CHARS)
    if span is not None:
        return _last_number(text[span[0] : span[1]])
    return _last_number(text)


def _last_number(text: str) -> str | None:
    """Last number of `text`: the match ending at the last digit, found in a short window.

    Matches only hold characters of ``0-9,.-``, so once the window holds another character the
    match is the one a scan of the whole text would find; a run of number characters longer than
    the window gives None.
    """
    end = max(text.rfind(digit) for digit in "0123456789") + 1
    if end == 0:
        return None
    start = max(0, end - _NUMBER_WINDOW)
    if start > 0 and _NON_NUMBER_CHAR.search(text, start - 1, end) is None:
        return None
    last = _last_match(_NUMBER_RE, text, start, end)
    return None if last is None else _clean_number(last.group())


def _last_match(
    pattern: re.Pattern[str], text: str, start: int = 0, end: int | None = None
) -> re.Match[str] | None:
    last = deque(pattern.finditer(text, start, len(text) if end is None else end), maxlen=1)
    return last[0] if last else None


def _clean_number(number: str) -> str | None:
    return number.replace(",", "") if len(number) <= _MAX_NUMBER_CHARS else None


def gsm8k_reward(completion: str, ground_truth: str) -> float:
    """1.0 if the completion's final number equals the reference's, else 0.0.

    Both sides go through `extract_gsm8k_answer`, so the reference may be a full GSM8K solution
    ending in ``#### 42`` or just ``"42"``; numbers compare exactly as decimals (``18.00 == 18``).
    Pure string work on bounded windows: microseconds, never raises.
    """
    try:
        predicted = extract_gsm8k_answer(completion)
        reference = extract_gsm8k_answer(ground_truth)
        if predicted is None or reference is None:
            return 0.0
        return 1.0 if Decimal(predicted) == Decimal(reference) else 0.0
    except (InvalidOperation, ValueError):
        return 0.0


def math_reward(completion: str, ground_truth: str) -> float:
    """1.0 if the last ``\\boxed{...}`` of the completion is mathematically equal to the reference.

    The reference is an answer in LaTeX (MATH's ``answer`` field); if it contains ``\\boxed`` its
    last box is used. Both are wrapped in ``\\boxed{}``, parsed by math-verify's LaTeX extraction
    and compared by ``math_verify.verify(gold, prediction)``. No box, an empty or unclosed box, or
    an answer failing the guards (over `MAX_ANSWER_CHARS` characters, `MAX_NESTING` levels,
    `MAX_DIGITS` digits in a row, towers of numeric powers, a numeric exponent or factorial argument
    over `MAX_EXPONENT`: see `_too_large`) gives 0.0.

    Bound: never raises, from any thread or process. The sympy step runs in a helper process and is
    killed after `MATH_TIMEOUT_S` (5 s); the first call of a process, and the first after a kill,
    also waits for a helper to start (about 1 s; given up after `HELPER_START_TIMEOUT_S`). Ordinary
    answers take a few milliseconds.
    """
    try:
        if not isinstance(completion, str) or not isinstance(ground_truth, str):
            return 0.0
        span = _boxed_span(completion, MAX_ANSWER_CHARS)
        if span is None:
            return 0.0
        predicted = completion[span[0] : span[1]]
        reference = ground_truth
        if "\\boxed" in ground_truth:
            gold_span = _boxed_span(ground_truth, MAX_ANSWER_CHARS)
            reference = "" if gold_span is None else ground_truth[gold_span[0] : gold_span[1]]
        if not _fit_for_sympy(predicted) or not _fit_for_sympy(reference):
            return 0.0
        return _run_bounded(_math_equal, (predicted, reference), MATH_TIMEOUT_S)
    except Exception:
        logger.exception("math_reward failed; scoring 0.0")
        return 0.0


def _fit_for_sympy(answer: str) -> bool:
    """String guards: non-blank, short, shallow, without very long numbers."""
    if not answer.strip() or len(answer) > MAX_ANSWER_CHARS or _LONG_DIGIT_RUN.search(answer):
        return False
    depth = 0
    for token in _BRACKET_TOKEN.finditer(answer):
        bracket = token.group()
        if bracket in "{([":
            depth += 1
            if depth > MAX_NESTING:
                return False
        elif bracket in "})]":
            depth -= 1
    return True


def _math_equal(predicted: str, reference: str) -> float:
    """math-verify comparison of two LaTeX answers; runs in a helper process, in its main thread.

    math-verify's own signal-based timeouts (`_SOFT_TIMEOUT_S` for each parse and each comparison)
    stop the slow pure-Python cases here, so the helper survives them; the parent's kill covers
    the rest.
    """
    # Imported here: only helper processes need sympy, the trainer process never loads it.
    from math_verify import LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    config = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]
    try:
        gold = parse(f"\\boxed{{{reference}}}", config, parsing_timeout=_SOFT_TIMEOUT_S)
        pred = parse(f"\\boxed{{{predicted}}}", config, parsing_timeout=_SOFT_TIMEOUT_S)
        if not gold or not pred or _too_large(gold) or _too_large(pred):
            return 0.0
        return 1.0 if verify(gold, pred, timeout_seconds=_SOFT_TIMEOUT_S) else 0.0
    except (Exception, TimeoutException):
        return 0.0


def _too_large(parsed: list[Any]) -> bool:
    """Tree guard on parsed answers: numbers that sympy would take minutes or gigabytes to build.

    A numeric term is *explosive* if it is a factorial-like function, or a power whose exponent
    holds an explosive term or exceeds 1 in magnitude (so square roots and reciprocals are not).
    Rejected: an explosive term inside the exponent of a numeric power or the argument of a
    factorial-like function (towers such as 10^(10^10), 2^(2^10), (10^10)!), a numeric exponent
    over `MAX_EXPONENT` in magnitude on a base other than 0, 1, -1, and a factorial-like function of
    a number over `MAX_EXPONENT`. Terms with a free symbol pass (x^(10^10) costs sympy little).
    Values are only computed (`evalf`) for terms free of explosive parts, so the check is cheap.
    """
    import sympy
    from sympy import Basic, MatrixBase, Pow

    factorial_like = (
        sympy.factorial,
        sympy.factorial2,
        sympy.subfactorial,
        sympy.binomial,
        sympy.gamma,
        sympy.RisingFactorial,
        sympy.FallingFactorial,
    )

    def size(expr: Basic) -> float:
        return abs(complex(expr.evalf(15)))

    def explosive(node: Basic) -> bool:
        if not node.is_number:
            return False
        if isinstance(node, factorial_like):
            return True
        return isinstance(node, Pow) and (holds_explosive(node.exp) or size(node.exp) > 1)

    def holds_explosive(expr: Basic) -> bool:
        return any(explosive(node) for node in sympy.preorder_traversal(expr))

    def too_big(expr: Basic) -> bool:
        return holds_explosive(expr) or size(expr) > MAX_EXPONENT

    for item in parsed:
        if isinstance(item, MatrixBase):
            item = sympy.ImmutableMatrix(item)
        if not isinstance(item, Basic):
            continue
        for node in sympy.preorder_traversal(item):
            if not node.is_number:
                continue
            if isinstance(node, Pow):
                if holds_explosive(node.exp):
                    return True
                if node.base not in (sympy.S.Zero, sympy.S.One, sympy.S.NegativeOne) and too_big(
                    node.exp
                ):
                    return True
            elif isinstance(node, factorial_like) and any(too_big(arg) for arg in node.args):
                return True
    return False


def score_batch(
    reward_fn: Callable[[Any, Any], float],
    completions: Sequence[Any],
    ground_truths: Sequence[Any],
    *,
    num_workers: int | None = None,
    timeout: float = 5.0,
) -> list[float]:
    """``[reward_fn(c, g) for c, g in zip(completions, ground_truths)]``, in parallel and bounded.

    With ``num_workers >= 2`` (default ``min(4, cpu count)``) the items are scored in sandbox
    processes (fresh interpreters, kept alive between calls). Each item gets `timeout` seconds
    from the moment a ready worker receives it; an item that overruns, crashes its worker or raises
    scores 0.0, and a killed or crashed worker is replaced. Results keep the input order; a
    non-finite or non-numeric result counts as 0.0. `reward_fn` must be picklable by reference (a
    module-level function of an importable module, or a ``functools.partial`` of one). Safe to
    call from any thread.

    With ``num_workers`` 0 or 1 the items are scored in the calling process, one after the other,
    and `timeout` does not apply: the bound is the reward function's own (`math_reward` and
    `gsm8k_reward` have one).

    Raises ValueError for mismatched lengths, a negative `num_workers`, a non-positive `timeout`,
    or a `reward_fn` that cannot be pickled or loaded in a worker; RuntimeError if worker processes
    cannot be started. Bad completions never raise.
    """
    if len(completions) != len(ground_truths):
        raise InputError(
            f"completions and ground_truths differ in length: "
            f"{len(completions)} != {len(ground_truths)}"
        )
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    if num_workers < 0:
        raise InputError(f"num_workers must be >= 0, got {num_workers}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise InputError(f"timeout must be a positive number of seconds, got {timeout}")
    pairs = list(zip(completions, ground_truths, strict=True))
    if num_workers <= 1 or not pairs:
        return [_call_safely(reward_fn, pair) for pair in pairs]
    try:
        pickle.dumps(reward_fn)
    except Exception as exc:
        raise InputError(
            f"reward_fn must be picklable to run in worker processes (a module-level function, "
            f"not a lambda or a local function): {exc}"
        ) from exc
    try:
        return _score_in_workers(reward_fn, pairs, min(num_workers, len(pairs)), timeout)
    except OSError as exc:
        raise RuntimeError(f"reward worker processes cannot be started: {exc}") from exc


def _to_reward(value: Any) -> float:
    try:
        reward = float(value)
    except (TypeError, ValueError):
        return 0.0
    return reward if math.isfinite(reward) else 0.0


def _call_safely(fn: Callable[..., Any], args: tuple[Any, ...]) -> float:
    try:
        return _to_reward(fn(*args))
    except Exception as exc:
        logger.warning("reward function raised %s; scoring 0.0", type(exc).__name__)
        return 0.0


def _score_in_workers(
    reward_fn: Callable[..., Any], pairs: list[tuple[Any, Any]], n_workers: int, timeout: float
) -> list[float]:
    """Dispatch loop: one item per ready worker, each with a deadline; replace the lost workers."""
    scores = [0.0] * len(pairs)
    todo = deque(range(len(pairs)))
    workers = [_take_worker() for _ in range(n_workers)]
    running: dict[_Worker, tuple[int, float]] = {}
    failed_starts = 0
    try:
        while todo or running:
            now = time.monotonic()
            for slot, worker in enumerate(workers):
                if worker.ready and worker not in running and todo:
                    if worker.submit(reward_fn, pairs[todo[0]], timeout):
                        running[worker] = (todo.popleft(), now + timeout)
                    else:  # died while idle: not the item's fault, it goes to another worker
                        worker.kill()
                        workers[slot] = _Worker()
            deadlines = [deadline for _, deadline in running.values()]
            deadlines += [w.started + HELPER_START_TIMEOUT_S for w in workers if not w.ready]
            listening = [w.inbox for w in workers if w in running or not w.ready]
            wait(listening, timeout=max(0.0, min(deadlines, default=now) - now))
            now = time.monotonic()
            for slot, worker in enumerate(workers):
                lost = False
                if worker.inbox.poll():
                    try:
                        status, value = worker.reply()
                    except (EOFError, OSError, ValueError):
                        lost = True
                    else:
                        if status == "ready":
                            worker.ready = True
                        elif status == "load_error":
                            raise InputError(f"reward_fn could not be loaded in a worker: {value}")
                        elif worker in running:
                            item = running.pop(worker)[0]
                            scores[item] = _to_reward(value) if status == "ok" else 0.0
                        else:  # a reply nobody asked for: a helper not to be trusted
                            lost = True
                elif worker in running and now >= running[worker][1]:
                    logger.warning("reward item timed out after %.1f s; scoring 0.0", timeout)
                    lost = True
                elif not worker.ready and now >= worker.started + HELPER_START_TIMEOUT_S:
                    lost = True
                if lost or not worker.alive():
                    if not worker.ready:
                        failed_starts += 1
                        if failed_starts > 2 * n_workers:
                            raise RuntimeError("reward worker processes fail to start")
                    elif worker in running:
                        logger.warning("reward worker lost on an item; scoring 0.0")
                    running.pop(worker, None)
                    worker.kill()
                    workers[slot] = _Worker()
    finally:
        for worker in workers:
            if worker in running or not worker.alive():
                worker.kill()
            else:
                _give_back(worker)
    return scores


def _run_bounded(fn: Callable[..., float], args: tuple[Any, ...], timeout: float) -> float:
    """`fn(*args)` in a helper process, killed after `timeout` seconds (0.0 then)."""
    if _IN_SANDBOX and threading.current_thread() is threading.main_thread():
        return fn(*args)  # already in a sandbox, whose parent bounds it
    status, value = call_bounded(fn, args, timeout)
    if status == "timeout":
        logger.warning("reward computation timed out after %.1f s; scoring 0.0", timeout)
    elif status == "crash":
        logger.warning("reward helper process failed or crashed; scoring 0.0")
    return _to_reward(value) if status == "ok" else 0.0


def call_bounded(fn: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> tuple[str, Any]:
    """``fn(*args)`` in a sandbox process, killed after `timeout` seconds: ``("ok", value)``
    (a number, or a list of numbers and Nones, as `_serve` sends them), ``("error", "Type:
    message")`` when it raised, ``("timeout", None)`` or ``("crash", None)`` (the helper failed
    to start, died or sent a malformed reply). `fn` and `args` must pickle."""
    worker = _take_worker()
    if not worker.wait_ready(HELPER_START_TIMEOUT_S) or not worker.submit(fn, args, timeout):
        worker.kill()
        return "crash", None
    if not worker.inbox.poll(timeout):
        worker.kill()
        _give_back(_Worker())  # start the replacement now, so the next call finds it warm
        return "timeout", None
    try:
        status, value = worker.reply()
    except (EOFError, OSError, ValueError):
        worker.kill()
        return "crash", None
    _give_back(worker)
    return status, value


def _sendable(result: Any) -> Any:
    """A function's result as a sandbox sends it: a number, or for a list or tuple each item as a
    number, None, or the name of its type (which the caller reports as a wrong result)."""
    if not isinstance(result, list | tuple):
        return _to_reward(result)
    out = []
    for item in result:
        if item is None:
            out.append(None)
        elif isinstance(item, numbers.Real) and not isinstance(item, bool):
            out.append(float(item) if math.isfinite(item) else None)
        else:
            out.append(type(item).__name__)
    return out


class _Worker:
    """A sandbox process: a fresh interpreter running `_serve`, reached over two pipes."""

    def __init__(self) -> None:
        to_child, from_parent = os.pipe()
        from_child, to_parent = os.pipe()
        boot = (
            "import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
            "from entroprl.tasks.rewards import _serve; _serve(int(sys.argv[2]), int(sys.argv[3]))"
        )
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", boot, json.dumps(sys.path), str(to_child), str(to_parent)],
                pass_fds=(to_child, to_parent),
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(to_child)
            os.close(to_parent)
        self.outbox = Connection(from_parent, readable=False)
        self.inbox = Connection(from_child, writable=False)
        self.started = time.monotonic()
        self.ready = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float) -> bool:
        if not self.ready and self.inbox.poll(timeout):
            try:
                self.ready = self.reply()[0] == "ready"
            except (EOFError, OSError, ValueError):
                return False
        return self.ready

    def reply(self) -> tuple[str, Any]:
        """The helper's next ``(status, value)``, read as JSON: never unpickled, so that a helper
        taken over by what it parses cannot run code in this process. Raises EOFError or OSError
        if the helper is gone, ValueError if the reply is not a JSON pair."""
        status, value = json.loads(self.inbox.recv_bytes())
        return status, value

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> bool:
        try:
            self.outbox.send_bytes(pickle.dumps((fn, args, timeout)))
        except OSError:
            return False
        return True

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.inbox.close()
        self.outbox.close()


_idle_workers: list[_Worker] = []
_pool_lock = threading.Lock()


def _take_worker() -> _Worker:
    with _pool_lock:
        while _idle_workers:
            worker = _idle_workers.pop()
            if worker.alive():
                return worker
            worker.kill()
    return _Worker()


def _give_back(worker: _Worker) -> None:
    with _pool_lock:
        if len(_idle_workers) < _MAX_IDLE_WORKERS:
            _idle_workers.append(worker)
            return
    worker.kill()


@atexit.register
def _stop_idle_workers() -> None:
    with _pool_lock:
        while _idle_workers:
            _idle_workers.pop().kill()


def _forget_workers_after_fork() -> None:
    """In a forked child the parent's helpers are not ours: drop them, close our pipe ends."""
    global _pool_lock
    _pool_lock = threading.Lock()
    for worker in _idle_workers:
        worker.inbox.close()
        worker.outbox.close()
    _idle_workers.clear()


os.register_at_fork(after_in_child=_forget_workers_after_fork)


def _serve(read_fd: int, write_fd: int) -> None:
    """Main loop of a sandbox process: receive ``(fn, args, timeout)``, send back a reward.

    Requests come pickled from the parent, which trusts them; replies go back as JSON pairs (see
    `_Worker.reply`): ``["ready", null]`` once, then ``["ok", reward]``, ``["error", name]`` (the
    reward function raised: scored 0.0) or ``["load_error", message]`` (the request could not be
    unpickled). A CPU-time limit per request kills the process if it outlives its parent; an
    address-space limit turns memory bombs into MemoryError.
    """

    def send(status: str, value: Any) -> None:
        outbox.send_bytes(json.dumps([status, value]).encode())

    import resource  # POSIX only, and only sandboxes need it
    import signal

    from math_verify.errors import TimeoutException

    # Ctrl-C reaches every process of the terminal's group: the trainer stops with one line, and
    # its helpers end when it closes their pipes or kills them, not with tracebacks of their own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _IN_SANDBOX
    _IN_SANDBOX = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # timeouts are expected here
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > _MEMORY_LIMIT_BYTES:
        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT_BYTES, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    _math_equal("1", "1")  # load sympy and compile math-verify's patterns before accepting work
    send("ready", None)
    while True:
        try:
            request = inbox.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            fn, args, timeout = pickle.loads(request)
        except Exception as exc:
            send("load_error", f"{type(exc).__name__}: {exc}")
            continue
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_cap = math.ceil(usage.ru_utime + usage.ru_stime + timeout) + _CPU_SLACK_S
        if cpu_hard != resource.RLIM_INFINITY:
            cpu_cap = min(cpu_cap, cpu_hard)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_cap, cpu_hard))
        try:
            send("ok", _sendable(fn(*args)))
        except (Exception, TimeoutException) as exc:
            send("error", f"{type(exc).__name__}: {exc}"[:500])
