"""End to end through `python -m launch.train`'s entry point: real Ray actors, the real DeepSpeed
learner (CPU, gloo), the gloo weight sync, a real tokenizer/model. A tiny run has pinned counts,
and a run stopped after 2 iterations and resumed to 4 ends with the same weights and the same
metrics as an uninterrupted 4-iteration run (CPU, fp32, same seed).

    PYTHONPATH=$PWD python -m pytest -q tests/test_e2e.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from launch import checkpoints
from launch.train import main

PROMPTS, G, ITERS = 16, 4, 4
COMMON = ["eval.size=16", f"rollout.prompts_per_generation={PROMPTS}", "learner.prompts_per_step=8",
          f"rollout.group_size={G}", "rollout.max_new_tokens=12", "eval.max_new_tokens=12", "train.checkpoint_every=1",
          "train.keep_checkpoints=5", "learner.lr=3e-4", "run.progress=false"]


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
    assert summary["iterations"] == ITERS
    assert summary["samples_generated"] == ITERS * PROMPTS * G
    recs = records(full_run)
    assert [r["iteration"] for r in recs] == list(range(1, ITERS + 1))
    assert sum(r["samples_kept"] for r in recs) == summary["samples_kept"]
    for r in recs:
        assert r["samples_generated"] == PROMPTS * G
        assert r["kept_fraction"] == pytest.approx(r["samples_kept"] / (PROMPTS * G), abs=1e-12)
        assert sum(r["drop_reasons"].values()) + r["samples_kept"] == PROMPTS * G
        assert r["staleness_max"] == 0  # synchronous mode is on-policy at sampling time
        for phase in ("generate", "score", "learn", "sync", "other", "total"):
            assert r[f"time/{phase}"] >= 0
    # The version advances once per batch that took an optimizer step, and engines follow it.
    assert summary["policy_version"] == sum(r["optimizer_steps"] > 0 for r in recs)
    assert recs[-1]["policy_version"] == summary["policy_version"]
    for name in ("config.yaml", "plots.png", "summary.json"):
        assert (full_run / name).exists()
    assert any((full_run / "tensorboard").iterdir())
    assert [p.name for p in sorted((full_run / "checkpoints").glob("iter_*"))] == [f"iter_{i:06d}" for i in range(1, ITERS + 1)]
    assert 0.0 <= summary["eval_accuracy_after_rl"] <= 1.0


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
OVERLAP = [*COMMON, "train.overlap=true", "train.checkpoint_every=2", "rollout.reward_fn=tests.reward_fns:odd_length"]


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
