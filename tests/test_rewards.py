"""Math answer checking and the reward process pool.

Test: `PYTHONPATH=$PWD python -m pytest -q tests/test_rewards.py`
"""
from __future__ import annotations

import os
import signal
import time
from fractions import Fraction

import pytest

from rollout_workers.reward_pool import RewardPool, ScoreResult, resolve_reward_fn
from rollout_workers.rewards import (extract_final_answer, has_final_answer, is_safe_answer, plain_number, score_math,
                                     score_math_without_parser)

GSM8K_COMPLETION = (
    "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4, so she sells 16 - 3 - 4 = 9 eggs.\n"
    "She makes 9 * 2 = $18 every day at the farmers' market.\n#### 18"
)
MATH_COMPLETION = (
    "We have that $r = \\sqrt{0^2 + 3^2} = 3.$ The line to $(0,3)$ makes an angle of $\\frac{\\pi}{2}$ "
    "with the positive $x$-axis.\n\nTherefore, the polar coordinates are "
    "$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$"
)


def boxed(answer: str) -> str:
    return f"Let me compute step by step. First 2 + 2 = 4. So the final answer is $\\boxed{{{answer}}}$."


@pytest.mark.parametrize("completion,gold,expected", [
    (GSM8K_COMPLETION, "18", 1.0),
    (GSM8K_COMPLETION, "19", 0.0),
    (MATH_COMPLETION, "(3,\\frac{\\pi}{2})", 1.0),
    (MATH_COMPLETION, "(\\frac{\\pi}{2},3)", 0.0),
    (boxed("\\frac{1}{2}"), "0.5", 1.0),
    (boxed("\\frac12"), "0.5", 1.0),
    (boxed("0.5"), "\\frac{1}{2}", 1.0),
    (boxed("x=5"), "5", 1.0),
    (boxed("x = 6"), "5", 0.0),
    (boxed("1,450,000"), "1450000", 1.0),
    (boxed("1,450,001"), "1450000", 0.0),
    ("The total is 1,234 apples.\n#### 1,234", "1234", 1.0),
    ("#### -7.5", "-\\frac{15}{2}", 1.0),
    (boxed("[1,2)"), "[1,2)", 1.0),
    (boxed("[1,2)"), "(1,2]", 0.0),
    (boxed("(1,2]"), "[1,2)", 0.0),
    (boxed("(1, 2, 3)"), "(1,2,3)", 1.0),
    (boxed("(1, 3, 2)"), "(1,2,3)", 0.0),
    (boxed("\\dfrac{\\sqrt{2}}{2}"), "\\frac{1}{\\sqrt{2}}", 1.0),
    (boxed("\\$18"), "18", 1.0),
    (boxed("579"), "578", 0.0),
    ("I think the answer is 18 but I am not sure.", "18", 0.0),
    ("", "18", 0.0),
])
def test_score_math(completion: str, gold: str, expected: float) -> None:
    assert score_math(completion, gold) == expected


def test_last_boxed_wins() -> None:
    text = "First guess $\\boxed{3}$, but re-checking, $2 \\cdot 2 = 4$, so $\\boxed{4}$."
    assert extract_final_answer(text) == "4"
    assert score_math(text, "4") == 1.0
    assert score_math(text, "3") == 0.0


def test_boxed_beats_gsm8k_marker_and_nested_braces_kept() -> None:
    text = "#### 7\nActually $\\boxed{\\frac{1}{\\sqrt{2}}}$"
    assert extract_final_answer(text) == "\\frac{1}{\\sqrt{2}}"


def test_no_answer_forms() -> None:
    assert extract_final_answer("the answer is 5") is None
    assert extract_final_answer("so \\boxed{12") is None  # truncated generation: unbalanced last box
    assert extract_final_answer("\\boxed{3} then \\boxed{4") is None
    assert extract_final_answer("#### no number") is None
    assert not has_final_answer("the answer is 5")
    assert has_final_answer(boxed("5")) and has_final_answer("#### 5")


@pytest.mark.parametrize("completion,gold,answer_format,expected", [
    ("The answer is 124.", "124", "last_number", 1.0),
    ("The answer is 124.", "124", "boxed", 0.0),
    ("The answer is 124.", "124", "gsm8k", 0.0),
    ("75 + 49 = 124. The answer is 125.", "124", "last_number", 0.0),  # the LAST number counts
    ("So 5-3 = 2", "2", "last_number", 1.0),  # a minus after a digit is not a sign
    ("It costs $1,234 in total", "1234", "last_number", 1.0),
    ("It is -7.50 degrees", "-\\frac{15}{2}", "last_number", 1.0),  # math-verify for LaTeX golds
    ("Half: 1/2", "0.5", "last_number", 1.0),
    ("#### 18", "18", "gsm8k", 1.0),
    (boxed("18"), "18", "gsm8k", 0.0),  # gsm8k reads only `#### N`
    ("#### 17\nso $\\boxed{18}$", "18", "gsm8k", 0.0),
    ("#### 17\nso $\\boxed{18}$", "18", "last_number", 1.0),  # a box beats `####` and plain numbers
    ("I got 18, then checked: #### 19 and wrote 20", "19", "last_number", 1.0),  # `####` beats plain
    ("no digits at all", "1", "last_number", 0.0),
])
def test_answer_formats(completion: str, gold: str, answer_format: str, expected: float) -> None:
    assert score_math(completion, gold, answer_format) == expected


def test_unknown_answer_format_is_refused() -> None:
    with pytest.raises(ValueError, match="answer_format"):
        extract_final_answer("42", "last")
    with pytest.raises(ValueError, match="answer_format"):
        RewardPool(answer_format="last", timeout_s=1.0)


@pytest.mark.parametrize("text,value", [
    ("42", Fraction(42)), (" -7.50 ", Fraction(-15, 2)), ("1,234", Fraction(1234)), ("\\$18", Fraction(18)),
    ("3/4", Fraction(3, 4)), ("007", Fraction(7)),
    ("1, 2", None), ("1,23", None), ("(1,2)", None), ("3/0", None), ("1e5", None), ("0x10", None),
    ("\\frac{1}{2}", None), ("2^{10}", None), ("1_000", None), ("\u0661\u0662", None), ("1" * 101, None),
    ("__import__('os')", None), ("", None),
])
def test_plain_number_is_exact_and_strict(text: str, value) -> None:
    assert plain_number(text) == value


def test_fast_path_skips_math_verify_only_for_plain_numbers(monkeypatch) -> None:
    import math_verify

    def refuse(*args, **kwargs):
        raise AssertionError("math-verify called")

    monkeypatch.setattr(math_verify, "verify", refuse)
    assert score_math(boxed("579"), "579") == 1.0
    assert score_math(boxed("579"), "578") == 0.0
    assert score_math("#### 1,450,000", "1450000") == 1.0
    assert score_math(boxed("0.5"), "1/2") == 1.0
    assert score_math(boxed("2.50"), "2.5") == 1.0
    assert score_math("The answer is 9.", "9", "last_number") == 1.0
    # Exact, not float: 0.1 + 0.2 style rounding can never make two different numbers equal.
    assert score_math(boxed("0.30000000000000004"), "0.3") == 0.0
    assert score_math(boxed("12345678901234567890"), "12345678901234567891") == 0.0
    with pytest.raises(AssertionError, match="math-verify called"):
        score_math(boxed("\\frac{1}{2}"), "0.5")
    with pytest.raises(AssertionError, match="math-verify called"):
        score_math(boxed("x=5"), "5")


def test_last_number_hostile_inputs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    assert score_math(f"The answer is {payload}", "12345", "last_number") == 0.0
    assert score_math("The answer is 1" + "0" * 5000, "1" + "0" * 5000, "last_number") == 0.0  # over-long
    assert score_math("9" * 1_000_000, "9", "last_number") == 0.0
    assert score_math("1," * 500_000 + "7", "7", "last_number") == 1.0
    assert score_math("-" * 1_000_000 + "3", "-3", "last_number") == 1.0
    assert score_math("The answer is 5\x00", "5", "last_number") == 0.0
    assert score_math("The answer is 9^{9^{9}}", "9", "last_number") == 1.0  # a plain number, never a tower
    assert not marker.exists()


def test_code_in_boxed_is_not_executed(tmp_path) -> None:
    marker = tmp_path / "pwned"
    for payload in (f"__import__('os').system('touch {marker}')",
                    f"\\text{{__import__('os').system('touch {marker}')}}",
                    f"exec(\"open('{marker}','w')\")"):
        assert score_math(boxed(payload), "0") == 0.0
        assert score_math(boxed("0"), payload) == 0.0
    assert score_math(f"#### 0 __import__('os').system('touch {marker}')", "1") == 0.0
    assert not marker.exists()


@pytest.mark.parametrize("answer", [
    "9^{9^{9^{9^{9}}}}",  # exponent nesting 5
    "9^{9^{9}}",  # numeric tower: sympy would build a 370-million-digit integer
    "x^{2^{10}}+9^{9^{9}}",
    "2^{1234567}",
    "1234567!",
    "{" * 20 + "1" + "}" * 20,
    "1\x00",
    "1" * 1001,
])
def test_pathological_answers_rejected(answer: str) -> None:
    assert not is_safe_answer(answer)
    assert score_math(boxed(answer), "1") == 0.0


def test_unbalanced_gold_rejected() -> None:
    assert not is_safe_answer("1}") and not is_safe_answer("{1")
    assert score_math(boxed("1"), "1}") == 0.0


@pytest.mark.parametrize("answer", ["e^{x^{2}}", "2^{10}", "\\frac{\\sqrt{3}}{2}", "x^{2^{n}}", "10^{-7}"])
def test_ordinary_answers_accepted(answer: str) -> None:
    assert is_safe_answer(answer)


def test_huge_inputs_return_quickly() -> None:
    start = time.monotonic()
    assert score_math("\\boxed{" + "{" * 1_000_000, "1") == 0.0
    assert score_math("#" * 1_000_000 + "\\boxed{1", "1") == 0.0
    assert score_math("\\boxed{1}\x00", "1") == 0.0
    assert score_math("1 " * 500_000, "1", "last_number") == 1.0
    assert score_math("-1." * 300_000, "1", "last_number") == 0.0
    assert time.monotonic() - start < 5.0


def test_resolve_reward_fn_errors_name_the_path() -> None:
    assert resolve_reward_fn("rollout_workers.rewards:score_math") is score_math
    for path, words in [("no_such_module_xyz:f", "cannot import module"),
                        ("tests.reward_fns:missing", "no attribute"),
                        ("tests.reward_fns:NOT_CALLABLE", "not callable"),
                        ("tests.reward_fns", "module:function")]:
        with pytest.raises(ValueError, match=words) as info:
            resolve_reward_fn(path)
        assert path in str(info.value)


def test_pool_reports_bad_reward_fn_at_start() -> None:
    with pytest.raises(ValueError, match="tests.reward_fns:missing"):
        RewardPool("tests.reward_fns:missing", timeout_s=1.0)


WITHOUT_PARSER_CASES = [  # (completion, gold, decided without the LaTeX parser: score_math + format 0.25, or None)
    (boxed("57"), "57", 1.25), (boxed("57.0"), "57", 1.25), (boxed("-3/6"), "-1/2", 1.25), (boxed("56"), "57", 0.25),
    (GSM8K_COMPLETION, "18", 1.25), ("no answer here", "57", 0.0), (boxed("1\x00"), "1", 0.0),
    (boxed("9^{9^{9^{9^{9}}}}"), "1", 0.0), ("\\boxed{" + "{" * 5000, "1", 0.0),
    (boxed("\\frac12"), "0.5", None), (boxed("0.5"), "\\frac{1}{2}", None), (boxed("x=5"), "5", None),
    (boxed("7"), "9^{9^{9^{9^{9}}}}", 0.25), (boxed("\\frac12"), "9^{9^{9^{9^{9}}}}", None),
]


@pytest.mark.parametrize("completion,gold,decided", WITHOUT_PARSER_CASES)
def test_scoring_without_the_parser_decides_only_what_needs_no_parser_and_agrees(completion, gold, decided) -> None:
    assert score_math_without_parser(completion, gold, "boxed", 0.25) == decided
    full = score_math(completion, gold) + 0.25 * has_final_answer(completion)  # what a pool process computes
    assert decided is None or decided == full
    assert score_math_without_parser(completion, gold) in (None, score_math(completion, gold))


def test_plain_number_samples_are_scored_without_a_pool_process() -> None:
    """Plain-number answers never reach the pool: with its processes killed, scoring them needs no
    restart; a LaTeX answer does (and is still scored right on the new pool)."""
    with RewardPool(processes=1, timeout_s=5.0) as pool:
        for pid in pool.worker_pids:
            os.kill(pid, signal.SIGKILL)
        plain = pool.score([boxed("57"), boxed("56"), "no answer", GSM8K_COMPLETION], ["57", "57", "57", "18"])
        assert plain == ScoreResult([1.0, 0.0, 0.0, 1.0], 0, 0) and pool.restarts == 0
        assert pool.score([boxed("\\frac12"), boxed("7")], ["0.5", "7"]) == ScoreResult([1.0, 1.0], 0, 0)
        assert pool.restarts == 1


@pytest.fixture(scope="module")
def math_pool():
    with RewardPool(processes=2, timeout_s=5.0, format_reward=0.25) as pool:
        yield pool


def test_pool_scores_math_in_order_with_format_reward(math_pool: RewardPool, tmp_path) -> None:
    marker = tmp_path / "pwned"
    completions = [GSM8K_COMPLETION, boxed("\\frac12"), boxed("7"), "no answer here",
                   boxed("9^{9^{9^{9^{9}}}}"), boxed(f"__import__('os').system('touch {marker}')"),
                   "\\boxed{" + "{" * 1_000_000, boxed("1\x00")]
    golds = ["18", "0.5", "8", "8", "1", "0", "1", "1"]
    start = time.monotonic()
    result = math_pool.score(completions, golds)
    assert isinstance(result, ScoreResult)
    # Right answers get 1 + format; wrong-but-boxed gets the format bonus only; the rest get 0.
    assert result.rewards == [1.25, 1.25, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert (result.timeouts, result.errors) == (0, 0)
    assert not marker.exists()
    assert time.monotonic() - start < 3 * math_pool.timeout_s  # the power tower did not reach sympy
    assert math_pool.score([], []) == ScoreResult([], 0, 0)
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        math_pool.score(["a", "b"], ["a"])


@pytest.fixture(scope="module")
def bad_pool():
    with RewardPool("tests.reward_fns:misbehave", processes=2, timeout_s=1.0) as pool:
        yield pool


def test_pool_counts_python_timeout_and_keeps_scoring(bad_pool: RewardPool) -> None:
    restarts = bad_pool.restarts
    start = time.monotonic()
    result = bad_pool.score(["a", "SPIN", "b", "c"], ["a", "x", "b", "x"])
    assert time.monotonic() - start < 3 * bad_pool.timeout_s
    assert result == ScoreResult([1.0, 0.0, 1.0, 0.0], timeouts=1, errors=0)
    assert bad_pool.restarts == restarts  # the in-process timer ended it; no restart needed
    assert bad_pool.score(["a"], ["a"]) == ScoreResult([1.0], 0, 0)


def test_pool_kills_and_recreates_deaf_process(bad_pool: RewardPool) -> None:
    restarts = bad_pool.restarts
    result = bad_pool.score(["a", "DEAF", "b", "c", "d"], ["a", "x", "b", "c", "x"])
    assert result == ScoreResult([1.0, 0.0, 1.0, 1.0, 0.0], timeouts=1, errors=0)
    assert bad_pool.score(["e", "f"], ["e", "e"]) == ScoreResult([1.0, 0.0], 0, 0)
    assert bad_pool.restarts == restarts + 1


def test_pool_counts_errors_and_non_finite(bad_pool: RewardPool) -> None:
    result = bad_pool.score(["RAISE", "NAN", "INF", "STR", "a"], ["x", "x", "x", "x", "a"])
    assert result == ScoreResult([0.0, 0.0, 0.0, 0.0, 1.0], timeouts=0, errors=4)


def test_pool_blames_only_the_crashing_sample(bad_pool: RewardPool) -> None:
    result = bad_pool.score(["a", "CRASH", "b", "c", "d", "e"], ["a", "x", "b", "c", "d", "x"])
    assert result == ScoreResult([1.0, 0.0, 1.0, 1.0, 1.0, 0.0], timeouts=0, errors=1)
    assert bad_pool.score(["a"], ["a"]) == ScoreResult([1.0], 0, 0)


def test_pool_recovers_from_a_process_killed_while_idle(bad_pool: RewardPool) -> None:
    bad_pool.score(["a"], ["a"])  # make sure the pool is up
    os.kill(next(iter(bad_pool.worker_pids)), signal.SIGKILL)  # as the OOM killer would
    # Whether the executor notices the death at submit time or mid-batch, no sample is lost or blamed.
    for _ in range(2):
        assert bad_pool.score(["a", "b", "c"], ["a", "x", "c"]) == ScoreResult([1.0, 0.0, 1.0], 0, 0)
