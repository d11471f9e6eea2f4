"""The reasoning regime's synthetic task "chain": worked multi-step solutions ending in \\boxed{}.

    PYTHONPATH=$PWD python -m pytest -q tests/test_chain_task.py
"""
from __future__ import annotations

import re

import pytest

from launch.tiny_model import train_tokenizer
from launch.data.config import DataConfig
from launch.data.sources import load_prompts
from launch.data.synthetic import CHAIN_MAX_OPS, CHAIN_MIN_OPS, synthetic_problems
from launch.data.templates import sft_target
from rollout_workers.rewards import score_math

_LINE = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)$")


def test_chain_is_deterministic_and_seeded() -> None:
    a = synthetic_problems(("chain",), 2, 300, seed=5, split="train")
    assert a == synthetic_problems(("chain",), 2, 300, seed=5, split="train")
    assert {p.uid for p in a} != {p.uid for p in synthetic_problems(("chain",), 2, 300, seed=6, split="train")}
    assert len({p.uid for p in a}) == 300


def test_chain_eval_split_is_disjoint_from_train_across_seeds() -> None:
    train = {p.text for p in synthetic_problems(("chain",), 2, 3000, seed=0, split="train")}
    for seed in (0, 1, 2):
        evals = {p.text for p in synthetic_problems(("chain",), 2, 200, seed=seed, split="eval")}
        assert len(evals) == 200 and not evals & train


def test_chain_gold_and_every_step_are_correct() -> None:
    for p in synthetic_problems(("chain",), 2, 500, seed=3, split="train"):
        question = p.text.removeprefix("Q: ").removesuffix(" = ?\nA:")
        tokens = question.split(" ")
        *lines, last = p.solution.split("\n")
        assert CHAIN_MIN_OPS <= len(lines) == (len(tokens) - 1) // 2 <= CHAIN_MAX_OPS
        total = int(tokens[0])
        for k, line in enumerate(lines):  # each line: previous total, the question's k-th operation, new total
            left, op, right, result = _LINE.match(line).groups()
            assert (int(left), op, right) == (total, tokens[1 + 2 * k], tokens[2 + 2 * k])
            total = total + int(right) if op == "+" else total - int(right)
            assert int(result) == total >= 0
        assert p.gold == str(total)
        assert last == f"so the answer is \\boxed{{{total}}}"
        assert score_math(sft_target(p), p.gold) == 1.0  # the reward function reads the SFT target as right
        assert score_math(sft_target(p).replace(f"{{{total}}}", f"{{{total + 1}}}"), p.gold) == 0.0


def test_chain_solutions_are_at_least_48_tokens_and_difficulty_is_mixed() -> None:
    prompts = synthetic_problems(("chain",), 2, 2000, seed=0, split="train")
    # The tokenizer the embedded model trains on these texts (launch.train.prepare_model does the same).
    tokenizer = train_tokenizer([p.text + sft_target(p) for p in prompts])
    lengths = [len(tokenizer(sft_target(p))["input_ids"]) for p in prompts]
    assert min(lengths) >= 48
    ops = {p.solution.count("\n") for p in prompts}
    assert ops == set(range(CHAIN_MIN_OPS, CHAIN_MAX_OPS + 1))


def test_answer_only_tasks_keep_their_boxed_target_and_config_accepts_chain() -> None:
    (add,) = synthetic_problems(("add",), 2, 1, seed=0, split="train")
    assert add.solution == "" and sft_target(add) == f" \\boxed{{{add.gold}}}"
    cfg = DataConfig(synthetic_tasks=("chain",), synthetic_digits=2, synthetic_train_size=20, eval_size=5)
    assert all(p.solution for p in load_prompts(cfg, "eval").prompts)
    with pytest.raises(ValueError, match="data.synthetic_tasks"):
        DataConfig(synthetic_tasks=("chains",))
