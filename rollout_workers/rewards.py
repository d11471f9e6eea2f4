"""Reward functions (math answer checking) and the process pool that runs them for a rollout worker.

Test: `PYTHONPATH=$PWD python -m pytest -q tests/test_rewards.py`

Why a process pool: math-verify bounds its own work with `signal.alarm`, which only works in the
main thread of a process, and sympy can hang in C on hostile input (a power tower makes it build a
number with hundreds of millions of digits). So every reward call runs in a pool process, where
(1) an interval timer interrupts Python-level work after `timeout_s`, and (2) the caller kills and
recreates the pool when a process does not answer within `timeout_s` plus a grace period. Either
way the sample scores 0 and is counted (bad model output never hangs a run).

Answer formats (`rollout.answer_format`, `ANSWER_FORMATS`), i.e. where the final answer is read:
- "boxed": the last `\\boxed{...}` (linear brace scan), else the number after a GSM8K `#### N`;
- "gsm8k": only the number after the last `#### N`;
- "last_number": as "boxed", else the last plain number of the text ("The answer is 42."), for
  small instruct models that do not box their answers.

Security: model output is never given to eval/exec/sympify/parse_expr or a shell. When the answer
and the gold are both plain numbers (integers, decimals, `a/b`; `PLAIN_NUMBER_RE`) they are compared
exactly with `fractions.Fraction` (a parser of digit strings, not of expressions), without sympy:
the fast path (math-verify costs ~ms per sample). Anything else goes to math-verify wrapped in
`\\boxed{}` with only `LatexExtractionConfig`, i.e. only the ANTLR LaTeX parser of latex2sympy2
reads it. math-verify's `ExprExtractionConfig` is deliberately not used: it calls sympy's
`parse_expr` (which evaluates Python) on plain-text matches.
"""
from __future__ import annotations

import concurrent.futures as cf
import importlib
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from typing import NamedTuple

MAX_COMPLETION_SCAN_CHARS = 1_000_000
"""Completions are cut to their last this-many characters before searching for an answer."""
MAX_ANSWER_CHARS = 1000
"""A final answer longer than this is not parsed (scores 0)."""
MAX_BRACE_DEPTH = 8
"""Deeper brace nesting is rejected: latex2sympy's cost grows exponentially with bare `{` nesting
(measured here: depth 8 about 1 s, depth 16 about 18 s)."""
MAX_EXPONENT_NESTING = 3
"""`a^{b^{c^{d}}}` (depth 4) and deeper are rejected before sympy sees them."""
MAX_EXPONENT_LITERAL_DIGITS = 5
"""An integer exponent with more digits (e.g. `9^{9999999}`) is rejected: sympy evaluates it."""
MAX_FACTORIAL_DIGITS = 5
"""`n!` with n of more digits is rejected (sympy computes the factorial)."""
ANSWER_FORMATS = ("boxed", "gsm8k", "last_number")
"""Where the final answer is read from a completion (module docstring)."""
STARTUP_TIMEOUT_S = 120.0
"""How long a fresh pool may take to start its processes and import the reward function."""

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K_RE = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
PLAIN_NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?", re.ASCII)
"""A plain number: optional minus (not after a word or `)`, so `5-3` ends in 3), digits with
optional thousands commas, optional decimal part or `/denominator`. The last match in a text is the
`last_number` answer; an answer or gold that fully matches (after stripping outer spaces and a
leading `$`) is compared exactly by `Fraction`, without math-verify. No nested quantifiers over
the same characters, so matching is linear; ASCII digits only."""
MAX_NUMBER_CHARS = 100
"""A plain number longer than this is not compared on the fast path (it goes to math-verify)."""
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_INT_LITERAL_RE = re.compile(r"\s*[+-]?\s*(\d+)\s*")
_BIG_FACTORIAL_RE = re.compile(r"\d{%d,}\s*!" % (MAX_FACTORIAL_DIGITS + 1))


def extract_final_answer(completion: str, answer_format: str = "boxed") -> str | None:
    """The completion's final answer as LaTeX, or None when it has none (formats: module docstring).

    A box's content is cut by a linear brace scan capped at `MAX_ANSWER_CHARS` (an unbalanced or
    over-long last box means no answer); GSM8K and plain numbers lose their thousands commas.
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {list(ANSWER_FORMATS)}, got {answer_format!r}")
    text = completion[-MAX_COMPLETION_SCAN_CHARS:]
    if answer_format != "gsm8k":
        last_box = None
        for last_box in _BOXED_RE.finditer(text):
            pass
        if last_box is not None:
            return _braced_content(text, last_box.end())
    marker = text.rfind("####")
    if marker >= 0:
        number = _GSM8K_RE.match(text, marker, min(len(text), marker + MAX_ANSWER_CHARS))
        if number:
            return number.group(1).replace(",", "")
    if answer_format != "last_number":
        return None
    # Only the tail is searched: it bounds the work on hostile input (a number straddling the cut
    # would be read from the cut on, but a number that long is not an answer the reward accepts).
    last = None
    for last in PLAIN_NUMBER_RE.finditer(text, max(0, len(text) - MAX_ANSWER_CHARS)):
        pass
    return last.group(0).replace(",", "") if last else None


def plain_number(text: str) -> Fraction | None:
    """`text` as an exact rational when it is a plain number ("42", "-7.50", "1,234", "$18", "3/4"),
    else None. Only digit strings reach `Fraction`; nothing is evaluated."""
    cleaned = text.strip().removeprefix("\\$").removeprefix("$").lstrip()
    if len(cleaned) > MAX_NUMBER_CHARS or not PLAIN_NUMBER_RE.fullmatch(cleaned):
        return None
    cleaned = cleaned.replace(",", "")
    numerator, _, denominator = cleaned.partition("/")
    if denominator and int(denominator) == 0:
        return None
    return Fraction(numerator) / (int(denominator) if denominator else 1)


def _braced_content(text: str, start: int) -> str | None:
    """Text from `start` up to the `}` closing the `{` just before it; None if unbalanced/too long."""
    depth = 1
    end = min(len(text), start + MAX_ANSWER_CHARS + 1)
    for i in range(start, end):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def is_safe_answer(answer: str) -> bool:
    """Cheap checks that keep known-pathological LaTeX away from sympy.

    These are fast paths, not the hang defence (that is the pool's timeout): NUL/control bytes,
    over-long answers, deep brace nesting, power towers (exponent nesting deeper than
    `MAX_EXPONENT_NESTING`, or a numeric power inside an exponent such as `9^{9^{9}}`, which sympy
    evaluates to a 370-million-digit integer), huge integer exponents and huge factorials.
    """
    if not answer.strip() or len(answer) > MAX_ANSWER_CHARS or _CONTROL_RE.search(answer):
        return False
    if _BIG_FACTORIAL_RE.search(answer):
        return False
    # Stack of open brace groups: (is_exponent_group, start index, contains_power).
    stack: list[list] = []
    pending_exponent = False
    for i, ch in enumerate(answer):
        if ch == "{":
            stack.append([pending_exponent, i + 1, False])
            pending_exponent = False
            if len(stack) > MAX_BRACE_DEPTH:
                return False
        elif ch == "}":
            if not stack:
                return False
            is_exp, start, has_power = stack.pop()
            if is_exp and not _safe_exponent(answer[start:i], has_power):
                return False
        elif ch == "^":
            depth = sum(1 for group in stack if group[0]) + 1
            if depth > MAX_EXPONENT_NESTING:
                return False
            for group in stack:
                group[2] = True
            pending_exponent = True
        elif not ch.isspace():
            pending_exponent = False
    return not stack


def _safe_exponent(exponent: str, has_power: bool) -> bool:
    literal = _INT_LITERAL_RE.fullmatch(exponent)
    if literal and len(literal.group(1)) > MAX_EXPONENT_LITERAL_DIGITS:
        return False
    # A power inside an exponent with no variable in it is a numeric tower that sympy evaluates.
    return not (has_power and not re.search(r"[A-Za-z]", _LATEX_COMMAND_RE.sub("", exponent)))


def parse_latex(answer: str) -> list:
    """math-verify parse of `answer` wrapped in `\\boxed{}`, LaTeX parser only (module docstring)."""
    from math_verify import LatexExtractionConfig, parse

    # Timeouts off: they use signal.alarm; the pool bounds the time instead (module docstring).
    return parse("\\boxed{" + answer + "}", extraction_config=[LatexExtractionConfig()],
                 parsing_timeout=None)


def score_math(completion: str, gold: str, answer_format: str = "boxed") -> float:
    """1.0 when the completion's final answer (read as `answer_format` says) equals `gold`
    mathematically, else 0.0.

    `gold` is LaTeX without the box (e.g. "579", "\\frac{1}{2}", "[1,2)"). Two plain numbers are
    compared exactly (`plain_number`); otherwise equivalence is math-verify's: `\\frac12` = `0.5`,
    `x=5` = `5`, `1,450,000` = `1450000`, interval ends and tuple order matter. Has no time limit
    of its own: run it through `RewardPool`.
    """
    if "\x00" in completion:
        return 0.0
    answer = extract_final_answer(completion, answer_format)
    if answer is None or not is_safe_answer(answer) or not is_safe_answer(gold):
        return 0.0
    answer_number, gold_number = plain_number(answer), plain_number(gold)
    if answer_number is not None and gold_number is not None:
        return 1.0 if answer_number == gold_number else 0.0
    from math_verify import verify

    gold_parsed = parse_latex(gold)
    answer_parsed = parse_latex(answer)
    if not gold_parsed or not answer_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, answer_parsed, timeout_seconds=None) else 0.0


def has_final_answer(completion: str, answer_format: str = "boxed") -> bool:
    """Whether the completion states a final answer that parses as math (for the format reward)."""
    if "\x00" in completion:
        return False
    answer = extract_final_answer(completion, answer_format)
    if answer is None or not is_safe_answer(answer):
        return False
    if plain_number(answer) is not None:
        return True
    # math-verify falls back to returning the raw string when its LaTeX parser fails.
    return any(not isinstance(parsed, str) for parsed in parse_latex(answer))


def resolve_reward_fn(path: str) -> Callable[[str, str], float]:
    """Import the reward function named "package.module:function"; clear ValueError if impossible."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {path!r} must look like 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function {path!r}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward function {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward function {path!r} is not callable (it is a {type(fn).__name__})")
    return fn


class ScoreResult(NamedTuple):
    """Rewards of one batch plus the counts of samples that scored 0 because scoring failed."""

    rewards: list[float]
    """One reward per completion, in input order."""
    timeouts: int
    """Samples whose scoring exceeded the timeout (scored 0)."""
    errors: int
    """Samples whose reward fn raised, returned a non-finite/non-number, or crashed its process (scored 0)."""


class _SampleTimeout(BaseException):
    """Raised by the interval timer inside a pool process. A BaseException so that the broad
    `except Exception` blocks inside math-verify/sympy cannot swallow it."""


_OK, _TIMEOUT, _ERROR = "ok", "timeout", "error"


def _worker_init(pid_queue) -> None:
    # Import math-verify/sympy now (about 1 s) rather than inside the first sample's deadline.
    import math_verify  # noqa: F401

    # It warns once per process that its signal timeouts are off; here that is by design.
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)

    # The caller needs the pids to kill a process stuck in C (the executor has no public kill).
    pid_queue.put(os.getpid())


def _worker_check(reward_fn: str) -> int:
    resolve_reward_fn(reward_fn)
    return os.getpid()


def _worker_score(reward_fn: str, completion: str, gold: str, answer_format: str, timeout_s: float,
                  format_reward: float) -> tuple[float, str]:
    """Runs in a pool process (its main thread, so signals work). Returns (reward, status)."""
    fired = []

    def on_alarm(signum, frame):
        fired.append(True)
        raise _SampleTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            value = resolve_reward_fn(reward_fn)(completion, gold, answer_format)
            if format_reward and has_final_answer(completion, answer_format):
                value = value + format_reward
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # an alarm racing this line is caught below
    except _SampleTimeout:
        return 0.0, _TIMEOUT
    except Exception:
        return 0.0, _ERROR
    finally:
        signal.signal(signal.SIGALRM, previous)
    if fired:  # the timer fired but something swallowed the exception
        return 0.0, _TIMEOUT
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0, _ERROR
    return float(value), _OK


class RewardPool:
    """Scores completions with a reward function in a pool of processes, with per-sample timeouts.

    At most `processes` samples are in flight, so each one is running from the moment it is
    submitted and its deadline is exact. A sample slower than `timeout_s` scores 0 and counts as a
    timeout; if its process does not even answer by `timeout_s + grace`, the pool is killed and
    recreated and the other in-flight samples are resubmitted. A process crash (BrokenProcessPool)
    retries its samples one at a time, so only the sample that crashes twice is counted as an error.
    The processes start (spawn, about 1-3 s) in `__init__`; after a kill they restart on the next
    sample. Not thread-safe: call `score` from one thread at a time.
    """

    def __init__(self, reward_fn: str = "rollout_workers.rewards:score_math", processes: int = 1,
                 timeout_s: float = 5.0, format_reward: float = 0.0, answer_format: str = "boxed") -> None:
        if ":" not in reward_fn:
            raise ValueError(f"reward function {reward_fn!r} must look like 'module:function'")
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {list(ANSWER_FORMATS)}, got {answer_format!r}")
        self.reward_fn = reward_fn
        self.answer_format = answer_format
        self.processes = processes
        self.timeout_s = timeout_s
        self.format_reward = format_reward
        self.kill_after_s = timeout_s + max(1.0, timeout_s)
        """Caller-side deadline for a sample: the in-process timer gets `timeout_s`, plus grace."""
        self.restarts = 0
        """How many times the pool was killed and recreated (diagnostics)."""
        self._ctx = mp.get_context("spawn")  # fork is unsafe in a threaded Ray actor
        self._executor: cf.ProcessPoolExecutor | None = None
        self._pids: set[int] = set()
        self._start()

    @property
    def worker_pids(self) -> frozenset[int]:
        """Pids of the current pool processes (empty while the pool awaits a restart)."""
        return frozenset(self._pids)

    def _start(self) -> None:
        pid_queue = self._ctx.Queue()
        executor = cf.ProcessPoolExecutor(self.processes, mp_context=self._ctx,
                                          initializer=_worker_init, initargs=(pid_queue,))
        self._executor = executor
        try:
            # One check per process: starts them all now (not inside the first sample's deadline),
            # imports the reward fn there (never in the caller) and reports a bad path clearly.
            checks = [executor.submit(_worker_check, self.reward_fn) for _ in range(self.processes)]
            for check in checks:
                check.result(timeout=STARTUP_TIMEOUT_S)
            self._pids = {pid_queue.get(timeout=STARTUP_TIMEOUT_S) for _ in range(self.processes)}
        except BaseException:
            self._kill()
            raise
        finally:
            pid_queue.close()

    def _kill(self) -> None:
        """Kill this pool's processes (they may be stuck in C) and drop the executor."""
        executor, self._executor = self._executor, None
        ours = [p for p in mp.active_children() if p.pid in self._pids]
        for proc in ours:
            proc.kill()
        for proc in ours:
            proc.join(timeout=10.0)
        self._pids = set()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _restart(self) -> None:
        self._kill()
        self.restarts += 1
        self._start()

    def _submit(self, completion: str, gold: str) -> cf.Future:
        args = (_worker_score, self.reward_fn, completion, gold, self.answer_format, self.timeout_s,
                self.format_reward)
        try:
            return self._executor.submit(*args)
        except BrokenProcessPool:  # a process died while idle (e.g. the OOM killer)
            self._restart()
            return self._executor.submit(*args)

    def score(self, completions: Sequence[str], golds: Sequence[str]) -> ScoreResult:
        """Rewards for `completions[i]` against `golds[i]`; failures score 0 and are counted."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
        n = len(completions)
        rewards = [0.0] * n
        timeouts = errors = 0
        fresh: deque[int] = deque(range(n))
        retry: deque[int] = deque()  # samples whose process crashed: rerun alone to find the culprit
        crashed: set[int] = set()
        in_flight: dict[cf.Future, tuple[int, float]] = {}
        while fresh or retry or in_flight:
            if self._executor is None:
                self._restart()
            while len(in_flight) < self.processes and (fresh or retry):
                if retry:
                    if in_flight:
                        break
                    idx = retry.popleft()
                else:
                    idx = fresh.popleft()
                future = self._submit(completions[idx], golds[idx])
                in_flight[future] = (idx, time.monotonic() + self.kill_after_s)
                if idx in crashed:
                    break
            next_deadline = min(deadline for _, deadline in in_flight.values())
            done, _ = cf.wait(in_flight, timeout=max(0.0, next_deadline - time.monotonic()),
                              return_when=cf.FIRST_COMPLETED)
            broken = False
            for future in done:
                idx, _ = in_flight.pop(future)
                try:
                    value, status = future.result(timeout=0)
                except BrokenProcessPool:
                    broken = True
                    if idx in crashed:
                        errors += 1
                    else:
                        crashed.add(idx)
                        retry.append(idx)
                    continue
                except _SampleTimeout:  # the timer fired in the worker's own bookkeeping
                    timeouts += 1
                    continue
                except Exception:  # e.g. a result that failed to pickle
                    errors += 1
                    continue
                rewards[idx] = value
                timeouts += status == _TIMEOUT
                errors += status == _ERROR
            now = time.monotonic()
            overdue = [f for f, (_, deadline) in in_flight.items() if deadline <= now]
            if overdue or broken:
                for future in overdue:
                    in_flight.pop(future)
                    timeouts += 1
                # Innocent samples still in flight are rerun on the new pool.
                for idx, _ in in_flight.values():
                    (retry if idx in crashed else fresh).appendleft(idx)
                in_flight.clear()
                self._kill()
        return ScoreResult(rewards, timeouts, errors)

    def close(self) -> None:
        """Stop the pool processes."""
        if self._executor is not None:
            executor = self._executor
            self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)
            for proc in [p for p in mp.active_children() if p.pid in self._pids]:
                proc.join(timeout=10.0)
                if proc.is_alive():
                    proc.kill()
            self._pids = set()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
