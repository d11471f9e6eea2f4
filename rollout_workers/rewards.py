"""Reward functions: math answer checking as pure functions (strings in, a float or an answer out;
no tensors, processes or timers). `rollout_workers.reward_pool.RewardPool` runs them with
per-sample timeouts; `rollout.reward_fn` names one of them ("rollout_workers.rewards:score_math").

Test: `PYTHONPATH=$PWD python -m pytest -q tests/test_rewards.py`

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

import re
from fractions import Fraction

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

    # Timeouts off: they use signal.alarm; the pool bounds the time instead (rollout_workers.reward_pool).
    return parse("\\boxed{" + answer + "}", extraction_config=[LatexExtractionConfig()],
                 parsing_timeout=None)


DEFAULT_REWARD_FN = "rollout_workers.rewards:score_math"
"""The reward function `rollout.reward_fn` names by default (`score_math`)."""


def score_math_without_parser(completion: str, gold: str, answer_format: str = "boxed",
                              format_reward: float = 0.0) -> float | None:
    """`score_math` (plus `format_reward` when `has_final_answer`) where no LaTeX parser is needed,
    else None: no answer, an unsafe one, or two plain numbers. Only bounded regex scans and
    `Fraction` on digit strings run, so the caller may run it in its own process with no timeout
    (`RewardPool` does, and sends only the None cases to its processes)."""
    if "\x00" in completion:
        return 0.0
    return _decide_without_parser(extract_final_answer(completion, answer_format), gold, format_reward)


def _decide_without_parser(answer: str | None, gold: str, format_reward: float) -> float | None:
    """`score_math_without_parser` once the completion's final answer is extracted."""
    if answer is None or not is_safe_answer(answer):
        return 0.0
    answer_number = plain_number(answer)
    if not is_safe_answer(gold):
        return format_reward if answer_number is not None else (None if format_reward else 0.0)
    gold_number = plain_number(gold)
    if answer_number is None or gold_number is None:
        return None
    return (1.0 if answer_number == gold_number else 0.0) + format_reward


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
    decided = _decide_without_parser(answer, gold, 0.0)
    if decided is not None:
        return decided
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
