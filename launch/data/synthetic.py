"""Synthetic problems: generated from a seed, split into train/eval by a hash of the question
(`launch.data.splits.synthetic_split`), prompt `TINY_TEMPLATE`, gold = the integer answer.

    PYTHONPATH=$PWD python -m pytest -q tests/test_prompts.py tests/test_chain_task.py

Task "chain" (the bench's reasoning regime) also carries a worked solution, one line per
operation, that the SFT warm-up teaches, so completions are step-by-step traces of 48+ tokens.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

from launch.data.splits import SYNTHETIC_EVAL_BUCKETS, check_split, synthetic_split, text_hash
from launch.data.templates import TINY_TEMPLATE
from rollout_workers.types import Prompt

CHAIN_MIN_OPS = 4
"""Fewest operations of a "chain" problem: with 2-digit operands its shortest worked solution is
>= 48 tokens of the embedded tokenizer (digits are single tokens)."""
CHAIN_MAX_OPS = 6
"""Most operations of a "chain" problem: the mix of 4..6 steps spreads difficulty, so that some
groups are all right and some all wrong after the warm-up, as on MATH with small models."""

_NAMES = (("Ann", "She"), ("Ben", "He"), ("Chen", "She"), ("Dara", "She"), ("Eli", "He"), ("Femi", "He"))
_ITEMS = ("pens", "apples", "stickers", "marbles", "cards", "books")


def synthetic_problems(tasks: Sequence[str], digits: int, n: int, seed: int, split: str) -> list[Prompt]:
    """`n` distinct synthetic problems of `split`, deterministic in (tasks, digits, n, seed, split).

    Tasks: "add" (two `digits`-digit numbers), "mul" (a `digits`-digit number times a 1-2 digit
    number), "word" (two-step word problems), "chain" (CHAIN_MIN_OPS..CHAIN_MAX_OPS additions and
    subtractions of `digits`-digit numbers, with a worked solution). A clear ValueError when the
    problem space of the split is too small for `n` (e.g. 1-digit addition).
    """
    check_split(split)
    if not tasks:
        raise ValueError("synthetic_problems needs at least one task")
    makers = {"add": _add_problem, "mul": _mul_problem, "word": _word_problem, "chain": _chain_problem}
    for task in tasks:
        if task not in makers:
            raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(makers)}")
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    rng = random.Random(f"synthetic/{seed}/{split}/{digits}/{','.join(tasks)}")
    prompts: list[Prompt] = []
    seen: set[str] = set()
    attempts = 0
    # Only 1 in SYNTHETIC_EVAL_BUCKETS draws lands in the eval split: give it as many tries per problem.
    max_attempts = 50 * n * (SYNTHETIC_EVAL_BUCKETS if split == "eval" else 1) + 1000
    while len(prompts) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"only {len(prompts)} distinct {split} problems found for tasks={list(tasks)}, "
                             f"digits={digits}; ask for fewer than {n} or raise digits")
        task = tasks[rng.randrange(len(tasks))]
        question, answer, solution = makers[task](rng, digits)
        if question in seen or (synthetic_split(question) != split):
            continue
        seen.add(question)
        prompts.append(Prompt(uid=f"synthetic-{task}-{text_hash(question)[:16]}",
                              text=TINY_TEMPLATE.format(question=question), gold=str(answer), solution=solution))
    return prompts


class _Problem(NamedTuple):
    """One generated synthetic problem."""

    question: str
    """The question, without the template."""
    answer: int
    """The integer answer."""
    solution: str = ""
    """Worked solution ending in `\\boxed{answer}`; empty for the answer-only tasks."""


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)


def _add_problem(rng: random.Random, digits: int) -> _Problem:
    a, b = _operand(rng, digits), _operand(rng, digits)
    return _Problem(f"{a} + {b} = ?", a + b)


def _mul_problem(rng: random.Random, digits: int) -> _Problem:
    a, b = _operand(rng, digits), rng.randrange(2, 100)
    return _Problem(f"{a} * {b} = ?", a * b)


def _word_problem(rng: random.Random, digits: int) -> _Problem:
    name, pronoun = _NAMES[rng.randrange(len(_NAMES))]
    item = _ITEMS[rng.randrange(len(_ITEMS))]
    small = max(2, min(10 ** digits - 1, 20))
    kind = rng.randrange(4)
    if kind == 0:
        boxes, per_box = rng.randrange(2, small + 1), rng.randrange(2, 13)
        given = rng.randrange(1, boxes * per_box)
        return _Problem(f"{name} has {boxes} boxes of {per_box} {item}. {pronoun} gives away {given} {item}. "
                        f"How many {item} does {pronoun.lower()} have now?", boxes * per_box - given)
    if kind == 1:
        packs, per_pack, had = rng.randrange(2, small + 1), rng.randrange(2, 13), _operand(rng, digits)
        return _Problem(f"{name} had {had} {item} and buys {packs} packs of {per_pack} {item}. "
                        f"How many {item} does {pronoun.lower()} have in total?", had + packs * per_pack)
    if kind == 2:
        friends, each = rng.randrange(2, 10), rng.randrange(1, small + 1)
        bought = rng.randrange(1, friends * each + 1)
        had = friends * each - bought
        return _Problem(f"{name} had {had} {item}. {pronoun} bought {bought} more and shared all of them "
                        f"equally among {friends} friends. How many {item} did each friend get?", each)
    price, count = rng.randrange(2, small + 1), rng.randrange(2, 10)
    paid = price * count + rng.randrange(0, 10 ** digits)
    return _Problem(f"A shop sells {item} at {price} dollars each. {name} buys {count} {item} and pays "
                    f"{paid} dollars. How many dollars of change does {pronoun.lower()} get?", paid - price * count)


def _chain_problem(rng: random.Random, digits: int) -> _Problem:
    """`a op b op c ... = ?` with CHAIN_MIN_OPS..CHAIN_MAX_OPS operations (+ or -) on `digits`-digit
    operands; the solution writes out one line per operation, left to right:
    "37 + 48 = 85\\n85 - 19 = 66\\n...\\nso the answer is \\boxed{66}"."""
    total = _operand(rng, digits)
    terms, lines = [str(total)], []
    for _ in range(rng.randrange(CHAIN_MIN_OPS, CHAIN_MAX_OPS + 1)):
        b = _operand(rng, digits)
        subtract = rng.randrange(2) == 1
        if subtract and b > total:
            subtract = False  # running totals stay >= 0: answers are plain non-negative integers
        new = total - b if subtract else total + b
        op = "-" if subtract else "+"
        terms.append(f"{op} {b}")
        lines.append(f"{total} {op} {b} = {new}")
        total = new
    return _Problem(f"{' '.join(terms)} = ?", total, "\n".join(lines) + f"\nso the answer is \\boxed{{{total}}}")
