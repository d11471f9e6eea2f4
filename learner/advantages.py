"""Group-relative advantages (DASH paper, arXiv 2505.17218, Sec. 2: GRPO; Dr.GRPO; RLOO).

Pure tensor math, no Ray/DeepSpeed. Tested by:
    PYTHONPATH=$PWD python -m pytest -q tests/test_learner_math.py
"""
from __future__ import annotations

import torch

ESTIMATORS = ("grpo", "drgrpo", "rloo")


def group_advantages(rewards: torch.Tensor, estimator: str, eps: float = 1e-6) -> torch.Tensor:
    """Per-completion advantages of N groups of G completions each.

    rewards: (N, G) float. Returns (N, G) in the same dtype.
    - "grpo":   (r - mean) / (std + eps), std = POPULATION std (divide by G, `unbiased=False`).
      Why population: it is defined for every G >= 1 (the sample std is NaN at G = 1), and it
      is the std of the group's own empirical reward distribution, so with binary rewards
      |A| = sqrt(p/(1-p)) or sqrt((1-p)/p) does not depend on G (the paper's 0.1 filter
      threshold then means the same thing for any group size).
    - "drgrpo": r - mean (Dr.GRPO drops the std division).
    - "rloo":   r_i - mean_{j != i} r_j (leave-one-out baseline; needs G >= 2).
    A NaN/inf reward raises ValueError naming the first bad group (a reward crash must not be
    silently averaged into a group's baseline; the caller counts and skips such groups first).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be (num_groups, group_size >= 1), got shape {tuple(rewards.shape)}")
    bad = ~torch.isfinite(rewards).all(dim=1)
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"non-finite reward in group {first} ({int(bad.sum())} bad group(s)): "
                         f"{rewards[first].tolist()}")
    group_size = rewards.shape[1]
    mean = rewards.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        return (rewards - mean) / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    if estimator == "drgrpo":
        return rewards - mean
    if group_size < 2:
        raise ValueError("rloo needs group_size >= 2 (leave-one-out of a single completion is undefined)")
    # mean of the others = (sum - r_i) / (G - 1)  =>  r_i - that = G/(G-1) * (r_i - mean)
    return (rewards - mean) * (group_size / (group_size - 1))
