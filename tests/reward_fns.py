"""Reward functions for tests/test_rewards.py, loaded by import path inside the RewardPool processes.
Signature of every reward function: (completion, gold, answer_format) -> float.

Test: `PYTHONPATH=$PWD python -m pytest -q tests/test_rewards.py`
"""
from __future__ import annotations

import os
import signal

NOT_CALLABLE = 3


def exact(completion: str, gold: str, answer_format: str) -> float:
    """1.0 when the completion is exactly the gold string."""
    return 1.0 if completion == gold else 0.0


def misbehave(completion: str, gold: str, answer_format: str) -> float:
    """Scores like `exact`, but misbehaves on marker completions:
    "SPIN" loops in Python (the in-process timer ends it); "DEAF" ignores SIGALRM and loops, as code
    stuck in C would (only the caller's kill-and-recreate ends it); "CRASH" kills its own process
    (a segfault/OOM kill); "RAISE" raises; "NAN"/"INF"/"STR" return a non-finite or non-number."""
    if completion == "SPIN":
        while True:
            pass
    if completion == "DEAF":
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        while True:
            pass
    if completion == "CRASH":
        os._exit(1)
    if completion == "RAISE":
        raise RuntimeError("reward fn failed")
    special = {"NAN": float("nan"), "INF": float("inf"), "STR": "1.0"}
    if completion in special:
        return special[completion]
    return exact(completion, gold, answer_format)


def odd_length(completion: str, gold: str, answer_format: str) -> float:
    """1.0 for an odd-length completion: mixed rewards within a group even from an untrained model,
    so every batch takes an optimizer step (tests/test_e2e.py's overlap runs)."""
    return float(len(completion) % 2)


def digit_fraction(completion: str, gold: str, answer_format: str) -> float:
    """Share of the completion's characters that are digits: a dense reward that even an untrained
    model can climb within a few iterations (tests/test_e2e.py's learning check)."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))
