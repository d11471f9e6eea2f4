"""Placement plans and the checks before them, on a CPU machine: Ray schedules declared GPUs
(`ray.init(num_gpus=8)`) and sets CUDA_VISIBLE_DEVICES for actors, so the run's real placement
code (make_placement, make_rollout_workers, LearnerGroup) places probe actors that only report
what they were given. Also: transport/placement validation by name, the cluster-resource check,
and a GPU preset on a CPU machine failing at once.

    PYTHONPATH=$PWD python -m pytest -q tests/test_placement.py
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from launch.config import ConfigError, load_config
from launch.placement import (ModelShape, colocated_memory_problem, context_problem, ds_accelerator, make_placement, missing_resources,
                              model_shape, plan_bundles, preflight)
from learner.actor import LearnerGroup
from rollout_workers.worker import make_rollout_workers

ROOT = Path(__file__).resolve().parents[1]
GPU_CLUSTER = 8


def gpu_config(*overrides: str):
    return load_config(None, ["train.num_gpus=4", "learner.gpus_per_rank=1", "rollout.num_workers=2",
                              "learner.num_ranks=2", "rollout.cpus_per_worker=0.5", "learner.cpus_per_rank=0.5",
                              "train.actor_timeout_s=60", *overrides])


# ---------------------------------------------------------------- validation (pure)

@pytest.mark.parametrize("overrides, message", [
    # issue 17 item 4: NCCL cannot hold two members of one communicator on one GPU.
    (["rollout.engine=vllm", "sync.transport=nccl", "train.placement=colocated"],
     r"sync\.transport=nccl does not work with train\.placement=colocated \(NCCL refuses"),
    # item 6: an engine GPU without a learner rank would get no IPC handle.
    (["rollout.engine=vllm", "sync.transport=ipc", "train.placement=colocated", "learner.num_ranks=1"],
     r"learner\.num_ranks \(1\) < rollout\.num_workers x rollout\.tensor_parallel_size \(2\)"),
    # item 5: tensor parallelism is refused by name until its bundles/ranks/handles are planned.
    (["train.num_gpus=8", "rollout.tensor_parallel_size=2"], r"rollout\.tensor_parallel_size=2 is not supported"),
    (["sync.transport=ipc", "train.placement=disaggregated", "rollout.engine=vllm"],
     r"sync\.transport=ipc does not work with train\.placement=disaggregated"),
    (["sync.transport=nccl"], r"sync\.transport=nccl is vLLM's native path"),
])
def test_transport_and_placement_rules_refuse_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        gpu_config(*overrides)


def test_accepted_gpu_transports():
    gpu_config("rollout.engine=vllm", "sync.transport=nccl")  # auto -> disaggregated
    gpu_config("rollout.engine=vllm", "sync.transport=ipc", "train.placement=colocated")


def test_ds_accelerator_follows_the_placement():
    # issue 17 item 8: a GPU learner must never fall back to DeepSpeed's CPU accelerator.
    assert ds_accelerator(gpu_config()) == "cuda"
    assert ds_accelerator(gpu_config("train.placement=colocated")) == "cuda"
    assert ds_accelerator(load_config(None, [])) == "cpu"
    assert ds_accelerator(load_config("tiny-cpu")) == "cpu"


@pytest.mark.parametrize("overrides, message", [
    # issue 21 item 2: a rank in a GPU bundle training on CPU is refused, not obeyed.
    (["learner.gpus_per_rank=0"], r"learner\.gpus_per_rank=0 with train\.placement=auto \(-> disaggregated\): that "
                                  r"placement gives every learner rank a GPU bundle"),
    (["learner.gpus_per_rank=0", "train.placement=colocated"], r"learner\.gpus_per_rank=0 with train\.placement=colocated"),
    (["train.placement=cpu"], r"learner\.gpus_per_rank=1 with train\.placement=cpu \(-> cpu\): that placement gives "
                              r"the learner no GPU"),
    # issue 21 item 3: the native transfers send from the learner's GPU.
    (["learner.gpus_per_rank=0", "rollout.engine=vllm", "sync.transport=nccl"],
     r"sync\.transport=nccl sends the weights from the learner's GPU, and learner\.gpus_per_rank=0"),
    (["learner.gpus_per_rank=0", "rollout.engine=vllm", "sync.transport=ipc", "train.placement=colocated"],
     r"sync\.transport=ipc sends the weights from the learner's GPU"),
])
def test_learner_device_contradictions_are_refused_by_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        gpu_config(*overrides)


def qwen05b_dir(path: Path) -> Path:
    """A directory with only Qwen2.5-0.5B's config.json (its shape; no weights needed)."""
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True).save_pretrained(path)
    return path


def test_model_shape_counts_parameters_from_the_config_alone(tmp_path):
    shape = model_shape(load_config(None, [f"model.path={qwen05b_dir(tmp_path)}"]))
    assert shape == ModelShape(494_032_768, 24, 896, 151_936, 32_768)  # Qwen2.5-0.5B's published count


def test_limits_past_the_models_context_are_refused_before_any_actor_starts(monkeypatch):
    """The engines refuse a prompt that leaves no room for max_new_tokens in the context, so a
    config whose limits add up past it would have every prompt refused: the embedded model has
    256 positions, and 64 + 200 = 264."""
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    cfg = load_config(None, ["rollout.max_new_tokens=200"])
    assert model_shape(cfg).context == 256
    assert context_problem(cfg, 256) == ("context: rollout.max_prompt_tokens (64) + rollout.max_new_tokens (200) = "
                                         "264 positions, more than the model's 256 (max_position_embeddings): lower "
                                         "one of them so that they add up to at most 256")
    with pytest.raises(ConfigError, match=r"rollout\.max_new_tokens \(200\) = 264 positions"):
        preflight(cfg, joins_cluster=False)
    assert "eval.max_new_tokens (193) = 257" in context_problem(load_config(None, ["eval.max_new_tokens=193"]), 256)
    assert context_problem(load_config(None, ["rollout.max_new_tokens=192"]), 256) is None  # 64 + 192 = 256 fits
    preflight(load_config(None, ["rollout.max_new_tokens=192"]), joins_cluster=False)


def colocated(tmp_path, *overrides):
    return gpu_config("train.placement=colocated", "learner.bf16=true", "learner.zero_stage=2", "learner.num_ranks=2",
                      "learner.micro_batch_tokens=16384", f"model.path={qwen05b_dir(tmp_path)}", *overrides)


def test_colocated_memory_names_the_utilization_that_fits(tmp_path):
    """Issue 21 item 3: the presets' 0.85 with a 16k-token micro-batch leaves a 0.5B learner no room
    on an 80 GiB GPU. Hand-computed: model states 2N + 14N/2 = 9N = 4.14 GiB, activations 11.16,
    logits 23.18, context 1 -> 39.5 GiB; (80 - 39.5) / 80 = 0.506 -> 0.50."""
    cfg = colocated(tmp_path, "rollout.gpu_memory_utilization=0.85")
    problem = colocated_memory_problem(cfg, model_shape(cfg), 80 * 2**30)
    assert problem is not None
    assert "rollout.gpu_memory_utilization=0.85 gives the engine 68.0 GiB of the 80.0 GiB GPU" in problem
    assert "needs about 39.5 GiB (model states 4.1 GiB, activations 11.2 GiB, logits 23.2 GiB" in problem
    assert problem.endswith("set rollout.gpu_memory_utilization <= 0.50")
    assert colocated_memory_problem(colocated(tmp_path, "rollout.gpu_memory_utilization=0.5"), model_shape(cfg),
                                    80 * 2**30) is None
    small = colocated_memory_problem(cfg, model_shape(cfg), 24 * 2**30)
    assert "the learner alone does not fit: lower learner.micro_batch_tokens" in small


def test_preflight_refuses_a_colocated_run_that_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    cfg = colocated(tmp_path, "rollout.gpu_memory_utilization=0.85", "train.gpu_memory_gib=80")
    with pytest.raises(ConfigError, match=r"set rollout\.gpu_memory_utilization <= 0\.50"):
        preflight(cfg, joins_cluster=True)
    preflight(colocated(tmp_path, "rollout.gpu_memory_utilization=0.45", "train.gpu_memory_gib=80"), joins_cluster=True)
    with pytest.raises(ConfigError, match=r"no GPU to read its size from: set train\.gpu_memory_gib"):
        preflight(colocated(tmp_path), joins_cluster=True)  # this machine has no GPU


SITE_WITH_A_GPU = "import torch\ntorch.cuda.is_available = lambda: True\ntorch.cuda.device_count = lambda: 1\n"
"""sitecustomize for a child Python that believes a GPU is visible (the GPU box of issue 21 item 2)."""


def single_node_plan(tmp_path, *args, env_extra=None):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE_WITH_A_GPU)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), **(env_extra or {})}
    env.pop("DS_ACCELERATOR", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "launch.single_node_plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_single_node_plan_keeps_a_cpu_preset_on_cpu_where_a_gpu_is_visible(tmp_path):
    """launch/single_node.sh used to export DS_ACCELERATOR=cuda whenever torch saw a GPU, which
    the job's preflight then refused for tiny-cpu. The accelerator now comes from the config."""
    proc = single_node_plan(tmp_path, "--config", "tiny-cpu", "train.iterations=1")
    assert proc.returncode == 0, proc.stderr
    cpus, accelerator = proc.stdout.split()
    assert accelerator == "cpu" and int(cpus) >= 2
    refused = single_node_plan(tmp_path, "--config", "tiny-cpu", env_extra={"DS_ACCELERATOR": "cuda"})
    assert refused.returncode == 2
    assert "DS_ACCELERATOR=cuda in the environment contradicts the config" in refused.stderr
    bad = single_node_plan(tmp_path, "--config", "tiny-cpu", "learner.gpus_per_rank=1")
    assert bad.returncode == 2 and "learner.gpus_per_rank=1 with train.placement=auto (-> cpu)" in bad.stderr


def test_missing_resources_totals_and_per_node():
    bundles = [{"GPU": 1, "CPU": 1}] * 4
    assert missing_resources(bundles, [{"GPU": 2, "CPU": 4}, {"GPU": 2, "CPU": 4}]) == []
    assert missing_resources(bundles, [{"CPU": 16}]) == ["GPU: the placement needs 4, the cluster has 0"]
    assert missing_resources(bundles, [{"GPU": 4, "CPU": 2}]) == ["CPU: the placement needs 4, the cluster has 2"]
    # Totals suffice, but no node has a GPU and a CPU together: a bundle is never split.
    per_node = missing_resources([{"GPU": 1, "CPU": 1}], [{"GPU": 1}, {"CPU": 1}])
    assert len(per_node) == 1 and per_node[0].startswith("no single node holds the bundle {'GPU': 1, 'CPU': 1}")


def test_gpu_preset_on_a_cpu_machine_fails_before_ray(tmp_path):
    """Issue 18: `--config qwen2.5-0.5b-math` without GPUs exits non-zero naming what is missing,
    before any Ray instance starts (it used to wait for resources that never come)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1"}
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", "qwen2.5-0.5b-math", f"run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "GPUs: train.num_gpus=8, this machine has 0" in proc.stderr
    assert "model: model.path='Qwen/Qwen2.5-0.5B'" in proc.stderr  # offline and not cached here
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- real scheduling, declared GPUs

def probe_cls() -> type:
    """A class defined here, not at module level, so Ray pickles it by value (the tests directory
    is not importable in the workers)."""

    class Probe:
        """Stands in for a rollout worker or learner rank: takes their constructor arguments and
        reports the GPUs Ray gave it."""

        def __init__(self, *args) -> None:
            pass

        def rendezvous_address(self) -> tuple[str, int]:
            return "127.0.0.1", 0

        def setup(self, *args) -> None:
            pass

        def given(self) -> tuple[list, str]:
            return [str(g) for g in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES", "")

    return Probe


@pytest.fixture(scope="module")
def gpu_ray(own_ray):
    ray.init(num_cpus=8, num_gpus=GPU_CLUSTER, include_dashboard=False, log_to_driver=False, runtime_env=own_ray)
    yield


def place(cfg):
    """The run's placement path (launch.train.setup) with probes for actors."""
    placement = make_placement(cfg)
    probe = probe_cls()
    workers = make_rollout_workers(cfg.rollout, "unused", placement.pg, first_bundle=placement.worker_bundles[0][0],
                                   num_gpus_per_worker=placement.gpu_fraction * cfg.rollout.tensor_parallel_size,
                                   worker_cls=probe)
    learner = LearnerGroup(cfg.learner, "unused", cfg.rollout.max_new_tokens, 60, placement_group=placement.pg,
                           bundle_offset=placement.learner_bundle_offset, rank_cls=probe,
                           gpu_fraction=placement.gpu_fraction)
    try:
        return (ray.get([w.given.remote() for w in workers], timeout=60),
                ray.get([r.given.remote() for r in learner.rank_actors], timeout=60))
    finally:
        for a in workers + learner.rank_actors:
            ray.kill(a)
        placement.remove()


@pytest.mark.slow
def test_disaggregated_gives_every_actor_its_own_gpu(gpu_ray):
    workers, learners = place(gpu_config("train.placement=disaggregated"))
    gpus = [ids for ids, _ in workers + learners]
    assert all(len(ids) == 1 for ids in gpus)
    assert len({ids[0] for ids in gpus}) == 4  # 2 engines + 2 learner ranks on 4 distinct GPUs
    assert all(visible == ids[0] for ids, visible in workers + learners)


@pytest.mark.slow
def test_colocated_puts_engine_i_and_learner_rank_i_on_one_gpu(gpu_ray):
    workers, learners = place(gpu_config("train.placement=colocated", "rollout.engine=vllm", "sync.transport=ipc"))
    assert [ids for ids, _ in workers] == [ids for ids, _ in learners]
    assert len({ids[0] for ids, _ in workers}) == 2


@pytest.mark.slow
def test_placement_the_cluster_cannot_hold_fails_at_once(gpu_ray):
    """Issue 17 item 12: refused before the placement group is created, naming the shortfall
    (it used to wait train.actor_timeout_s for GPUs that never come)."""
    cfg = gpu_config("train.num_gpus=16", "rollout.num_workers=8", "learner.num_ranks=8")
    assert len(plan_bundles(cfg)[0]) == 16
    with pytest.raises(ConfigError, match=r"GPU: the placement needs 16, the cluster has 8"):
        make_placement(cfg)
    assert ray.util.placement_group_table() == {} or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
