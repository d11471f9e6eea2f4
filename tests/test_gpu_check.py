"""The GPU check (launch/gpu_check.sh, launch/gpu_check/): its arithmetic, the carried-wheel trim,
the step driver's failure handling and result files (at most 8 under OUT, on the GPU path too),
the learner step through the project's RankTrainer, and the CPU rehearsal's engine and sync steps.

    PYTHONPATH=$PWD python -m pytest -q tests/test_gpu_check.py
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
from types import SimpleNamespace

import pytest
import torch

from launch.config import load_config, validate
from launch.gpu_check.__main__ import MAX_OUT_FILES, NOT_COVERED, OUT_FILES, SCRIPT_OUT_FILES
from launch.gpu_check.steps import (CPU_REHEARSAL, GPU, TINY_SHAPE, bf16_peak, bit_checksum, learner_groups,
                                    matmul_ceiling, measure_e2e, measure_sync, micro_batch_flops, train_flops,
                                    train_flops_per_token)
from launch.gpu_check.wheels import RAY_DROP, trim_wheel
from launch.placement import ds_accelerator
from learner.filtering import select_samples

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
    # varying lengths: each sequence at its own T, padding not counted
    assert train_flops(10, 2, 3, [4, 1]) == 4 * (60 + 12 * 2 * 3 * 4) + 1 * (60 + 12 * 2 * 3 * 1)
    # a shared micro-batch: heads of 3 and 2 tokens; rows of 2 and 1 tokens continue head 0, one of 4 head 1
    shared = SimpleNamespace(head_lengths=torch.tensor([3, 2]), lengths=torch.tensor([2, 1, 4]),
                             row_head=torch.tensor([0, 0, 1]))
    per_token = lambda t: 60 + 12 * 2 * 3 * t  # noqa: E731  (6 N + 12 L H T)
    assert micro_batch_flops(10, 2, 3, shared) == (3 * per_token(3) + 2 * per_token(2) + 2 * per_token(5)
                                                   + 1 * per_token(4) + 4 * per_token(6))
    whole = SimpleNamespace(head_lengths=torch.zeros(0, dtype=torch.long), lengths=torch.tensor([4, 1]),
                            row_head=torch.zeros(0, dtype=torch.long))
    assert micro_batch_flops(10, 2, 3, whole) == train_flops(10, 2, 3, [4, 1])


def test_matmul_ceiling_is_measured_in_the_asked_dtype():
    ceiling = matmul_ceiling("cpu", torch.float32, size=64, repeats=3, inner=2)
    assert ceiling.dtype == "float32" and ceiling.size == 64 and ceiling.repeats == 3
    assert 0 < ceiling.tflops.min <= ceiling.tflops.median <= ceiling.tflops.max


def test_bit_checksum_sees_any_changed_bit_and_any_permutation():
    t = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert bit_checksum(t) == bit_checksum(t.clone())
    flipped = t.clone()
    flipped.view(torch.int16)[517] ^= 1  # the lowest mantissa bit of one element
    assert bit_checksum(flipped) != bit_checksum(t)
    assert bit_checksum(t.flip(0)) != bit_checksum(t)
    assert bit_checksum(torch.zeros(4)) == 0 and bit_checksum(torch.ones(3)) != bit_checksum(torch.ones(3) * 2)


@pytest.mark.parametrize("profile", [GPU, CPU_REHEARSAL], ids=lambda p: p.name)
def test_learner_groups_are_realistic_and_all_kept(profile):
    """Prompts and completions of varying lengths in the profile's ranges, every sample kept by the
    learner's own filter, about learner_micro_per_step budgets of tokens, none over the budget."""
    budget = profile.learner_budgets[0]
    groups = learner_groups(profile, int(profile.model_shape["vocab_size"]), budget, seed=1)
    plens = {len(g.prompt_token_ids) for g in groups}
    clens = {len(c.token_ids) for g in groups for c in g.completions}
    assert min(plens) >= profile.learner_prompt_lens[0] and max(plens) <= profile.learner_prompt_lens[1]
    assert min(clens) >= profile.learner_completion_lens[0] and max(clens) <= profile.learner_completion_lens[1]
    assert len(clens) > 3, "lengths vary"
    assert all(len(g.completions) == profile.learner_group_size for g in groups)
    kept = select_samples(groups, "grpo", 0.1, True)
    assert len(kept.samples) == len(groups) * profile.learner_group_size
    tokens = sum(s.num_tokens for s in kept.samples)
    assert profile.learner_micro_per_step * budget <= tokens
    assert max(s.num_tokens for s in kept.samples) <= budget


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


def _out_files(out: Path) -> set[str]:
    """Every file under OUT, relative (the device tool returns at most MAX_OUT_FILES)."""
    return {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()}


def test_out_files_fit_what_the_device_tool_returns():
    assert len(OUT_FILES) + len(SCRIPT_OUT_FILES) <= MAX_OUT_FILES == 8


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
    assert _out_files(tmp_path) == set(OUT_FILES)
    log = (tmp_path / "gpu_check.log").read_text()
    assert "===== step engine: failed" in log and "===== step sync: failed" in log and "needs CUDA" in log
    assert not Path(result["scratch"]).exists()  # the default scratch is a temporary directory, removed


def test_gpu_path_of_the_script_leaves_at_most_8_files_in_out(tmp_path):
    """`bash launch/gpu_check.sh` as on the lent machine (nvidia-smi and pip stubbed, no CUDA, so
    the step fails at once): OUT holds the script's two files and the driver's three, nothing else."""
    out, bin_dir = tmp_path / "out", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'stub GPU, 80 GiB'\n")
    (bin_dir / "python").write_text(f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "stub pip $*"; exit 0; fi\n'
                                    f'exec {sys.executable} "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**_env(out), "PYTHON": str(bin_dir / "python"), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", "launch/gpu_check.sh", "--steps", "engine"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _out_files(out) == set(OUT_FILES) | set(SCRIPT_OUT_FILES)
    assert len(_out_files(out)) <= MAX_OUT_FILES
    assert "stub pip" in (out / "install.log").read_text() and "stub GPU" in (out / "nvidia-smi.txt").read_text()
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["steps"]["install"]["status"] == "ok" and result["steps"]["engine"]["status"] == "failed"


def test_scratch_inside_out_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.gpu_check", "--cpu-rehearsal", "--out", str(tmp_path),
                           "--scratch", str(tmp_path / "s"), "--steps", "sync"], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is inside --out" in proc.stderr


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
    assert curve["repeats"] == CPU_REHEARSAL.engine_repeats == 3
    assert all(0 < lo <= r <= hi for lo, r, hi in zip(curve["tokens_per_second_min"], curve["tokens_per_second"],
                                                      curve["tokens_per_second_max"]))
    assert engine["vllm"]["available"] is False and engine["vllm"]["reason"]
    figures = [r["figure"] for r in result["rows"]]
    assert figures[0] == "install carried wheels" and figures[-1] == "vLLM engine"
    assert "| transformers engine tok/s by batch" in proc.stdout
    assert "python -m launch.gpu_check.steps engine --profile cpu-rehearsal" in proc.stdout
    assert NOT_COVERED in proc.stdout and NOT_COVERED in (tmp_path / "gpu_check.md").read_text()
    assert "64 MiB carry limit" in NOT_COVERED
    assert _out_files(tmp_path) == set(OUT_FILES)


def test_learner_step_runs_the_project_rank_trainer(tmp_path):
    """The learner step on the rehearsal profile: RankTrainer + StreamingBatcher on varying-length
    samples, one optimizer step per timed batch, tokens/s, padding, and MFU against the measured
    matmul ceiling (no datasheet peak for a CPU)."""
    proc = subprocess.run([sys.executable, "-m", "launch.gpu_check.steps", "learner", "--profile", "cpu-rehearsal",
                           "--json", str(tmp_path / "learner.json")], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    f = json.loads((tmp_path / "learner.json").read_text())
    assert f["trainer"].startswith("learner.trainer.RankTrainer") and f["dtype"] == "float32"
    assert f["attention"] == "padded_sdpa" and f["peak_tflops"] is None
    assert f["matmul_ceiling_tflops"]["median"] > 0 and f["matmul_ceiling_dtype"] == "float32"
    assert list(f["budgets"]) == [str(b) for b in CPU_REHEARSAL.learner_budgets]
    for budget, b in f["budgets"].items():
        assert b["tokens_per_second"] > 0 and b["mfu_vs_datasheet"] is None
        assert b["mfu_vs_measured_matmul"] == pytest.approx(b["model_tflops"] / f["matmul_ceiling_tflops"]["median"])
        # the rehearsal's groups share a prompt: it is forwarded once per micro-batch, not per sample
        assert b["shared_prompts"] is True
        assert b["completion_tokens_per_step"] < b["forwarded_tokens_per_step"] < b["tokens_per_step"]
        assert b["forwarded_tokens_per_step"] <= b["padded_tokens_per_step"]
        assert b["micro_batches_per_step"] >= 2 and b["padded_tokens_per_step"] <= b["micro_batches_per_step"] * int(budget)
        assert b["step_seconds"]["min"] <= b["step_seconds"]["median"] <= b["step_seconds"]["max"]


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
    assert result["in_process_mismatched_tensors"] == 0 and result["ipc_mismatched_tensors"] == 0
    assert result["ipc_versions_checked"] == CPU_REHEARSAL.sync_repeats + 1
    assert result["ipc_mechanism"] == "shared memory (CPU rehearsal)"
    assert all(result[k] > 0 for k in ("memcpy_seconds", "in_process_seconds", "ipc_seconds"))


@pytest.mark.parametrize("profile", [GPU, CPU_REHEARSAL], ids=lambda p: p.name)
def test_e2e_overrides_are_a_valid_config(profile):
    """The end-to-end command's overrides pass the config's own validation (a renamed key would
    otherwise surface only on the lent machine), and one GPU fits its placement."""
    cfg = load_config(None, list(profile.e2e_overrides))
    validate(cfg)
    assert cfg.train.num_gpus == (1 if profile.device == "cuda" else 0)
    assert ds_accelerator(cfg) == profile.device  # the GPU run's learner trains on CUDA
    if profile.device == "cuda":
        assert cfg.learner.gpus_per_rank > 0 and cfg.learner.bf16 and cfg.learner.zero_stage >= 1


def test_e2e_step_without_summary_fails_naming_the_last_line(tmp_path):
    bad = dataclasses.replace(CPU_REHEARSAL, e2e_overrides=("train.no_such_key=1",))
    with pytest.raises(RuntimeError, match=r"launch.train exited \d+ without a summary.json: .*no_such_key"):
        measure_e2e(bad, cap_s=120, run_dir=tmp_path / "run")
    assert "no_such_key" in (tmp_path / "e2e-train.log").read_text()
