"""The bench's curve arithmetic (hand-made curves) and smoke runs of its two peers.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_bench_peers.py
"""
from __future__ import annotations

import math

import pytest

from launch.bench.dash import FULL, OURS, PRESET, QUICK, contender_overrides, shared_overrides, summarize, table, write_plot
from launch.bench.peers import (PHASES, at_target, compare_curves, ratio, seconds_to_target, sft_curve,
                                trl_grpo_curve)
from rollout_workers.prompts import synthetic_problems


def curve(*points: tuple[float, int, float]) -> list[dict]:
    return [{"train_seconds": s, "samples_generated": n, "accuracy": a} for s, n, a in points]


# standard_grpo peaks at 0.60 at 20 s, then dips: the target is its best, not its last.
STANDARD = curve((0, 0, 0.30), (10, 100, 0.50), (20, 200, 0.60), (30, 300, 0.55))
DASH = curve((0, 0, 0.30), (4, 128, 0.60), (8, 256, 0.70))  # reaches the target exactly at 4 s
TRL = curve((0, 0, 0.30), (10, 80, 0.59), (20, 160, 0.58))  # never reaches it
SFT = curve((0, 0, 0.30), (5, 0, 0.65), (10, 0, 0.50))  # crosses first at 5 s, then falls back


def test_compare_curves_target_and_first_crossing():
    cmp = compare_curves({"standard_grpo": STANDARD, "dash": DASH, "trl_grpo": TRL, "sft": SFT})
    assert cmp.target_accuracy == 0.60
    assert cmp.seconds_to_target == {"standard_grpo": 20, "dash": 4, "trl_grpo": None, "sft": 5}
    assert cmp.samples_to_target == {"standard_grpo": 200, "dash": 128, "trl_grpo": None, "sft": 0}
    assert cmp.final_accuracy == {"standard_grpo": 0.55, "dash": 0.70, "trl_grpo": 0.58, "sft": 0.50}


def test_target_at_start_and_ratio_edge_cases():
    flat = curve((0, 0, 0.4), (10, 100, 0.3))
    assert seconds_to_target(flat, 0.4) == 0
    assert at_target(flat, 0.41, "samples_generated") is None
    assert ratio(4.0, 20.0) == 0.2
    assert ratio(None, 20.0) is None and ratio(4.0, None) is None
    assert ratio(0.0, 0.0) is None  # standard_grpo never improved on the start: undefined, not 0 or inf
    with pytest.raises(ValueError, match="baseline 'standard_grpo'"):
        compare_curves({"dash": DASH})
    with pytest.raises(ValueError, match="empty curve"):
        compare_curves({"standard_grpo": STANDARD, "dash": []})


def test_summarize_ratios_and_overhead():
    phases = {"generate": 6.0, "score": 1.0, "learn": 2.0, "sync": 0.5, "other": 1.5, "total": 10.0}
    results = {name: {"curve": c, "phases": phases, "train_seconds": c[-1]["train_seconds"]}
               for name, c in (("standard_grpo", STANDARD), ("dash", DASH), ("trl_grpo", TRL))}
    out = summarize(results, plan=QUICK, quick=True, model_dir="m", sft_info={})
    assert out["target_accuracy"] == 0.60
    assert math.isclose(out["ratio_dash_vs_standard_grpo"], 4 / 20, rel_tol=1e-12)
    assert out["ratio_dash_vs_trl"] is None
    assert out["contenders"]["dash"]["seconds_to_target"] == 4
    assert out["contenders"]["trl_grpo"]["seconds_to_target"] is None
    assert out["contenders"]["dash"]["orchestration_overhead"] == pytest.approx(0.15, abs=1e-12)
    assert out["quick"] is True


@pytest.mark.parametrize("plan", [QUICK, FULL])
def test_our_contenders_get_equal_prompts_and_valid_configs(plan):
    from launch.config import load_config

    seen = {}
    for name in OURS:
        cfg = load_config(PRESET, shared_overrides(plan) + contender_overrides(name, plan))
        per_iteration = cfg.rollout.prompts_per_generation if cfg.train.mode == "dash" else cfg.learner.prompts_per_step
        seen[name] = (cfg.train.iterations * per_iteration, cfg.eval.every * per_iteration, cfg.learner.filter,
                      cfg.train.mode, cfg.rollout.prompts_per_generation)
        assert (cfg.rollout.group_size, cfg.rollout.max_new_tokens, cfg.learner.lr, cfg.eval.size) == (
            plan.group_size, plan.max_new_tokens, plan.lr, plan.eval_size)
    assert {v[:2] for v in seen.values()} == {(plan.prompts, plan.eval_every_prompts)}
    assert seen["dash"][2:] == (True, "dash", plan.prompts_per_generation)
    assert seen["standard_grpo"][2:4] == (False, "standard_grpo")
    assert seen["dash_no_filter"][2:] == (False, "dash", plan.prompts_per_generation)
    assert seen["dash_no_preemptive"][2:] == (True, "dash", plan.prompts_per_step)


def test_table_and_plot(tmp_path):
    phases = {"generate": 6.0, "score": 1.0, "learn": 2.0, "sync": 0.5, "other": 1.5, "total": 10.0}
    peer = {"generate": 3.0, "score": 1.0, "learn": 6.0, "sync": 0.0, "other": None, "total": 10.0}
    results = {"standard_grpo": {"curve": STANDARD, "phases": phases, "train_seconds": 30.0},
               "dash": {"curve": DASH, "phases": phases, "train_seconds": 8.0},
               "trl_grpo": {"curve": TRL, "phases": peer, "train_seconds": 20.0},
               "sft": {"curve": SFT, "phases": peer, "train_seconds": 10.0}}
    out = summarize(results, plan=QUICK, quick=True, model_dir="m", sft_info={})
    text = table(out)
    assert "| dash | 0.700 | 4.0 | 128 | 8.0 | 6.0 | 1.0 | 2.0 | 0.5 | 1.5 | 15.0% |" in text
    assert "| trl_grpo | 0.580 | - | - | 20.0 | 3.0 | 1.0 | 6.0 | 0.0 | - | - |" in text
    assert "dash/standard_grpo seconds to target 0.20" in text
    png = write_plot(out, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_curve(points: list[dict]) -> None:
    seconds = [p["train_seconds"] for p in points]
    assert seconds[0] == 0.0 and all(b > a for a, b in zip(seconds, seconds[1:])), seconds
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in points)


def test_trl_grpo_curve_smoke(tiny_model_dir):
    train = synthetic_problems(("add",), 3, 16, 0, "train")
    evals = synthetic_problems(("add",), 3, 8, 0, "eval")
    result = trl_grpo_curve(tiny_model_dir, train, evals, group_size=2, max_new_tokens=8, lr=1e-4, prompts_per_step=2,
                            time_budget_s=2.0, eval_every_s=1.0, seed=0)
    _check_curve(result.points)
    assert len(result.points) >= 2
    samples = [p["samples_generated"] for p in result.points]
    # Every TRL step generates prompts_per_step x G = 4 completions, all of which are scored.
    assert samples[0] == 0 and samples[-1] > 0 and all(n % 4 == 0 for n in samples), samples
    assert set(result.phases) == {*PHASES, "total"}
    assert result.phases["total"] == result.points[-1]["train_seconds"]
    assert 0 < result.phases["generate"] < result.phases["total"]


def test_sft_curve_smoke(tiny_model_dir):
    train = synthetic_problems(("add",), 3, 16, 0, "train")
    evals = synthetic_problems(("add",), 3, 8, 0, "eval")
    result = sft_curve(tiny_model_dir, train, evals, time_budget_s=1.0, eval_every_s=0.5, lr=3e-3, batch_size=4,
                       seed=0, max_new_tokens=8)
    _check_curve(result.points)
    assert len(result.points) >= 2 and all(p["samples_generated"] == 0 for p in result.points)
    assert result.phases["learn"] == result.phases["total"] == result.points[-1]["train_seconds"]


def test_readme_table_renders_missing_targets_as_dashes():
    from launch.bench.cli import render_table

    results = {
        "learner": {"tokens_per_second": 3200.0, "bare_torch_tokens_per_second": 3300.0, "grad_rel_error": 1e-6,
                    "filtered_forward_calls": 0},
        "engine": {"models": {"tiny": {"batch_sizes": [1, 4], "tokens_per_second": [800.0, 2300.0], "params": 150000}}},
        "sync": {"models": [{"model": "5M", "bytes": 17.1e6, "seconds": 0.0089, "memcpy_seconds": 0.0014, "max_abs_diff": 0.0}]},
        "dash": {"quick": True, "target_accuracy": None, "ratio_dash_vs_standard_grpo": None, "ratio_dash_vs_trl": 0.5,
                 "contenders": {"dash": {"seconds_to_target": None, "final_accuracy": 0.5}}},
    }
    text = render_table(results, "2 cores", "2026-11-26")
    assert "| learner backprop, 5M model | 3200 tok/s vs bare torch 3300 tok/s (0.97x)" in text
    assert "| tiny engine" not in text and "1: 800, 4: 2300" in text
    assert "| dash: seconds to target - | - s; final accuracy 0.500 | `python -m launch.bench dash --quick` |" in text
    assert "| ratio dash / standard_grpo (seconds to target) | - |" in text
    assert "| ratio dash / trl GRPOTrainer | 0.50 |" in text
