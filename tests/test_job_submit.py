"""`ray job submit` against a real local Ray head on loopback: a 2-iteration tiny job must reach
SUCCEEDED and leave a complete run directory.

    PYTHONPATH=$PWD python -m pytest -q tests/test_job_submit.py
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_tiny_job(tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    gcs, dash = free_port(), free_port()
    # --block keeps the head in the foreground, so terminating it stops exactly this cluster.
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={tmp_path / 'ray'}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "run"
    try:
        job = subprocess.run(
            [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
             "--runtime-env-json", json.dumps({"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                                               "excludes": [".venv", "runs", ".git"]}),
             "--", "python", "-m", "launch.train", "train.iterations=2", "model.sft_steps=5",
             "eval.size=16", "rollout.prompts_per_generation=16", "learner.prompts_per_step=8",
             "rollout.group_size=4", "learner.num_ranks=1", "train.checkpoint_every=1", f"run.dir={run_dir}"],
            env=env, capture_output=True, text=True, timeout=900)
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-4000:]
        assert "SUCCEEDED" in out, out[-4000:]
    finally:
        head.terminate()
        head.wait(timeout=120)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 2
    assert summary["samples_generated"] == 2 * 16 * 4
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert (run_dir / "config.yaml").exists() and (run_dir / "plots.png").exists()
    assert any((run_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]
