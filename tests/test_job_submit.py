"""The two ways README.md launches a job, run as written against a real Ray head on loopback:
`launch/single_node.sh` on a fresh clone of the repo (it starts and stops its own head), and the
cluster command line `ray job submit --address ... --working-dir . -- python -m launch.train ...`
from the repo root. Each 2-iteration tiny job must succeed and leave a complete run directory.

    PYTHONPATH=$PWD python -m pytest -q tests/test_job_submit.py
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from weight_sync.endpoint import free_port

ROOT = Path(__file__).resolve().parents[1]


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


TINY = ["train.iterations=2", "model.sft_steps=5", "eval.size=16", "rollout.prompts_per_generation=16",
        "learner.prompts_per_step=8", "rollout.group_size=4", "learner.num_ranks=1", "train.checkpoint_every=1"]
"""A tiny job: 2 iterations of 16 prompts x 4 samples, checkpointed after each."""


def check_run_dir(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 2
    assert summary["samples_generated"] == 2 * 16 * 4
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert (run_dir / "config.yaml").exists() and (run_dir / "plots.png").exists()
    assert any((run_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]


def processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, timeout=60).stdout
    return [l for l in out.splitlines() if text in l]


def readme_cluster_command() -> list[str]:
    """The `ray job submit` command line of README.md's launch section, as written."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n\s*(ray job submit --address http://HEAD:8265 .*?)\n\s*```", text, re.S)
    assert block, "README.md has no ```bash block starting with `ray job submit --address http://HEAD:8265`"
    return shlex.split(block.group(1).replace("\\\n", " "))


HEAD_READY = "will now block forever"
"""What `ray start --block` prints once its node has registered (before that the head may still exit)."""


def wait_for_head(log: Path, head: subprocess.Popen, deadline_s: float) -> None:
    poll, end = threading.Event(), time.monotonic() + deadline_s
    while HEAD_READY not in log.read_text():
        assert head.poll() is None, f"ray head exited with {head.returncode}"
        if time.monotonic() > end:
            raise TimeoutError(f"Ray head did not finish starting within {deadline_s} s; log {log}")
        poll.wait(0.5)  # poll interval, not a timing assumption


def start_head(ray_bin: str, env: dict, tmp_path: Path) -> tuple[subprocess.Popen, int, str, object]:
    """A Ray head on loopback with free ports and its own temp dir, its job API answering; returns
    (process, job API port, temp dir, log file). A head that dies while starting (Ray gives its
    raylet 30 s to register, which a loaded machine can miss) is started again, 3 times at most."""
    for attempt in range(3):
        gcs, dash, agent_http, agent_grpc, metrics, client = (free_port() for _ in range(6))
        ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        head_log = open(tmp_path / f"head{attempt}.log", "w")  # a file, not a pipe nobody drains
        # --block keeps the head in the foreground, so terminating it stops exactly this cluster.
        head = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
             # Another Ray on this machine (e.g. the test session's own) holds the agent's default
             # ports; without an agent of its own the head answers "No available agent".
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}", "--num-cpus=4",
             "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
            env=env, stdout=head_log, stderr=subprocess.STDOUT)
        try:
            wait_for_head(tmp_path / f"head{attempt}.log", head, deadline_s=180)
            wait_for_job_api(dash, head, deadline_s=180)
            return head, dash, ray_tmp, head_log
        except (AssertionError, TimeoutError) as e:  # exited while starting / API never answered
            head.terminate()
            head.wait(timeout=120)
            head_log.close()
            shutil.rmtree(ray_tmp, ignore_errors=True)
            if isinstance(e, TimeoutError):
                raise
    raise RuntimeError(f"no Ray head started in 3 attempts; logs in {tmp_path}")


@pytest.mark.slow
@pytest.mark.timeout(1500)  # head start-up, SFT warm-up and the job: ~5 min here on a loaded 2-core machine
def test_single_node_script_on_a_fresh_clone_leaves_nothing_running(tmp_path):
    """The issue's user path: a fresh clone (its .venv linked to this interpreter's, as after
    `make install`), `launch/single_node.sh tiny-cpu ...`; the job's Python must be the venv's
    (the job runs in Ray's unpacked copy, where a relative .venv/bin is not there)."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True, timeout=120)
    (repo / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"  # no venv on PATH: the script must find its interpreter itself
    env["OMP_NUM_THREADS"] = "1"
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(["bash", str(repo / "launch" / "single_node.sh"), "tiny-cpu", *TINY, f"run.dir={run_dir}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=1400)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the script's trap stops its head before it exits
        proc.communicate(timeout=180)
        raise
    out = stdout + stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"job raysubmit_\w+ SUCCEEDED", out), out[-4000:]
    assert f"interpreter {repo}/.venv/bin/python" in out
    check_run_dir(run_dir)
    heads = re.findall(r"temp dir (/tmp/dashray\.\w+)", out)  # more than one if a head had to be restarted
    assert heads
    for ray_tmp in heads:
        assert processes_mentioning(ray_tmp) == [], "processes of the script's Ray head are still running"
        assert not Path(ray_tmp).exists()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_readme_cluster_command_line_as_written(tmp_path):
    """README's cluster path: a head started from the venv (so `python` on the cluster is the
    venv's, as the README asks), then its `ray job submit` line run from the repo root with only
    the address and the training arguments replaced."""
    command = readme_cluster_command()
    split = command.index("launch.train") + 1
    assert command[:3] == ["ray", "job", "submit"] and "--working-dir" in command
    assert command[command.index("--working-dir") + 1] == "." and command[split - 4:split] == ["--", "python", "-m", "launch.train"]
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # the venv, activated
    head, dash, ray_tmp, head_log = start_head(ray_bin, env, tmp_path)
    run_dir = tmp_path / "run"
    submit = [ray_bin if c == "ray" else c for c in command[:split]]
    submit[submit.index("--address") + 1] = f"http://127.0.0.1:{dash}"
    submit += [*TINY, f"run.dir={run_dir}"]
    try:
        poll, end = threading.Event(), time.monotonic() + 180
        while True:  # the head's dashboard agent registers a little after the job API answers
            job = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
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
    check_run_dir(run_dir)
