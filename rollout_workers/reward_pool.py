"""The process pool that runs a reward function for a rollout worker, with per-sample timeouts.

Test: `PYTHONPATH=$PWD python -m pytest -q tests/test_rewards.py`

Why a process pool: math-verify bounds its own work with `signal.alarm`, which only works in the
main thread of a process, and sympy can hang in C on hostile input (a power tower makes it build a
number with hundreds of millions of digits). So every reward call runs in a pool process, where
(1) an interval timer interrupts Python-level work after `timeout_s`, and (2) the caller kills and
recreates the pool when a process does not answer within `timeout_s` plus a grace period. Either
way the sample scores 0 and is counted (bad model output never hangs a run). The reward functions
themselves (`rollout_workers.rewards`) are pure and know nothing of this.

The exception: with the default reward function, a sample that needs no LaTeX parser (no answer,
an unsafe one, or a plain number against a plain-number gold: GSM8K, the synthetic tasks) is
scored in the caller's process by `rewards.score_math_without_parser`, which runs only bounded
regex scans and `Fraction` on digit strings. A round trip to a pool process costs ~0.5 ms per
sample, which was 18% of an iteration of the embedded default (README, "Async").
"""
from __future__ import annotations

import concurrent.futures as cf
import importlib
import logging
import math
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

from rollout_workers.rewards import ANSWER_FORMATS, DEFAULT_REWARD_FN, has_final_answer, score_math_without_parser

STARTUP_TIMEOUT_S = 120.0
"""How long a fresh pool may take to start its processes and import the reward function."""


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

    def __init__(self, reward_fn: str = DEFAULT_REWARD_FN, processes: int = 1,
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
        fresh: deque[int] = deque()  # the samples a pool process must score (module docstring)
        for idx in range(n):
            decided = (score_math_without_parser(completions[idx], golds[idx], self.answer_format, self.format_reward)
                       if self.reward_fn == DEFAULT_REWARD_FN else None)
            if decided is None:
                fresh.append(idx)
            else:
                rewards[idx] = decided
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
