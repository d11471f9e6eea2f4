"""Ray placement of the rollout workers and learner ranks (one placement group per run).

- cpu: fractional CPU bundles, one per worker and per learner rank.
- disaggregated: engines and learner ranks on different GPUs; a tensor-parallel engine gets
  `tensor_parallel_size` GPU bundles, packed on one node (STRICT_PACK per engine is vLLM's need;
  we PACK the whole group and keep an engine's bundles contiguous).
- colocated: engines and learner ranks share GPU bundles (weights move by CUDA IPC or gloo).

Before anything is placed, `preflight` refuses at once what the machine or cluster lacks (GPUs,
vLLM, a reachable model) and `missing_resources` compares the bundles with the cluster's nodes,
so an impossible placement fails in seconds, naming what is missing, instead of waiting for
train.actor_timeout_s.

Used by `python -m launch.train`; tested by tests/test_placement.py.
"""
from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from launch.config import Config, ConfigError, resolved_placement


@dataclass
class Placement:
    pg: PlacementGroup
    """The run's placement group."""
    worker_bundles: list[list[int]]
    """Bundle indices of each rollout worker (several for tensor parallelism)."""
    learner_bundles: list[int]
    """Bundle index of each learner rank."""
    gpu_fraction: float
    """GPUs each actor asks of its bundle (0 on CPU; 0.5 when colocated so two actors share one GPU)."""

    @property
    def learner_bundle_offset(self) -> int:
        return self.learner_bundles[0]

    def remove(self) -> None:
        remove_placement_group(self.pg)


def plan_bundles(cfg: Config) -> tuple[list[dict], list[list[int]], list[int], float]:
    """Bundles and who sits where, without touching Ray (pure, unit-tested)."""
    r, l = cfg.rollout, cfg.learner
    placement = resolved_placement(cfg)
    if placement == "cpu":
        bundles = [{"CPU": r.cpus_per_worker} for _ in range(r.num_workers)]
        bundles += [{"CPU": l.cpus_per_rank} for _ in range(l.num_ranks)]
        workers = [[i] for i in range(r.num_workers)]
        return bundles, workers, list(range(r.num_workers, r.num_workers + l.num_ranks)), 0.0
    tp = r.tensor_parallel_size
    if placement == "disaggregated":
        bundles = [{"GPU": 1, "CPU": r.cpus_per_worker / tp} for _ in range(r.num_workers * tp)]
        bundles += [{"GPU": 1, "CPU": l.cpus_per_rank} for _ in range(l.num_ranks)]
        workers = [list(range(i * tp, (i + 1) * tp)) for i in range(r.num_workers)]
        first = r.num_workers * tp
        return bundles, workers, list(range(first, first + l.num_ranks)), 1.0
    # colocated: max(engine GPUs, learner GPUs) bundles, shared half/half.
    n = max(r.num_workers * tp, l.num_ranks)
    bundles = [{"GPU": 1, "CPU": r.cpus_per_worker + l.cpus_per_rank} for _ in range(n)]
    workers = [list(range(i * tp, (i + 1) * tp)) for i in range(r.num_workers)]
    return bundles, workers, list(range(l.num_ranks)), 0.5


def missing_resources(bundles: list[dict], nodes: list[dict[str, float]]) -> list[str]:
    """What the cluster lacks for these bundles, one line per shortfall (empty: it can hold them).
    `nodes`: the resources of each alive node. Totals per resource first, then per bundle: a
    bundle is never split, so one node must hold all of it (PACK spreads bundles, not a bundle)."""
    problems = []
    for key in sorted({k for b in bundles for k in b}):
        need = sum(b.get(key, 0) for b in bundles)
        have = sum(n.get(key, 0) for n in nodes)
        if need > have:
            problems.append(f"{key}: the placement needs {need:g}, the cluster has {have:g}")
    if not problems:
        for b in bundles:
            if not any(all(n.get(k, 0) >= v for k, v in b.items()) for n in nodes):
                problems.append(f"no single node holds the bundle {b} (nodes: {nodes})")
                break
    return problems


def ds_accelerator(cfg: Config) -> str:
    """DeepSpeed's accelerator for the learner ranks: "cuda" when they have GPUs, else "cpu".
    Set explicitly (an empty DS_ACCELERATOR makes DeepSpeed fall back to CPU on a GPU node, and
    the nccl transport then broadcasts CPU tensors)."""
    return "cuda" if cfg.train.num_gpus > 0 and cfg.learner.gpus_per_rank > 0 else "cpu"


def preflight(cfg: Config, joins_cluster: bool) -> None:
    """Refuse at once, naming everything missing, a run this machine cannot start: GPUs (local
    cluster only: a cluster that is joined is checked by `make_placement`), vLLM, a reachable
    model, an accelerator setting that contradicts the config. Raises ConfigError."""
    problems = []
    if cfg.train.num_gpus and not joins_cluster:
        import torch

        have = torch.cuda.device_count()
        if have < cfg.train.num_gpus:
            problems.append(f"GPUs: train.num_gpus={cfg.train.num_gpus}, this machine has {have} "
                            "(a CPU run: --config tiny-cpu, or train.num_gpus=0 with rollout.engine=hf)")
    if cfg.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        problems.append("vLLM: rollout.engine=vllm but the vllm package is not installed")
    model = cfg.model.path
    if model and not Path(model).exists() and not _hub_model_cached(model) and not _hub_reachable():
        problems.append(f"model: model.path={model!r} is not a local directory, not in the Hugging Face "
                        "cache, and huggingface.co is unreachable")
    wanted = ds_accelerator(cfg)
    if os.environ.get("DS_ACCELERATOR") and os.environ["DS_ACCELERATOR"] != wanted:
        problems.append(f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} in the environment contradicts the config "
                        f"(train.num_gpus={cfg.train.num_gpus}, learner.gpus_per_rank={cfg.learner.gpus_per_rank:g} "
                        f"-> {wanted})")
    if problems:
        raise ConfigError("this run cannot start here:\n  " + "\n  ".join(problems))


def _hub_model_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def make_placement(cfg: Config) -> Placement:
    """The run's placement group, once the cluster can hold it (ConfigError naming the shortfall,
    per resource and per node, otherwise: Ray would wait for resources that never come)."""
    bundles, workers, learners, fraction = plan_bundles(cfg)
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    problems = missing_resources(bundles, nodes)
    if problems:
        raise ConfigError("the Ray cluster cannot hold this run's placement:\n  " + "\n  ".join(problems))
    pg = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=cfg.train.actor_timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(f"Ray could not place {len(bundles)} bundles {bundles} within "
                           f"train.actor_timeout_s={cfg.train.actor_timeout_s}s; cluster resources: {ray.cluster_resources()}")
    return Placement(pg, workers, learners, fraction)
