"""Ray placement of the rollout workers and learner ranks (one placement group per run).

- cpu: fractional CPU bundles, one per worker and per learner rank.
- disaggregated: engines and learner ranks on different GPUs; a tensor-parallel engine gets
  `tensor_parallel_size` GPU bundles, packed on one node (STRICT_PACK per engine is vLLM's need;
  we PACK the whole group and keep an engine's bundles contiguous).
- colocated: engines and learner ranks share GPU bundles (engines sleep while the learner trains;
  weights move by CUDA IPC).

Used by `python -m launch.train`.
"""
from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from launch.config import Config


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
    placement = cfg.train.placement
    if placement == "auto":
        placement = "cpu" if cfg.train.num_gpus == 0 else "disaggregated"
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


def make_placement(cfg: Config) -> Placement:
    bundles, workers, learners, fraction = plan_bundles(cfg)
    pg = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=cfg.train.actor_timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(f"Ray could not place {len(bundles)} bundles {bundles} within "
                           f"train.actor_timeout_s={cfg.train.actor_timeout_s}s; cluster resources: {ray.cluster_resources()}")
    return Placement(pg, workers, learners, fraction)
