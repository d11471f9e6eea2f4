"""Fault injection at the run level (real Ray, real DeepSpeed). Run alone with `-m faults`.

    PYTHONPATH=$PWD python -m pytest -q -m faults tests/
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
from ray.exceptions import RayTaskError

from launch import checkpoints
from launch.config import load_config
from learner.actor import LearnerGroup
from learner.config import LearnerConfig
from launch.data.cursor import PromptCursor
from launch.data.sources import load_prompts
from launch.data.synthetic import synthetic_problems
from test_integration import fake_groups

ROOT = Path(__file__).resolve().parents[1]


def ray_processes_of(session_hint: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [l for l in out.splitlines() if session_hint in l]


@pytest.mark.faults
@pytest.mark.slow
def test_sigterm_checkpoints_and_leaves_no_ray_processes(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    # train.overlap: when the signal lands, the next batch is already drawn and sampling; the
    # checkpoint must rewind the cursor to before it. This run's own Ray temp dir (short: socket paths must fit 107 bytes); its processes carry it in their args.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rf", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.train", f"model.path={tiny_model_dir}", "train.iterations=50", "eval.size=8",
         "rollout.prompts_per_generation=8", "learner.prompts_per_step=8", "rollout.group_size=2", "train.overlap=true",
         f"run.dir={run_dir}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # bounded: the subprocess itself has every wait under a timeout
        lines.append(line)
        if line.startswith("it    2 |"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out[-3000:]
    last = checkpoints.latest_complete(run_dir)
    assert last is not None, out[-3000:]
    state = json.loads((last / "driver_state.json").read_text())
    assert state["stopped_by"] == "SIGTERM"
    # The checkpoint is at an iteration boundary and the metrics stream agrees with it.
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["iteration"] == state["iteration"] >= 2
    # The data cursor stands exactly after the prompts of the completed iterations: none half-consumed,
    # and the prefetched batch that was never learned is not skipped on resume.
    cursor = PromptCursor(load_prompts(load_config("tiny-cpu").data, "train").prompts, seed=0)
    for _ in range(state["iteration"]):
        cursor.next_batch(8)
    assert state["cursor"] == cursor.state()
    assert ray_processes_of(str(ray_tmp)) == []


@pytest.mark.faults
@pytest.mark.slow
def test_frozen_learner_rank_raises_instead_of_hanging(ray_local, tiny_model_dir):
    """Rank 1 is frozen (SIGSTOP) in the middle of a step: rank 0's gradient all-reduce and the
    driver's wait both have timeouts, so the step raises instead of hanging."""
    cfg = LearnerConfig(num_ranks=2, prompts_per_step=2, micro_batch_tokens=256, cpus_per_rank=0.5, lr=1e-3)
    learner = LearnerGroup(cfg, str(tiny_model_dir), max_new_tokens=8, timeout_s=20.0)
    frozen = ray.get(learner.rank_actors[1].__ray_call__.remote(lambda _self: os.getpid()), timeout=60)
    try:
        os.kill(frozen, signal.SIGSTOP)
        learner.begin_batch(2)
        groups = fake_groups(synthetic_problems(["add"], 2, 2, seed=1, split="train")[:2],
                             [[11, 12, 13], [14, 15], [16, 17, 18, 19]], [(1.0, 0.0), (0.0, 1.0)])
        with pytest.raises((TimeoutError, RayTaskError), match="did not answer within 20|[Tt]imed? ?out"):
            learner.add_groups(groups)
            learner.end_batch()
    finally:
        os.kill(frozen, signal.SIGCONT)
        learner.shutdown()


@pytest.mark.faults
@pytest.mark.slow
def test_worker_death_during_prefetch_is_restarted_between_iterations_on_the_driver_thread(
        ray_local, tiny_model_dir, tmp_path, monkeypatch):
    """train.overlap: the only engine dies while the prefetch thread samples the next batch. The
    restart loads the learner's weights, so it must not run on the prefetch thread while the main
    thread is inside end_batch (under ZeRO-3 the ranks' gathers could interleave): the prefetch
    leaves the batch unsampled, the driver's thread restarts the worker before the sync, and the
    next iteration samples the whole batch, none lost or doubled."""
    import threading

    import launch.train as train

    real_restart, real_prefetch = train.restart_worker, train.start_prefetch
    restarted_on: list[str] = []

    def recording_restart(*args, **kwargs):
        restarted_on.append(threading.current_thread().name)
        return real_restart(*args, **kwargs)

    def prefetch_killing_the_engine(run, num_prompts):
        if run.iteration == 1:
            ray.kill(run.dispatcher.workers[0])
        return real_prefetch(run, num_prompts)

    monkeypatch.setattr(train, "restart_worker", recording_restart)
    monkeypatch.setattr(train, "start_prefetch", prefetch_killing_the_engine)
    run_dir = tmp_path / "run"
    assert train.main([f"model.path={tiny_model_dir}", "train.iterations=3", f"run.dir={run_dir}", "eval.size=8",
                       "rollout.prompts_per_generation=8", "learner.prompts_per_step=8", "rollout.group_size=4",
                       "rollout.max_new_tokens=8", "eval.max_new_tokens=8", "train.overlap=true", "run.progress=false",
                       "rollout.reward_fn=tests.reward_fns:odd_length"]) == 0
    assert restarted_on == [threading.main_thread().name]
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [1, 2, 3]
    assert [r["samples_generated"] for r in recs] == [8 * 4] * 3
    assert [r["policy_version"] for r in recs] == [1, 2, 3]
