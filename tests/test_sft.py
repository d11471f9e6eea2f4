"""The supervised warm-up learns only rows that fit the limits RL samples within.

    PYTHONPATH=$PWD python -m pytest -q tests/test_sft.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.config import ConfigError, load_config
from launch.data.sources import load_prompts
from launch.sft import TARGET_OVER_MAX_NEW_TOKENS, rows_within_limits
from launch.tiny_model import train_tokenizer
from launch.train import prepare_model
from rollout_workers.types import OVER_MAX_PROMPT_TOKENS


def test_rows_within_limits_counts_prompt_and_target_with_its_eos() -> None:
    # The tiny tokenizer splits digits one per token, so these lengths are exact: prompts of 4, 5
    # and 2 tokens; targets of 2, 1 and 3 tokens, plus the EOS.
    tokenizer = train_tokenizer(["1234567890"] * 10)
    rows = rows_within_limits(tokenizer, ["1234", "12345", "12", "9999"], ["56", "5", "567", "12"],
                              max_prompt_tokens=4, max_new_tokens=3)
    assert rows.kept == [0, 3]
    assert rows.skipped == {OVER_MAX_PROMPT_TOKENS: 1, TARGET_OVER_MAX_NEW_TOKENS: 1}
    # At the limit a row fits: "567" + EOS is 4 tokens.
    assert rows_within_limits(tokenizer, ["12"], ["567"], 4, 4).kept == [0]


def _math_rows(path: Path, problems: list[tuple[str, str]]) -> str:
    """A local MATH-format train split (data.path with {split}), one row per (problem, gold)."""
    for split in ("train", "eval"):
        with open(path / f"{split}.jsonl", "w") as f:
            for i, (problem, gold) in enumerate(problems):
                f.write(json.dumps({"unique_id": f"{split}{i}", "problem": problem,
                                    "solution": f"So the answer is $\\boxed{{{gold}}}$."}) + "\n")
    return str(path / "{split}.jsonl")


def _warm_up_config(data_path: str):
    return load_config(None, ["data.source=math", f"data.path={data_path}", "model.sft_steps=2",
                              "model.sft_batch_size=2", "model.sft_stop_accuracy=0", "model.tiny_hidden_size=32",
                              "model.tiny_layers=1", "model.tiny_heads=2", "rollout.max_prompt_tokens=64",
                              "rollout.max_new_tokens=16"])


def test_warm_up_leaves_out_and_counts_rows_past_the_rollout_limits(tmp_path: Path) -> None:
    """MATH's long problems kept the embedded model's warm-up running for over 10 minutes, past its
    256 positions: the warm-up now learns only what RL can sample, and says what it left out."""
    long_problem = "Add up " + " ".join(str(i) for i in range(60)) + "."  # 110 digits: over 64 tokens
    short = [(f"What is {a} + {a}?", str(2 * a)) for a in range(1, 7)]
    data_path = _math_rows(tmp_path, short + [(long_problem, "1770"), ("What is 10^20?", "1" + "0" * 20)])
    cfg = _warm_up_config(data_path)
    train = load_prompts(cfg.data, "train").prompts
    assert len(train) == 8

    model_dir, info = prepare_model(cfg, tmp_path / "run", train)

    assert info["sft_rows"] == 6
    assert info["sft_rows_skipped"] == {OVER_MAX_PROMPT_TOKENS: 1, TARGET_OVER_MAX_NEW_TOKENS: 1}
    recorded = json.loads((tmp_path / "run" / "sft.json").read_text())
    assert (recorded["sft_rows"], recorded["sft_rows_skipped"]) == (6, info["sft_rows_skipped"])
    assert info["sft_steps"] == 2
    assert (model_dir / "config.json").exists()


def test_warm_up_with_no_row_within_the_limits_names_the_keys(tmp_path: Path) -> None:
    long_problem = "Add up " + " ".join(str(i) for i in range(60)) + "."
    cfg = _warm_up_config(_math_rows(tmp_path, [(long_problem, "1770"), (long_problem + " Twice.", "3540")]))
    train = load_prompts(cfg.data, "train").prompts
    with pytest.raises(ConfigError, match=r"rollout\.max_prompt_tokens=64 .* rollout\.max_new_tokens=16 .*"
                                          r"'over_max_prompt_tokens': 2.* model\.sft_steps=0"):
        prepare_model(cfg, tmp_path / "run", train)
