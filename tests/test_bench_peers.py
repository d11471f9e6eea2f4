"""The DASH bench's JSON, table and plot over seeds (hand-made runs), its plans, and smoke runs of its peers.

    PYTHONPATH=$PWD python -m pytest -q tests/test_bench_peers.py
"""
from __future__ import annotations

import pytest

from launch.bench.dash import (OURS, PLANS, PRESET, contender_overrides, fmt_spread, phase_totals, shared_overrides,
                               start_key, summarize, table, write_plot)
from launch.bench.peers import PHASES, group_mix, sft_curve, trl_grpo_curve
from launch.data.synthetic import synthetic_problems
from launch.data.templates import sft_target


def curve(*points: tuple[float, int, float]) -> list[dict]:
    return [{"train_seconds": s, "samples_generated": n, "accuracy": a} for s, n, a in points]


START = (0, 0, 0.30)
PHASES_OURS = {"generate": 6.0, "score": 1.0, "learn": 2.0, "sync": 0.5, "other": 1.5, "total": 10.0}
PHASES_PEER = {"generate": 3.0, "score": 1.0, "learn": 6.0, "sync": 0.0, "other": None, "total": 10.0}
GROUPS = {"all_right": 0.25, "all_wrong": 0.125, "sample_accuracy": 0.5, "uniform": 0.375, "prompts": 8, "seconds": 1.0}


def run(seed: int, c: list[dict], train_seconds: float, samples: int, tokens: int, phases: dict) -> dict:
    return {"seed": seed, "curve": c, "phases": phases, "train_seconds": train_seconds, "samples_generated": samples,
            "tokens_generated": tokens}


def bench_runs() -> dict[str, list[dict]]:
    # medians of best: dash 0.70, standard 0.50, trl 0.60 -> target 0.30 + 0.5 x 0.20 = 0.40
    return {
        "dash": [run(0, curve(START, (4, 128, 0.45), (8, 256, 0.70)), 8.0, 256, 2560, PHASES_OURS),
                 run(1, curve(START, (5, 128, 0.50), (10, 256, 0.70)), 10.0, 256, 3072, PHASES_OURS),
                 run(2, curve(START, (6, 128, 0.35), (12, 256, 0.75)), 12.0, 256, 2048, PHASES_OURS)],
        "standard_grpo": [run(s, curve(START, (10, 100, 0.40 + s / 100), (20, 200, 0.50)), 20.0, 200, 2000, PHASES_OURS)
                          for s in range(3)],
        "trl_grpo": [run(s, curve(START, (10, 80, 0.35), (20, 160, 0.60)), 20.0, 160, 1600, PHASES_PEER)
                     for s in range(3)],
    }


def test_summarize_gives_spreads_rates_and_ratios_of_medians():
    plan = PLANS[("reasoning", True)]
    out = summarize(bench_runs(), plan, "reasoning", 3, True, "m", {}, GROUPS)
    assert (out["regime"], out["seeds"], out["quick"]) == ("reasoning", 3, True)
    assert out["target_accuracy"] == pytest.approx(0.40, abs=1e-12)
    dash = out["contenders"]["dash"]
    assert dash["seconds_to_target"] == {"median": 5, "min": 4, "max": 12, "count": 3, "of": 3}
    assert dash["final_accuracy"] == {"median": 0.70, "min": 0.70, "max": 0.75, "count": 3, "of": 3}
    assert dash["samples_per_second"] == pytest.approx(25.6, abs=1e-12)  # median of 32, 25.6, 21.33
    assert dash["tokens_per_second"] == pytest.approx(307.2, abs=1e-12)  # median of 320, 307.2, 170.67
    assert [r["seconds_to_target"] for r in dash["runs"]] == [4, 5, 12]
    assert out["contenders"]["standard_grpo"]["seconds_to_target"]["median"] == 10
    assert out["contenders"]["trl_grpo"]["seconds_to_target"]["median"] == 20
    assert out["ratio_dash_vs_standard_grpo"] == pytest.approx(5 / 10, abs=1e-12)
    assert out["ratio_dash_vs_trl"] == pytest.approx(5 / 20, abs=1e-12)
    # interpolated to 0.40: dash 0.1/0.15 x 4, 0.1/0.2 x 5, 6 + 0.05/0.4 x 6 -> median 8/3;
    # standard 0.1/(0.10, 0.11, 0.12) x 10 -> median 100/11; trl 10 + 0.05/0.25 x 10 = 12
    assert dash["interpolated_seconds_to_target"]["median"] == pytest.approx(8 / 3, abs=1e-12)
    assert dash["interpolated_seconds_to_target"]["max"] == pytest.approx(6.75, abs=1e-12)
    assert out["interpolated_ratio_dash_vs_standard_grpo"] == pytest.approx((8 / 3) / (100 / 11), abs=1e-12)
    assert out["interpolated_ratio_dash_vs_trl"] == pytest.approx((8 / 3) / 12, abs=1e-12)
    assert dash["phases"] == PHASES_OURS and dash["runs"][0]["orchestration_overhead"] == pytest.approx(0.15)
    assert out["contenders"]["trl_grpo"]["phases"]["other"] is None


@pytest.mark.parametrize("regime,quick", sorted(PLANS))
def test_our_contenders_get_equal_prompts_and_valid_configs(regime, quick):
    from launch.config import load_config

    plan = PLANS[(regime, quick)]
    seen, shares = {}, {}
    for name in OURS:
        cfg = load_config(PRESET, shared_overrides(plan) + contender_overrides(name, plan, seed=2))
        per_iteration = cfg.rollout.prompts_per_generation if cfg.train.mode == "dash" else cfg.learner.prompts_per_step
        seen[name] = (cfg.train.iterations * per_iteration, cfg.eval.every * per_iteration, cfg.learner.filter,
                      cfg.train.mode, cfg.rollout.prompts_per_generation, cfg.learner.old_logprobs,
                      cfg.train.thread_handover, cfg.train.overlap, cfg.learner.off_policy, cfg.train.stream_learn)
        shares[name] = cfg.learner.share_prompts
        assert (cfg.rollout.group_size, cfg.rollout.max_new_tokens, cfg.learner.lr, cfg.eval.size) == (
            plan.group_size, plan.max_new_tokens, plan.lr, plan.eval_size)
        assert cfg.data.synthetic_tasks == (plan.task,) and cfg.data.seed == 0  # same problems for every seed
        assert (cfg.train.seed, cfg.rollout.seed, cfg.learner.seed) == (2, 2, 2)
    assert {v[:2] for v in seen.values()} == {(plan.prompts, plan.eval_every_prompts)}
    dash = (True, "dash", plan.prompts_per_generation)
    # (filter, mode, prompts_per_generation, old_logprobs, thread_handover, overlap, off_policy, stream_learn);
    # dash waits for its engine call (the preset's stream_learn=false), standard GRPO streams (its faster mode)
    assert seen["dash"][2:] == (*dash, "auto", True, False, "none", False)
    assert seen["dash_unshared"] == seen["dash"]
    assert [n for n, shared in shares.items() if not shared] == ["dash_unshared"]  # every other one shares heads
    assert seen["dash_stream"][2:] == (*dash, "auto", True, False, "none", True)
    assert seen["standard_grpo"][2:4] == (False, "standard_grpo") and seen["standard_grpo"][6:] == (True, False, "none", True)
    assert seen["standard_grpo_no_handover"][2:6] == seen["standard_grpo"][2:6]
    assert seen["standard_grpo_no_handover"][6:] == (False, False, "none", True)
    assert seen["standard_grpo_no_stream"][2:6] == seen["standard_grpo"][2:6]
    assert seen["standard_grpo_no_stream"][6:] == (True, False, "none", False)
    assert seen["dash_no_filter"][2:5] == (False, "dash", plan.prompts_per_generation)
    assert seen["dash_no_preemptive"][2:5] == (True, "dash", plan.prompts_per_step)
    assert seen["dash_recompute"][2:] == (*dash, "recompute", True, False, "none", False)
    assert seen["dash_no_handover"][2:] == (*dash, "auto", False, False, "none", False)
    assert seen["dash_async"][2:-1] == (*dash, "auto", True, True, "none")
    assert seen["dash_async_decoupled"][2:-1] == (*dash, "auto", True, True, "decoupled")
    assert seen["dash_async_tis"][2:-1] == (*dash, "auto", True, True, "tis")
    assert seen["dash_half"][2:] == (True, "dash", plan.prompts_per_generation // 2, "auto", True, False, "none", False)
    assert seen["dash_async_half"][2:-1] == (True, "dash", plan.prompts_per_generation // 2, "auto", True, True, "none")
    assert seen["dash_async_half_bf16"] == seen["dash_async_half"]
    assert [n for n in OURS if load_config(PRESET, shared_overrides(plan) + contender_overrides(n, plan)).rollout.dtype
            != "float32"] == ["dash_async_half_bf16"]
    assert seen["dash_async_step"][2:-1] == (True, "dash", plan.prompts_per_step, "auto", True, True, "none")
    assert {PLANS[(r, q)].task for r, q in PLANS} == {"add", "chain"}


def test_warm_start_is_shared_across_budgets_and_reused_only_with_the_same_settings():
    def key(regime: str, quick: bool, extra: tuple[str, ...] = ()) -> str:
        return start_key(regime, shared_overrides(PLANS[(regime, quick)]) + list(extra))

    assert key("tiny", True) == key("tiny", False)  # the budget is not part of the start
    assert key("reasoning", True) == key("reasoning", False)
    assert key("tiny", True).startswith("tiny-") and key("reasoning", True).startswith("reasoning-")
    assert key("reasoning", True) != key("reasoning", True, ("model.sft_steps=5",))
    assert key("tiny", True)[5:] != key("reasoning", True)[10:]


def test_phase_totals_sum_every_time_key():
    records = [{"time/generate": 1.0, "time/learn": 2.0, "loss": 0.1}, {"time/generate": 0.5, "time/sync": 0.25}]
    assert phase_totals(records) == {"generate": 1.5, "learn": 2.0, "sync": 0.25}


def test_table_and_plot(tmp_path):
    out = summarize(bench_runs(), PLANS[("tiny", True)], "tiny", 3, True, "m", {}, GROUPS)
    text = table(out)
    assert "| dash | 5.0 (4.0-12.0) | 0.700 (0.700-0.750) | 26 | 307 | 10.0 | 6.0 | 1.0 | 2.0 | 0.5 | 1.5 | - |" in text
    assert "| trl_grpo | 20.0 (20.0-20.0) | 0.600 (0.600-0.600) | 8 | 80 | 20.0 | 3.0 | 1.0 | 6.0 | 0.0 | - | - |" in text
    assert "dash/standard_grpo 0.50; dash/trl 0.25 (ratios of medians)" in text
    assert "interpolated between evaluations: dash/standard_grpo 0.29; dash/trl 0.22" in text
    assert fmt_spread({"median": None, "min": 7.0, "max": 7.0, "count": 1, "of": 3}) == "- (7.0-7.0) [1/3]"
    assert fmt_spread({"median": None, "min": None, "max": None, "count": 0, "of": 3}) == "- (0/3)"
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
                            time_budget_s=2.0, eval_every_prompts=4, seed=0)
    _check_curve(result.points)
    assert len(result.points) >= 2
    samples = [p["samples_generated"] for p in result.points]
    # Every TRL step generates prompts_per_step x G = 4 completions, all of which are scored; the
    # evaluations fall every 4 prompts (8 samples, 2 steps), the last one at the time budget.
    assert samples[0] == 0 and samples[-1] > 0 and all(n % 4 == 0 for n in samples), samples
    assert samples[1:-1] == [8 * k for k in range(1, len(samples) - 1)], samples
    assert samples[-1] - samples[-2] <= 8 if len(samples) > 2 else samples[-1] <= 8, samples
    assert set(result.phases) == {*PHASES, "total"}
    assert result.tokens_generated >= samples[-1]  # at least one token per scored completion
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


def test_warm_up_stops_at_the_first_probe_that_reaches_the_target(tiny_model_dir):
    """The warm-start rule: a probe every `every` steps; the first reading >= stop_at ends SFT
    there (steps = that probe's step); without one the warm-up runs all its steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launch.sft import StopProbe, sft_train

    train = synthetic_problems(("add",), 2, 16, 0, "train")
    texts, targets = [p.text for p in train], [sft_target(p) for p in train]
    readings = iter([0.1, 0.4, 0.6, 0.9])
    asked: list[float] = []
    probe = StopProbe(lambda: asked.append(next(readings)) or asked[-1], every=3, stop_at=0.5)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stats = sft_train(model, AutoTokenizer.from_pretrained(tiny_model_dir), texts, targets, steps=20, lr=1e-3,
                      batch_size=4, seed=0, probe=probe)
    assert (stats.steps, stats.probe_accuracy, asked) == (9, 0.6, [0.1, 0.4, 0.6])
    never = StopProbe(lambda: 0.0, every=4, stop_at=0.5)
    stats = sft_train(model, AutoTokenizer.from_pretrained(tiny_model_dir), texts, targets, steps=10, lr=1e-3,
                      batch_size=4, seed=0, probe=never)
    assert (stats.steps, stats.examples, stats.probe_accuracy) == (10, 40, 0.0)


def test_group_mix_counts_uniform_groups(tiny_model_dir):
    prompts = synthetic_problems(("add",), 3, 6, 0, "train")
    mix = group_mix(tiny_model_dir, prompts, group_size=4, max_new_tokens=8, temperature=1.0, seed=0)
    # An untrained model gets (almost) nothing right: every group is all-wrong.
    assert 0.0 <= mix.all_right <= mix.all_right + mix.all_wrong <= 1.0
    assert mix.all_right == mix.sample_accuracy == 0.0 and mix.all_wrong == 1.0


def test_readme_table_renders_missing_targets_as_dashes():
    from launch.bench.cli import render_table

    results = {
        "learner": {"tokens_per_second": 3200.0, "bare_torch_tokens_per_second": 3300.0, "grad_rel_error": 1e-6,
                    "filtered_forward_calls": 0},
        "engine": {"models": {"tiny": {"batch_sizes": [1, 4], "tokens_per_second": [800.0, 2300.0], "params": 150000}}},
        "sync": {"models": [{"model": "5M", "bytes": 17.1e6, "seconds": 0.0089, "memcpy_seconds": 0.0014, "max_abs_diff": 0.0}]},
        "dash": {"quick": True, "regime": "tiny", "seeds": 3, "target_accuracy": None,
                 "ratio_dash_vs_standard_grpo": None, "ratio_dash_vs_trl": 0.5,
                 "contenders": {"dash": {"seconds_to_target": {"median": None, "min": None, "max": None, "count": 0, "of": 3},
                                         "final_accuracy": {"median": 0.5, "min": 0.4, "max": 0.6, "count": 3, "of": 3},
                                         "samples_per_second": 100.0}}},
    }
    text = render_table(results, "2 cores", "2026-11-26")
    assert "| learner backprop, 5M model | 3200 tok/s vs bare torch 3300 tok/s (0.97x)" in text
    assert "| tiny engine" not in text and "1: 800, 4: 2300" in text
    assert ("| dash: seconds to target -, median (min-max) of 3 seeds | - (0/3) s; final accuracy 0.500 (0.400-0.600); "
            "100 samples/s | `python -m launch.bench dash --regime tiny --seeds 3 --quick` |") in text
    assert "| ratio dash / standard_grpo (median seconds to target) | - |" in text
    assert "| ratio dash / trl GRPOTrainer (median seconds to target) | 0.50 |" in text
