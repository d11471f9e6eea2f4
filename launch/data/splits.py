"""Train/eval splits decided by hashes of the problem text, so that they do not move with any seed
and no train problem ever equals an eval problem.

    PYTHONPATH=$PWD python -m pytest -q tests/test_prompts.py
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

from rollout_workers.types import Prompt

SPLITS = ("train", "eval")
"""The splits `load_prompts` serves."""
SYNTHETIC_EVAL_BUCKETS = 16
"""1/16 of all synthetic problems (by question hash) are reserved for the eval split."""


def check_split(split: str) -> None:
    """A clear ValueError unless `split` is one of SPLITS."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def text_hash(text: str) -> str:
    """Hex SHA-256 of `text` (UTF-8): the stable hash behind splits, synthetic uids and the
    cursor's fingerprint of a prompt list."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def synthetic_split(question: str) -> str:
    """The split a synthetic question belongs to: "eval" iff its hash falls in 1 of
    SYNTHETIC_EVAL_BUCKETS buckets."""
    return "eval" if int(text_hash(question)[:8], 16) % SYNTHETIC_EVAL_BUCKETS == 0 else "train"


def hash_split(prompts: Sequence[Prompt], problems: Sequence[str], eval_size: int, split: str) -> list[Prompt]:
    """Deterministic split of one file: the `eval_size` prompts whose problem text has the smallest
    SHA-256 are "eval", the rest "train" (file order kept). Independent of seeds, so stable."""
    ranked = sorted(range(len(prompts)), key=lambda i: text_hash(problems[i]))
    eval_ids = set(ranked[:eval_size])
    return [p for i, p in enumerate(prompts) if (i in eval_ids) == (split == "eval")]
