"""Gradient filtering (DASH paper, arXiv 2505.17218, Sec. 3.2): drop samples with |A| <= threshold
BEFORE any forward pass, so a filtered sample costs no compute (the paper's code filters after the
forward pass and saves nothing).

Tested by:
    PYTHONPATH=$PWD python -m pytest -q tests/test_learner_math.py
"""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple, Sequence

import torch

from learner.advantages import group_advantages
from learner.groups import ScoredGroupLike


def filter_mask(advantages: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep mask, same shape as `advantages`: True where |A| > threshold (strict, so with
    threshold 0 a zero advantage, which carries no gradient, is dropped too)."""
    return advantages.abs() > threshold


class Sample(NamedTuple):
    """One kept completion, ready for packing. Token tuples are plain Python (cheap to ship)."""

    uid: int
    """Index of the sample in the learner's current sampled batch (stable across epochs)."""
    prompt_token_ids: tuple[int, ...]
    """(P,)"""
    completion_token_ids: tuple[int, ...]
    """(C,)"""
    logprobs_sampler: tuple[float, ...]
    """(C,) engine logprobs of the completion tokens."""
    advantage: float
    """Scalar advantage of the completion (broadcast to its tokens)."""

    @property
    def num_tokens(self) -> int:
        """Tokens the forward pass sees (prompt + completion): what a micro-batch budget counts."""
        return len(self.prompt_token_ids) + len(self.completion_token_ids)


class FilterResult(NamedTuple):
    """The kept samples of some groups and why the others were dropped."""

    samples: list[Sample]
    drop_reasons: Counter
    """Dropped SAMPLES per reason: "all_correct" / "all_wrong" (a group whose rewards are all equal,
    > 0 / <= 0: with the usual 0/1 correctness rewards, all right / all wrong), "small_advantage"
    (a mixed group's sample with |A| <= threshold), "empty_completion"."""
    samples_in: int


def validate_group(group: ScoredGroupLike, group_size: int, index: int) -> None:
    """Clear errors for a malformed group (the learner refuses it rather than guessing)."""
    g = len(group.completions)
    if g != group_size:
        raise ValueError(f"group {index} ({group.prompt.uid!r}) has {g} completions, expected group_size={group_size}")
    if len(group.rewards) != g:
        raise ValueError(f"group {index} ({group.prompt.uid!r}) has {len(group.rewards)} rewards for {g} completions")
    if group.advantages is not None and len(group.advantages) != g:
        raise ValueError(f"group {index} ({group.prompt.uid!r}) has {len(group.advantages)} advantages for {g} completions")
    if not group.prompt_token_ids:
        raise ValueError(f"group {index} ({group.prompt.uid!r}) has an empty prompt (a completion token needs context)")
    for c in group.completions:
        if len(c.logprobs_sampler) != len(c.token_ids):
            raise ValueError(f"group {index} ({group.prompt.uid!r}): completion with {len(c.token_ids)} tokens "
                             f"but {len(c.logprobs_sampler)} sampler logprobs")


def select_samples(groups: Sequence[ScoredGroupLike], estimator: str, threshold: float, apply_filter: bool,
                   first_uid: int = 0) -> FilterResult:
    """Advantages (the group's own, else computed) + filter -> kept samples and drop reasons.

    Every group must have the same size G (the first group's). NaN rewards raise (see
    `group_advantages`). Completions with no tokens are always dropped ("empty_completion": no
    token carries their gradient). Nothing here runs a model.
    """
    if not groups:
        return FilterResult([], Counter(), 0)
    group_size = len(groups[0].completions)
    for i, g in enumerate(groups):
        validate_group(g, group_size, i)
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)  # (N, G)
    computed = group_advantages(rewards, estimator)
    advantages = torch.stack([torch.tensor(g.advantages, dtype=torch.float64) if g.advantages is not None
                              else computed[i] for i, g in enumerate(groups)])  # (N, G)
    keep = filter_mask(advantages, threshold) if apply_filter else torch.ones_like(advantages, dtype=torch.bool)
    reasons: Counter = Counter()
    samples: list[Sample] = []
    uid = first_uid
    for i, g in enumerate(groups):
        all_equal = bool((rewards[i] == rewards[i, 0]).all())
        for j, c in enumerate(g.completions):
            uid += 1
            if not c.token_ids:
                reasons["empty_completion"] += 1
            elif not keep[i, j]:
                if all_equal:
                    reasons["all_correct" if float(rewards[i, 0]) > 0 else "all_wrong"] += 1
                else:
                    reasons["small_advantage"] += 1
            else:
                samples.append(Sample(uid - 1, tuple(g.prompt_token_ids), tuple(c.token_ids),
                                      tuple(c.logprobs_sampler), float(advantages[i, j])))
    return FilterResult(samples, reasons, len(groups) * group_size)
