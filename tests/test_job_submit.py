"""`ray job submit` against a real local Ray head on loopback: a 2-iteration tiny job must reach
SUCCEEDED and leave a complete run directory.

    PYTHONPATH=$PWD python -m pytest -q tests/test_job_submit.py
"""
from __future__ import annotations

import json
import re
import os
import socket
import subprocess
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_job_api(port: int, head: subprocess.Popen, deadline_s: float) -> None:
    """Poll the head's job API until it answers (the dashboard starts after `ray start` returns)."""
    poll = threading.Event()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        assert head.poll() is None, f"ray head exited with {head.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        poll.wait(0.5)  # poll interval, not a timing assumption
    raise TimeoutError(f"Ray job API on 127.0.0.1:{port} did not come up within {deadline_s} s")


@pytest.mark.slow
def test_ray_job_submit_tiny_job(tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    # The job's `python` is the cluster's Python: the one this venv's `ray` runs on.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    gcs, dash, agent_http, agent_grpc, metrics = (free_port() for _ in range(5))
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # --block keeps the head in the foreground, so terminating it stops exactly this cluster.
    head_log = open(tmp_path / "head.log", "w")  # a file, not a pipe nobody drains
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         # Another Ray on this machine (e.g. the test session's own) holds the agent's default
         # ports; without an agent of its own the head answers "No available agent".
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        env=env, stdout=head_log, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "run"
    try:
        wait_for_job_api(dash, head, deadline_s=180)
        submit = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
                  "--runtime-env-json", json.dumps({"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                                                    "excludes": [".venv", "runs", ".git"]}),
                  "--", "python", "-m", "launch.train", "train.iterations=2", "model.sft_steps=5",
                  "eval.size=16", "rollout.prompts_per_generation=16", "learner.prompts_per_step=8",
                  "rollout.group_size=4", "learner.num_ranks=1", "train.checkpoint_every=1", f"run.dir={run_dir}"]
        poll, end = threading.Event(), time.monotonic() + 180
        while True:  # the head's dashboard agent registers a little after the job API answers
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if "submitted successfully" in job.stdout + job.stderr or time.monotonic() > end:
                break
            poll.wait(1.0)  # poll interval for readiness, not a timing assumption
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-4000:]
        assert re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-4000:]
    finally:
        head.terminate()
        head.wait(timeout=120)
        head_log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 2
    assert summary["samples_generated"] == 2 * 16 * 4
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert (run_dir / "config.yaml").exists() and (run_dir / "plots.png").exists()
    assert any((run_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]
