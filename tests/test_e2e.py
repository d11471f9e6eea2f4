"""End to end through `python -m launch.train`'s entry point: real Ray actors, the real DeepSpeed
learner (CPU, gloo), the gloo weight sync, a real tokenizer/model. A tiny run with a pinned seed
learns (its reward rises well beyond noise) and has pinned counts; a run stopped after 2
iterations and resumed to 4 ends with the same weights and the same metrics as an uninterrupted
4-iteration run (CPU, fp32, same seed); over-long prompts and standard GRPO runs go through.

    PYTHONPATH=$PWD python -m pytest -q tests/test_e2e.py
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

import pytest
from safetensors.torch import load_file

from launch import checkpoints
from launch.train import main
from launch.data.sources import LoadResult
from rollout_workers.types import OVER_MAX_PROMPT_TOKENS
from tests.reward_fns import digit_fraction

PROMPTS, G, ITERS = 16, 4, 4
# digit_fraction: a dense reward the untrained tiny model climbs in a few iterations at lr 3e-3
# (measured: reward_mean 0.040, 0.043, 0.078, 0.076 over iterations 1-4 with this seed).
COMMON = ["eval.size=16", f"rollout.prompts_per_generation={PROMPTS}", "learner.prompts_per_step=8",
          f"rollout.group_size={G}", "rollout.max_new_tokens=12", "eval.max_new_tokens=12", "train.checkpoint_every=1",
          "train.keep_checkpoints=5", "learner.lr=3e-3", "run.progress=false", "train.seed=0", "rollout.seed=0",
          "rollout.reward_fn=tests.reward_fns:digit_fraction", "train.overlap=false"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def untimed(r: dict) -> dict:
    """A metrics record without its wall-clock fields (those differ between any two runs)."""
    return {k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_second"}


@pytest.fixture(scope="module")
def full_run(ray_local, tiny_model_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    assert main([f"model.path={tiny_model_dir}", f"train.iterations={ITERS}", f"run.dir={run_dir}", *COMMON]) == 0
    return run_dir


@pytest.mark.slow
def test_tiny_run_pinned_outcomes(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    recs = records(full_run)
    # Learning happened: the mean reward of the last two iterations (128 samples; std of a 64-sample
    # mean ~0.01 at this reward level) is above iteration 1's by > 0.025 and 1.5x; a learner that
    # does not step, or steps the wrong way, stays at ~0.04 or falls.
    first, last = recs[0]["reward_mean"], (recs[-1]["reward_mean"] + recs[-2]["reward_mean"]) / 2
    assert last > 1.5 * first and last > first + 0.025, [r["reward_mean"] for r in recs]
    # Rewards are mixed within groups, so every batch takes its 2 optimizer steps and the engines follow.
    assert [r["optimizer_steps"] for r in recs] == [PROMPTS // 8] * ITERS
    assert [r["policy_version"] for r in recs] == list(range(1, ITERS + 1)) and summary["policy_version"] == ITERS
    assert summary["iterations"] == ITERS
    assert summary["samples_generated"] == ITERS * PROMPTS * G
    assert [r["iteration"] for r in recs] == list(range(1, ITERS + 1))
    assert sum(r["samples_kept"] for r in recs) == summary["samples_kept"] > 0
    assert summary["prompts_refused"] == {} and summary["skipped_rows"] == {}
    for r in recs:
        assert r["samples_generated"] == PROMPTS * G
        assert r["kept_fraction"] == pytest.approx(r["samples_kept"] / (PROMPTS * G), abs=1e-12)
        assert sum(r["drop_reasons"].values()) + r["samples_kept"] == PROMPTS * G
        assert r["staleness_max"] == 0  # synchronous mode is on-policy at sampling time
        assert r["prompts_refused"] == {}
    # samples.jsonl: run.log_samples (4) completions per iteration, each with the reward it was given.
    samples = [json.loads(l) for l in (full_run / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [i for i in range(1, ITERS + 1) for _ in range(4)]
    for s in samples:
        assert s["reward"] == digit_fraction(s["completion"], s["gold"], "boxed")
        assert s["policy_version"] == s["iteration"] - 1 and s["prompt"].startswith("Q: ")
        assert isinstance(s["advantage"], float)
    for name in ("config.yaml", "plots.png", "summary.json"):
        assert (full_run / name).exists()
    assert any((full_run / "tensorboard").iterdir())
    assert [p.name for p in sorted((full_run / "checkpoints").glob("iter_*"))] == [f"iter_{i:06d}" for i in range(1, ITERS + 1)]


@pytest.mark.slow
def test_resume_continues_as_if_never_stopped(full_run, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert main([f"model.path={tiny_model_dir}", "train.iterations=2", f"run.dir={run_dir}", *COMMON]) == 0
    # A half-written later checkpoint (writer killed before its COMPLETE marker) must be ignored.
    (run_dir / "checkpoints" / "iter_000003").mkdir()
    assert checkpoints.latest_complete(run_dir).name == "iter_000002"
    assert main(["--resume", str(run_dir), f"train.iterations={ITERS}"]) == 0

    assert [untimed(r) for r in records(run_dir)] == [untimed(r) for r in records(full_run)]
    final = f"checkpoints/iter_{ITERS:06d}/hf/model.safetensors"
    resumed, uninterrupted = load_file(run_dir / final), load_file(full_run / final)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert (resumed[name] == uninterrupted[name]).all(), name


# Mixed rewards from the untrained model, so every batch takes a step and the version advances.
OVERLAP = [*COMMON, "train.overlap=true", "train.checkpoint_every=2", "rollout.reward_fn=tests.reward_fns:odd_length",
           "learner.off_policy=decoupled"]


@pytest.fixture(scope="module")
def overlap_run(ray_local, tiny_model_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("overlap") / "run"
    args = [f"model.path={tiny_model_dir}", f"train.iterations={ITERS}", f"run.dir={run_dir}", *OVERLAP]
    assert main(args) == 0
    return run_dir


@pytest.mark.slow
def test_overlap_samples_ahead_one_version_and_drains_at_checkpoints(overlap_run):
    recs = records(overlap_run)
    assert [r["policy_version"] for r in recs] == [1, 2, 3, 4]  # every batch took a step
    # Iteration 1 samples fresh; 2 was sampled during 1's learn phase (one version stale); 2 is a
    # checkpoint, so the pipeline drains and 3 samples fresh; 4 was prefetched during 3.
    assert [r["staleness_max"] for r in recs] == [0, 1, 0, 1]
    assert [r["staleness_mean"] for r in recs] == [0, 1, 0, 1]
    assert [r["staleness"] for r in recs] == [{"0": PROMPTS}, {"1": PROMPTS}] * 2
    # learner.old_logprobs=auto: a fresh batch from the fp32 engine takes the engine's logprobs as
    # the old ones (no pass, importance weights exactly 1 on the later step); a stale one is recomputed
    assert [r["time/learn_old_logprobs"] > 0 for r in recs] == [False, True, False, True]
    for r in recs[1::2]:  # decoupled PPO on the stale batches: weights pi_prox / pi_behav move off 1
        assert r["is_weight_max"] > 1.0 and 0 < r["effective_sample_size"] < 1.0
    assert [r["samples_generated"] for r in recs] == [PROMPTS * G] * ITERS
    assert json.loads((overlap_run / "summary.json").read_text())["samples_generated"] == ITERS * PROMPTS * G


@pytest.mark.slow
def test_overlap_resume_is_exact(overlap_run, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert main([f"model.path={tiny_model_dir}", "train.iterations=2", f"run.dir={run_dir}", *OVERLAP]) == 0
    assert main(["--resume", str(run_dir), f"train.iterations={ITERS}"]) == 0
    assert [untimed(r) for r in records(run_dir)] == [untimed(r) for r in records(overlap_run)]
    final = f"checkpoints/iter_{ITERS:06d}/hf/model.safetensors"
    resumed, uninterrupted = load_file(run_dir / final), load_file(overlap_run / final)
    for name in resumed:
        assert (resumed[name] == uninterrupted[name]).all(), name


@pytest.mark.slow
def test_refill_keeps_every_optimizer_batch_full(ray_local, tiny_model_dir, tmp_path):
    """learner.refill: groups the filter drops whole are replaced by sampling more prompts, so each
    iteration backprops exactly PROMPTS kept groups (G=4 binary rewards: a mixed group keeps all 4)."""
    run_dir = tmp_path / "run"
    assert main([f"model.path={tiny_model_dir}", "train.iterations=2", f"run.dir={run_dir}", *COMMON,
                 "learner.refill=true", "rollout.reward_fn=tests.reward_fns:odd_length"]) == 0
    recs = records(run_dir)
    assert sum(r["refill_prompts"] for r in recs) > 0  # some groups were dropped whole and replaced
    for r in recs:
        assert r["samples_generated"] == (PROMPTS + r["refill_prompts"]) * G
        assert r["samples_kept"] == PROMPTS * G and r["optimizer_steps"] == PROMPTS // 8
        assert sum(r["drop_reasons"].values()) == r["refill_prompts"] * G


@pytest.mark.slow
def test_over_long_prompts_are_skipped_at_load_and_refused_by_the_worker_and_the_run_goes_on(
        ray_local, tiny_model_dir, tmp_path, monkeypatch):
    """Both lines of defence in one run (the crash of the structure issue: the learner was told 16
    groups and died in end_batch when a worker refused some). The load-time filter is switched off
    for the training split only, so its word problems (longer than rollout.max_prompt_tokens=14
    tokens) reach the worker and are refused there: their slots are dropped and every refusal is
    counted. The held-out split keeps the load-time filter (`launch.eval.held_out_set`)."""
    def no_filter(result: LoadResult, max_tokens: int) -> LoadResult:
        return result

    monkeypatch.setattr("launch.train.drop_long_prompts", no_filter)
    run_dir = tmp_path / "run"
    assert main([f"model.path={tiny_model_dir}", "train.iterations=2", f"run.dir={run_dir}", *COMMON,
                 "data.synthetic_tasks=[add,word]", "rollout.max_prompt_tokens=14", "train.checkpoint_every=0"]) == 0
    recs, summary = records(run_dir), json.loads((run_dir / "summary.json").read_text())
    refused = [r["prompts_refused"].get(OVER_MAX_PROMPT_TOKENS, 0) for r in recs]
    assert sum(refused) > 0 and all(set(r["prompts_refused"]) <= {OVER_MAX_PROMPT_TOKENS} for r in recs)
    for r, n in zip(recs, refused):
        assert r["samples_generated"] == (PROMPTS - n) * G  # the rest of the batch was sampled and learned
    assert summary["prompts_refused"] == {OVER_MAX_PROMPT_TOKENS: sum(refused)}
    assert summary["skipped_rows"][OVER_MAX_PROMPT_TOKENS] > 0  # held-out word problems, dropped at load time


@pytest.mark.slow
def test_standard_grpo_runs_unfiltered_and_its_config_yaml_says_so(ray_local, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert main([f"model.path={tiny_model_dir}", "train.iterations=2", f"run.dir={run_dir}", *COMMON,
                 "train.mode=standard_grpo", "train.checkpoint_every=0"]) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["mode"] == "standard_grpo" and saved["learner"]["filter"] is False
    for r in records(run_dir):
        # One optimizer batch (prompts_per_step = 8 prompts) per iteration, nothing filtered.
        assert r["samples_generated"] == 8 * G and r["samples_kept"] == 8 * G and r["drop_reasons"] == {}
        assert r["optimizer_steps"] == 1


@pytest.mark.slow
def test_eval_cli_on_a_run_checkpoint_reproduces_the_runs_final_eval(full_run, tmp_path):
    """`python -m launch.eval --checkpoint RUN/checkpoints/LAST` reads RUN/config.yaml: the run's
    held-out set, eval.max_new_tokens, reward function and engine settings; so it gives the run's
    own final eval (the issue: it used the data defaults and printed 0.0 against the run's 0.527)."""
    import launch.eval

    last = full_run / "checkpoints" / f"iter_{ITERS:06d}"
    assert launch.eval.main(["--checkpoint", str(last), "--json", str(tmp_path / "eval.json")]) == 0
    out = json.loads((tmp_path / "eval.json").read_text())
    final = json.loads((full_run / "summary.json").read_text())["evals"][-1]
    assert final["iteration"] == ITERS
    assert out["total"] == 16 and out["max_new_tokens"] == 12
    assert out["accuracy"] == final["accuracy"]
    # digit_fraction is continuous: equal mean rewards mean the same prompts got the same completions.
    assert out["reward_mean"] == pytest.approx(final["reward_mean"], abs=1e-12) and out["reward_mean"] > 0
    assert f"config {full_run.resolve() / 'config.yaml'}" in out["eval_set"] and out["data"] == "synthetic"


@pytest.mark.slow
def test_eval_cli_gsm8k_on_the_tiny_model_skips_and_counts_over_long_prompts(full_run, tmp_path):
    import launch.eval

    last = full_run / "checkpoints" / f"iter_{ITERS:06d}"
    assert launch.eval.main(["--checkpoint", str(last), "--data", "gsm8k", "--limit", "4",
                             "--json", str(tmp_path / "eval.json")]) == 0
    out = json.loads((tmp_path / "eval.json").read_text())
    skipped = out["skipped_rows"][OVER_MAX_PROMPT_TOKENS]
    # The run's eval split of GSM8K has data.eval_size problems (the tiny-cpu preset's 400); the
    # tiny run takes prompts of at most rollout.max_prompt_tokens = 64 tokens, which GSM8K
    # problems (with the reasoning instruction) exceed: skipped and counted, none sampled.
    split = yaml.safe_load((full_run / "config.yaml").read_text())["data"]["eval_size"]
    assert 0 < skipped <= split and out["total"] == min(4, split - skipped)
    assert out["data"] == "gsm8k" and "at most 64 tokens" in out["eval_set"]
