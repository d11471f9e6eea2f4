"""The DASH bench's arithmetic over accuracy curves and seeds (pure functions, no I/O).

A curve is a list of points {"train_seconds", "samples_generated", "accuracy"} in time order, the
first being the shared start. Each contender runs with several seeds; the bench reports medians
with min and max, and its ratios are ratios of medians.

Target rule (`choose_target`): start + TARGET_FRACTION x (lowest median best - start), where a
contender's "median best" is the median over its seeds of the best accuracy on its curve, and the
lowest is taken over the contenders the ratios compare (RATIO_CONTENDERS present in the run). So
every compared contender reaches the target on at least half of its seeds, and the target sits
well above the start (not in its evaluation noise) whenever the weakest one learned at all.

Test: `PYTHONPATH=$PWD python -m pytest -q tests/test_bench_stats.py`
"""
from __future__ import annotations

import statistics
from typing import NamedTuple, Sequence

TARGET_FRACTION = 0.5
"""The target lies this fraction of the way from the start to the weakest compared contender's median best."""
RATIO_CONTENDERS = ("dash", "standard_grpo", "trl_grpo")
"""The contenders the ratios compare; only they set the target."""


class Spread(NamedTuple):
    """Median, min and max over seeds; None where no seed has a value (e.g. never reached the target)."""

    median: float | None
    min: float | None
    max: float | None
    count: int
    """Seeds with a value."""
    of: int
    """Seeds in all."""


def at_target(curve: Sequence[dict], target: float, key: str) -> float | int | None:
    """`point[key]` of the first point (in curve order = time order) whose accuracy reaches
    `target`; None if none does."""
    for point in curve:
        if point["accuracy"] >= target:
            return point[key]
    return None


def seconds_to_target(curve: Sequence[dict], target: float) -> float | None:
    """Training seconds at which the curve first reaches `target` (None if never)."""
    return at_target(curve, target, "train_seconds")


def interpolated_seconds_to_target(curve: Sequence[dict], target: float) -> float | None:
    """Training seconds at which the straight line between the last point below `target` and the
    first point at or above it crosses `target` (None if the curve never reaches it; the first
    point's seconds when it is already there). `seconds_to_target` rounds up to the next
    evaluation, so a contender whose evaluation falls just after the crossing reads up to one
    evaluation interval slow; this estimate does not depend on where the evaluations fall, at the
    price of assuming accuracy rose linearly between them."""
    below = None
    for point in curve:
        if point["accuracy"] >= target:
            if below is None:
                return point["train_seconds"]
            fraction = (target - below["accuracy"]) / (point["accuracy"] - below["accuracy"])
            return below["train_seconds"] + fraction * (point["train_seconds"] - below["train_seconds"])
        below = point
    return None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is 0 (undefined)."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def ratio_of_medians(spreads: dict[str, Spread], a: str, b: str) -> float | None:
    """Median of contender `a` over that of `b` (None when either is absent or has no median)."""
    if a not in spreads or b not in spreads:
        return None
    return ratio(spreads[a].median, spreads[b].median)


def spread(values: Sequence[float | None], missing_is_worst: bool = False) -> Spread:
    """Median, min and max of the seeds' values. With `missing_is_worst` (seconds to a target) a
    missing value counts as +infinity in the median: if half or more of the seeds never reached the
    target the median is None, otherwise the median is taken over all seeds; min and max are over
    the seeds that have a value."""
    present = [v for v in values if v is not None]
    if not present:
        return Spread(None, None, None, 0, len(values))
    if missing_is_worst:
        ranked = sorted(present) + [float("inf")] * (len(values) - len(present))
        median = statistics.median(ranked)
        median = None if median == float("inf") else median
    else:
        median = statistics.median(present)
    return Spread(median, min(present), max(present), len(present), len(values))


def best_accuracy(curve: Sequence[dict]) -> float:
    """The highest accuracy on a curve (start point included)."""
    if not curve:
        raise ValueError("an empty curve has no best accuracy")
    return max(p["accuracy"] for p in curve)


def choose_target(start_accuracy: float, median_bests: dict[str, float]) -> float | None:
    """The module docstring's rule; None when no compared contender is present or the weakest never
    rose above the start (then no target is reachable by all and the ratios are undefined)."""
    compared = [median_bests[n] for n in RATIO_CONTENDERS if n in median_bests]
    if not compared or min(compared) <= start_accuracy:
        return None
    return start_accuracy + TARGET_FRACTION * (min(compared) - start_accuracy)


class Aggregate(NamedTuple):
    """Everything the bench JSON reports across seeds."""

    start_accuracy: float
    """Median accuracy of the curves' first points (the shared start; greedy, so all equal in practice)."""
    target_accuracy: float | None
    """`choose_target`'s target."""
    seconds_to_target: dict[str, Spread]
    """Contender -> spread over seeds of its training seconds to the target."""
    final_accuracy: dict[str, Spread]
    """Contender -> spread over seeds of the accuracy at its last point."""
    best_accuracy: dict[str, Spread]
    """Contender -> spread over seeds of its best accuracy."""
    per_seed_seconds_to_target: dict[str, list[float | None]]
    """Contender -> seconds to target of each seed, in seed order."""
    ratio_dash_vs_standard_grpo: float | None
    """median seconds to target of dash / that of standard_grpo."""
    ratio_dash_vs_trl: float | None
    """median seconds to target of dash / that of trl_grpo."""
    interpolated_seconds_to_target: dict[str, Spread]
    """Contender -> spread over seeds of `interpolated_seconds_to_target`."""
    interpolated_ratio_dash_vs_standard_grpo: float | None
    """The same ratio of medians over the interpolated seconds."""
    interpolated_ratio_dash_vs_trl: float | None
    """The same ratio of medians over the interpolated seconds."""


def aggregate(curves: dict[str, Sequence[Sequence[dict]]]) -> Aggregate:
    """`curves`: contender -> one curve per seed. Applies the target rule and takes the medians."""
    empty = sorted(n for n, runs in curves.items() if not runs or any(not c for c in runs))
    if empty:
        raise ValueError(f"contenders with no runs or an empty curve: {empty}")
    start = statistics.median(c[0]["accuracy"] for runs in curves.values() for c in runs)
    bests = {n: spread([best_accuracy(c) for c in runs]) for n, runs in curves.items()}
    target = choose_target(start, {n: s.median for n, s in bests.items()})
    per_seed = {n: [None if target is None else seconds_to_target(c, target) for c in runs]
                for n, runs in curves.items()}
    to_target = {n: spread(v, missing_is_worst=True) for n, v in per_seed.items()}
    finals = {n: spread([c[-1]["accuracy"] for c in runs]) for n, runs in curves.items()}

    interpolated = {n: spread([None if target is None else interpolated_seconds_to_target(c, target) for c in runs],
                              missing_is_worst=True) for n, runs in curves.items()}

    return Aggregate(start, target, to_target, finals, bests, per_seed,
                     ratio_of_medians(to_target, "dash", "standard_grpo"), ratio_of_medians(to_target, "dash", "trl_grpo"),
                     interpolated, ratio_of_medians(interpolated, "dash", "standard_grpo"),
                     ratio_of_medians(interpolated, "dash", "trl_grpo"))
