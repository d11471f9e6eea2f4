"""The GPU check (launch/gpu_check.sh, launch/gpu_check/): its arithmetic, the carried-wheel trim,
the step driver's failure handling, and the CPU rehearsal's cheapest step end to end.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from launch.config import load_config, validate
from launch.gpu_check.steps import (CPU_REHEARSAL, GPU, TINY_SHAPE, bf16_peak, measure_e2e, measure_sync,
                                    train_flops_per_token)
from launch.gpu_check.wheels import RAY_DROP, trim_wheel

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA GeForce RTX 4090", None)])
def test_bf16_peak_by_card_name(name, tflops):
    peak = bf16_peak(name)
    assert (peak.tflops if peak else None) == tflops
    if peak:
        assert "datasheet" in peak.source


def test_train_flops_per_token_is_palm_6n_plus_12lht():
    assert train_flops_per_token(n_params=10, layers=2, hidden=3, seq_len=4) == 6 * 10 + 12 * 2 * 3 * 4
    # Qwen2.5-0.5B shape (494,032,768 params, tied) at 1024 tokens: 2.96 GFLOP weights + 0.26 attention
    assert train_flops_per_token(494_032_768, 24, 896, 1024) == pytest.approx(3.2284e9, rel=1e-4)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def test_trim_wheel_drops_jars_and_maps_and_rewrites_record(tmp_path):
    files = {"ray/__init__.py": b"x = 1\n", "ray/jars/ray_dist.jar": b"J" * 5000,
             "ray/dashboard/main.js.map": b"M" * 3000, "ray/dashboard/main.js": b"js"}
    wheel = tmp_path / "ray-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("ray-0.dist-info/RECORD", "\n".join(_record_line(n, d) for n, d in files.items()) + "\n")
    saved = trim_wheel(wheel, RAY_DROP)
    assert saved > 0
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read("ray-0.dist-info/RECORD").decode().splitlines()
    assert names == {"ray/__init__.py", "ray/dashboard/main.js", "ray-0.dist-info/RECORD"}
    assert sorted(record) == sorted([_record_line("ray/__init__.py", b"x = 1\n"), _record_line("ray/dashboard/main.js", b"js"),
                                     "ray-0.dist-info/RECORD,,"])


def _env(out: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(out), "PYTHON": sys.executable}


def test_failing_steps_are_recorded_and_the_run_goes_on(tmp_path):
    """The GPU profile on a machine without CUDA: every step fails at once, each is recorded with
    its error, the next one still runs, the table and JSON are written, and the exit status says so."""
    proc = subprocess.run([sys.executable, "-m", "launch.gpu_check", "--out", str(tmp_path), "--steps", "engine,sync"],
                          cwd=ROOT, env={**_env(tmp_path), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(result["steps"]) == ["engine", "sync"]
    for step in ("engine", "sync"):
        assert result["steps"][step]["status"] == "failed"
        assert "needs CUDA" in result["steps"][step]["error"]
    assert [r["figure"] for r in result["rows"]] == ["engine", "sync"]
    assert "| engine | FAILED: exit 1: profile gpu needs CUDA" in proc.stdout


def test_step_past_the_budget_is_skipped_and_recorded(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.gpu_check", "--cpu-rehearsal", "--out", str(tmp_path),
                           "--steps", "e2e", "--budget-s", "5"], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    step = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["e2e"]
    assert step["status"] == "skipped" and "--budget-s 5" in step["error"]


def test_cpu_rehearsal_engine_step_prints_the_table(tmp_path):
    """The script itself, as the device tool runs it, on CPU: the transformers engine's tokens/s
    for every batch size of the rehearsal profile, the vLLM row saying why it is not measured."""
    proc = subprocess.run(["bash", "launch/gpu_check.sh", "--cpu-rehearsal", "--steps", "engine"], cwd=ROOT,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["profile"] == "cpu-rehearsal"
    assert result["steps"]["install"]["status"] == "ok"  # "skipped (cpu rehearsal)"
    engine = result["steps"]["engine"]["figures"]
    curve = engine["transformers"]
    assert curve["batch_sizes"] == [1, 4, 16] and not curve["skipped_batch_sizes"]
    assert all(r > 0 for r in curve["tokens_per_second"])
    assert engine["vllm"]["available"] is False and engine["vllm"]["reason"]
    figures = [r["figure"] for r in result["rows"]]
    assert figures[0] == "install carried wheels" and figures[-1] == "vLLM engine"
    assert "| transformers engine tok/s by batch" in proc.stdout
    assert "python -m launch.gpu_check.steps engine --profile cpu-rehearsal" in proc.stdout


def test_sync_step_copies_bit_exact_in_process_and_through_shared_memory():
    """The sync step on the rehearsal's shape: the engine side ends with the learner's weights
    exactly (the IPC receiver is a spawned process reading one shared buffer), for every version."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        result = measure_sync(CPU_REHEARSAL)
    finally:
        torch.set_num_threads(threads)
    h, i, v, layers = TINY_SHAPE["hidden_size"], TINY_SHAPE["intermediate_size"], TINY_SHAPE["vocab_size"], TINY_SHAPE["num_hidden_layers"]
    kv = h // TINY_SHAPE["num_attention_heads"] * TINY_SHAPE["num_key_value_heads"]
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    assert result["bytes"] == 2 * (v * h + layers * per_layer + h)  # bf16, tied head counted once
    assert result["tensors"] == 2 + 12 * layers
    assert result["in_process_max_abs_diff"] == 0.0 and result["ipc_max_abs_sum_diff"] == 0.0
    assert result["ipc_mechanism"] == "shared memory (CPU rehearsal)"
    assert all(result[k] > 0 for k in ("memcpy_seconds", "in_process_seconds", "ipc_seconds"))


@pytest.mark.parametrize("profile", [GPU, CPU_REHEARSAL], ids=lambda p: p.name)
def test_e2e_overrides_are_a_valid_config(profile):
    """The end-to-end command's overrides pass the config's own validation (a renamed key would
    otherwise surface only on the lent machine), and one GPU fits its placement."""
    cfg = load_config(None, list(profile.e2e_overrides))
    validate(cfg)
    assert cfg.train.num_gpus == (1 if profile.device == "cuda" else 0)


def test_e2e_step_without_summary_fails_naming_the_last_line(tmp_path):
    bad = dataclasses.replace(CPU_REHEARSAL, e2e_overrides=("train.no_such_key=1",))
    with pytest.raises(RuntimeError, match=r"launch.train exited \d+ without a summary.json: .*no_such_key"):
        measure_e2e(bad, cap_s=120, run_dir=tmp_path / "run")
    assert "no_such_key" in (tmp_path / "e2e-train.log").read_text()
