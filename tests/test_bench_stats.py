"""The DASH bench's aggregation over seeds: spreads, the target rule and ratios of medians, with
hand-computed numbers.

    PYTHONPATH=$PWD python -m pytest -q tests/test_bench_stats.py
"""
from __future__ import annotations

import json

import pytest

from launch.bench.stats import (Spread, aggregate, at_target, best_accuracy, choose_target,
                                interpolated_seconds_to_target, ratio, seconds_to_target, spread)


def curve(*points: tuple[float, int, float]) -> list[dict]:
    return [{"train_seconds": s, "samples_generated": n, "accuracy": a} for s, n, a in points]


def test_spread_median_min_max_and_missing_values():
    assert spread([30.0, 10.0, 20.0]) == Spread(20.0, 10.0, 30.0, 3, 3)
    assert spread([4.0, 1.0, 3.0, 2.0]) == Spread(2.5, 1.0, 4.0, 4, 4)
    # Seconds to a target: a seed that never reached it ranks as infinitely slow.
    assert spread([12.0, None, 8.0], missing_is_worst=True) == Spread(12.0, 8.0, 12.0, 2, 3)
    assert spread([12.0, None, None], missing_is_worst=True) == Spread(None, 12.0, 12.0, 1, 3)
    assert spread([12.0, None, 8.0]) == Spread(10.0, 8.0, 12.0, 2, 3)  # accuracies: missing ones are left out
    assert spread([None, None], missing_is_worst=True) == Spread(None, None, None, 0, 2)


def test_first_crossing_best_and_ratio_edge_cases():
    c = curve((0, 0, 0.4), (10, 100, 0.55), (20, 200, 0.5), (30, 300, 0.6))
    assert seconds_to_target(c, 0.5) == 10 and at_target(c, 0.5, "samples_generated") == 100
    assert seconds_to_target(c, 0.61) is None
    assert best_accuracy(c) == 0.6
    assert ratio(4.0, 20.0) == 0.2
    assert ratio(None, 20.0) is None and ratio(4.0, None) is None and ratio(0.0, 0.0) is None
    with pytest.raises(ValueError, match="empty curve"):
        best_accuracy([])


def test_interpolated_crossing_lies_on_the_line_between_the_evaluations_around_the_target():
    c = curve((0, 0, 0.4), (10, 100, 0.45), (20, 200, 0.65), (30, 300, 0.5), (40, 400, 0.9))
    # between (10 s, 0.45) and (20 s, 0.65): 10 + (0.50 - 0.45) / 0.20 x 10 = 12.5 s; the first-eval rule says 20
    assert interpolated_seconds_to_target(c, 0.50) == pytest.approx(12.5, abs=1e-12)
    assert seconds_to_target(c, 0.50) == 20
    assert interpolated_seconds_to_target(c, 0.65) == pytest.approx(20.0, abs=1e-12)  # on an evaluation: that one
    assert interpolated_seconds_to_target(c, 0.70) == pytest.approx(30 + 0.2 / 0.4 * 10, abs=1e-12)  # after a dip
    assert interpolated_seconds_to_target(c, 0.40) == 0  # the start already there
    assert interpolated_seconds_to_target(c, 0.95) is None


def test_target_rule_is_halfway_to_the_weakest_compared_median_best():
    # start 0.30; median bests dash 0.70, standard 0.50, trl 0.60, sft 0.40 (sft is not compared)
    assert choose_target(0.30, {"dash": 0.70, "standard_grpo": 0.50, "trl_grpo": 0.60, "sft": 0.40}) == \
        pytest.approx(0.40, abs=1e-12)
    assert choose_target(0.30, {"dash": 0.70}) == pytest.approx(0.50, abs=1e-12)
    assert choose_target(0.30, {"dash": 0.70, "standard_grpo": 0.30}) is None  # the weakest never improved
    assert choose_target(0.30, {"sft": 0.90}) is None  # nothing compared


def test_aggregate_medians_targets_and_ratios_of_medians():
    start = (0, 0, 0.20)
    curves = {
        # bests 0.60, 0.70, 0.80 -> median best 0.70
        "dash": [curve(start, (5, 64, 0.50), (10, 128, 0.60)),
                 curve(start, (4, 64, 0.40), (8, 128, 0.70)),
                 curve(start, (6, 64, 0.55), (12, 128, 0.80))],
        # bests 0.60, 0.50, 0.65 -> median best 0.60 (the weakest: target 0.20 + 0.5 x 0.40 = 0.40)
        "standard_grpo": [curve(start, (10, 100, 0.30), (20, 200, 0.60)),
                          curve(start, (10, 100, 0.40), (20, 200, 0.50)),
                          curve(start, (10, 100, 0.35), (20, 200, 0.65))],
        # bests 0.38 (never reaches 0.40), 0.90, 0.70 -> median best 0.70
        "trl_grpo": [curve(start, (15, 80, 0.38)),
                     curve(start, (7, 80, 0.90)),
                     curve(start, (9, 80, 0.45), (18, 160, 0.70))],
        "sft": [curve(start, (1, 0, 0.25))] * 3,  # not compared: does not pull the target down
    }
    agg = aggregate(curves)
    assert agg.start_accuracy == 0.20
    assert agg.target_accuracy == pytest.approx(0.40, abs=1e-12)
    assert agg.per_seed_seconds_to_target == {"dash": [5, 4, 6], "standard_grpo": [20, 10, 20],
                                              "trl_grpo": [None, 7, 9], "sft": [None, None, None]}
    assert agg.seconds_to_target["dash"] == Spread(5, 4, 6, 3, 3)
    assert agg.seconds_to_target["standard_grpo"] == Spread(20, 10, 20, 3, 3)
    assert agg.seconds_to_target["trl_grpo"] == Spread(9, 7, 9, 2, 3)  # median of (7, 9, inf)
    assert agg.seconds_to_target["sft"] == Spread(None, None, None, 0, 3)
    assert agg.final_accuracy["trl_grpo"] == Spread(0.70, 0.38, 0.90, 3, 3)
    assert agg.best_accuracy["standard_grpo"].median == 0.60
    assert agg.ratio_dash_vs_standard_grpo == pytest.approx(5 / 20, abs=1e-12)
    assert agg.ratio_dash_vs_trl == pytest.approx(5 / 9, abs=1e-12)
    # interpolated from the start (0 s, 0.20) or the last evaluation below 0.40:
    # dash 0.2/0.3 x 5, 4 (on the evaluation), 0.2/0.35 x 6 -> median 24/7;
    # standard 10 + 0.1/0.3 x 10, 10, 10 + 0.05/0.3 x 10 -> median 35/3; trl never, 0.2/0.7 x 7, 0.2/0.25 x 9 -> 7.2
    interpolated = agg.interpolated_seconds_to_target
    assert interpolated["dash"].median == pytest.approx(24 / 7, abs=1e-12)
    assert (interpolated["dash"].min, interpolated["dash"].max) == (pytest.approx(10 / 3, abs=1e-12), 4)
    assert interpolated["standard_grpo"].median == pytest.approx(35 / 3, abs=1e-12)
    assert interpolated["trl_grpo"].median == pytest.approx(7.2, abs=1e-12)
    assert (interpolated["trl_grpo"].count, interpolated["sft"].median) == (2, None)
    assert agg.interpolated_ratio_dash_vs_standard_grpo == pytest.approx((24 / 7) / (35 / 3), abs=1e-12)
    assert agg.interpolated_ratio_dash_vs_trl == pytest.approx((24 / 7) / 7.2, abs=1e-12)


def test_aggregate_without_a_reachable_target_or_peers():
    flat = {"dash": [curve((0, 0, 0.3), (5, 64, 0.6))], "standard_grpo": [curve((0, 0, 0.3), (5, 64, 0.3))]}
    agg = aggregate(flat)
    assert agg.target_accuracy is None and agg.ratio_dash_vs_standard_grpo is None and agg.ratio_dash_vs_trl is None
    assert agg.seconds_to_target["dash"].count == 0
    only_ours = aggregate({"dash": [curve((0, 0, 0.3), (5, 64, 0.5))],
                           "standard_grpo": [curve((0, 0, 0.3), (8, 64, 0.5))]})
    assert only_ours.target_accuracy == pytest.approx(0.4, abs=1e-12)
    assert only_ours.ratio_dash_vs_standard_grpo == pytest.approx(5 / 8, abs=1e-12)
    assert only_ours.ratio_dash_vs_trl is None  # TRL not in the run
    with pytest.raises(ValueError, match="empty curve"):
        aggregate({"dash": [[]]})


def test_rescore_reads_a_bench_json_and_prints_both_estimates(tmp_path, capsys):
    from launch.bench.rescore import main

    # only ours: bests 0.7 and 0.5 -> target 0.3 + 0.5 x 0.2 = 0.4; dash first eval 4 s, interpolated
    # 0.1/0.4 x 4 = 1 s; standard 8 s and 0.1/0.2 x 8 = 4 s; ratios 0.50 and 0.25
    result = {"contenders": {"dash": {"runs": [{"curve": curve((0, 0, 0.3), (4, 64, 0.7))}]},
                             "standard_grpo": {"runs": [{"curve": curve((0, 0, 0.3), (8, 64, 0.5))}]}}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "start 0.300, target 0.400" in out
    assert "| dash | 4.0 (4.0-4.0) | 1.0 (1.0-1.0) | 0.50 / - | 0.25 / - |" in out
    assert "| standard_grpo | 8.0 (8.0-8.0) | 4.0 (4.0-4.0) | 1.00 / - | 1.00 / - |" in out


def test_arrival_slot_rows_describe_each_optimizer_steps_groups():
    """`launch.bench arrival`: per step of prompts_per_step groups, hand-computed."""
    from launch.bench.arrival import slot_rows
    from rollout_workers.engines.base import GroupOutput
    from rollout_workers.types import Completion, Prompt

    def group(uid: str, *samples: tuple[int, bool]) -> GroupOutput:
        completions = tuple(Completion(tuple(range(n)), (0.0,) * n, "stop", r"\boxed{7}" if right else r"\boxed{8}")
                            for n, right in samples)
        return GroupOutput(Prompt(uid, "Q", "7"), (1,), completions, 0)

    groups = [group("a", (3, True), (5, True)), group("b", (2, False), (2, False)),
              group("c", (4, True), (1, False)), group("d", (6, True), (6, False))]
    assert slot_rows(groups, 2) == [
        {"longest_completion": 3.5, "mean_completion": 3.0, "sample_accuracy": 0.5, "all_right": 1, "all_wrong": 1},
        {"longest_completion": 5.0, "mean_completion": 4.25, "sample_accuracy": 0.5, "all_right": 0, "all_wrong": 0}]
