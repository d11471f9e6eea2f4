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
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from launch.config import GPU_PLACEMENTS, Config, ConfigError, resolved_placement
from launch.tiny_model import TINY_VOCAB, tiny_config
from learner.memory import learner_memory
from rollout_workers.engines.registry import engine_names, get_engine
from rollout_workers.model_dir import cached_model_dir

LEARNER_CONTEXT_BYTES = 1 << 30
"""A learner process's CUDA context and allocator slack, beside its tensors."""


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
    """DeepSpeed's accelerator for the learner ranks, derived from the placement: "cuda" when the
    placement puts them in GPU bundles (colocated, disaggregated), else "cpu". Set explicitly in
    every actor and in `launch/single_node.sh` (an empty DS_ACCELERATOR makes DeepSpeed fall back
    to CPU on a GPU node, and the nccl transport then broadcasts CPU tensors; a GPU merely being
    visible must not turn a CPU preset's learner to CUDA either). `launch.config.validate`
    refuses learner.gpus_per_rank that contradicts this."""
    return "cuda" if resolved_placement(cfg) in GPU_PLACEMENTS else "cpu"


class ModelShape(NamedTuple):
    """What the memory estimate needs of the policy model."""

    n_params: int
    layers: int
    hidden: int
    vocab: int
    context: int
    """Positions the model takes (its config's max_position_embeddings): prompt and completion together."""


def model_shape(cfg: Config) -> ModelShape:
    """The policy's shape from its config.json alone (local directory or Hugging Face cache; the
    embedded tiny model from the model section): parameters are counted on the meta device, so
    no weight is read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg.model
    config = (AutoConfig.from_pretrained(m.path) if m.path
              else tiny_config(TINY_VOCAB, m.tiny_hidden_size, m.tiny_layers, m.tiny_heads))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())  # a tied embedding is one parameter
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(n_params, int(text.num_hidden_layers), int(text.hidden_size), int(text.vocab_size),
                      int(text.max_position_embeddings))


def context_problem(cfg: Config, context: int) -> str | None:
    """Why the longest prompt and completion the config allows cannot fit the model's `context`
    positions; None when they fit. The engines refuse a prompt that leaves too little room
    (`rollout_workers.engines.base.encode_prompts`), so without this check every prompt of a run
    whose limits add up past the context would be refused, one iteration after another."""
    r = cfg.rollout
    longest_new = max(r.max_new_tokens, cfg.eval.max_new_tokens)
    if r.max_prompt_tokens + longest_new <= context:
        return None
    key = "rollout.max_new_tokens" if r.max_new_tokens >= cfg.eval.max_new_tokens else "eval.max_new_tokens"
    return (f"context: rollout.max_prompt_tokens ({r.max_prompt_tokens}) + {key} ({longest_new}) = "
            f"{r.max_prompt_tokens + longest_new} positions, more than the model's {context} "
            f"(max_position_embeddings): lower one of them so that they add up to at most {context}")


def colocated_memory_problem(cfg: Config, shape: ModelShape, gpu_bytes: int) -> str | None:
    """Why a colocated run cannot fit engine i and learner rank i on one GPU of `gpu_bytes`, with
    the rollout.gpu_memory_utilization that would fit; None when it fits. The engine keeps its
    share (weights + KV cache) while the learner backprops the groups it streams during sampling,
    so both peaks coincide (sleep mode frees the engine only between sampling and the sync)."""
    r, l = cfg.rollout, cfg.learner
    need = learner_memory(shape.n_params, shape.layers, shape.hidden, shape.vocab, l.micro_batch_tokens,
                          l.zero_stage, l.num_ranks, l.bf16, reference_model=l.kl_coef > 0)
    engine = r.gpu_memory_utilization * gpu_bytes
    learner = need.total + LEARNER_CONTEXT_BYTES
    if engine + learner <= gpu_bytes:
        return None
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    parts = (f"model states {gib(need.model_states)}, activations {gib(need.activations)}, logits "
             f"{gib(need.logits)}" + (f", reference model {gib(need.reference)}" if need.reference else "")
             + f", CUDA context {gib(LEARNER_CONTEXT_BYTES)}")
    fits = math.floor(100 * (gpu_bytes - learner) / gpu_bytes) / 100
    advice = (f"set rollout.gpu_memory_utilization <= {fits:.2f}" if fits > 0 else
              "the learner alone does not fit: lower learner.micro_batch_tokens, raise learner.zero_stage or "
              "learner.num_ranks, or use train.placement=disaggregated")
    return (f"train.placement=colocated: rollout.gpu_memory_utilization={r.gpu_memory_utilization:g} gives the engine "
            f"{gib(engine)} of the {gib(gpu_bytes)} GPU, and the learner rank beside it needs about "
            f"{gib(learner)} ({parts}; learner.memory); {advice}")


def gpu_memory_bytes(cfg: Config) -> int | None:
    """Memory of one GPU: train.gpu_memory_gib, else this machine's first GPU, else None."""
    if cfg.train.gpu_memory_gib > 0:
        return int(cfg.train.gpu_memory_gib * 2**30)
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def preflight(cfg: Config, joins_cluster: bool) -> None:
    """Refuse at once, naming everything missing, a run this machine cannot start: GPUs (local
    cluster only: a cluster that is joined is checked by `make_placement`), vLLM, a reachable
    model, limits that fit the model's context, room on the GPU for a colocated engine and learner,
    an accelerator setting that contradicts the config. Raises ConfigError."""
    problems = []
    if cfg.train.num_gpus and not joins_cluster:
        import torch

        have = torch.cuda.device_count()
        if have < cfg.train.num_gpus:
            # The engines a CPU run can use as installed: registered ones that need no extra package.
            cpu_engines = " or ".join(f"rollout.engine={n}" for n in engine_names(lambda spec: spec.package is None))
            problems.append(f"GPUs: train.num_gpus={cfg.train.num_gpus}, this machine has {have} "
                            f"(a CPU run: --config tiny-cpu, or train.num_gpus=0 with {cpu_engines})")
    engine = get_engine(cfg.rollout.engine)
    if engine.package is not None and importlib.util.find_spec(engine.package) is None:
        problems.append(f"{engine.package}: rollout.engine={cfg.rollout.engine} but the {engine.package} package is not "
                        f"installed ({engine.install_hint})")
    model = cfg.model.path
    model_missing = bool(model) and not Path(model).exists() and cached_model_dir(model) is None and not _hub_reachable()
    if model_missing:
        problems.append(f"model: model.path={model!r} is not a local directory, not in the Hugging Face "
                        "cache, and huggingface.co is unreachable")
    shape = None
    if not model_missing:
        try:
            shape = model_shape(cfg)
        except (OSError, ValueError) as e:  # a directory without a readable config.json
            problems.append(f"model: model.path={model!r} has no model config transformers can read ({e})")
    if shape is not None:
        problem = context_problem(cfg, shape.context)
        if problem:
            problems.append(problem)
    if resolved_placement(cfg) == "colocated" and shape is not None:
        gpu_bytes = gpu_memory_bytes(cfg)
        if gpu_bytes is None:
            problems.append("GPU memory: train.placement=colocated checks that engine and learner fit on one GPU, "
                            "and this machine has no GPU to read its size from: set train.gpu_memory_gib")
        else:
            problem = colocated_memory_problem(cfg, shape, gpu_bytes)
            if problem:
                problems.append(problem)
    wanted = ds_accelerator(cfg)
    if os.environ.get("DS_ACCELERATOR") and os.environ["DS_ACCELERATOR"] != wanted:
        problems.append(f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} in the environment contradicts the config "
                        f"(train.placement={cfg.train.placement} with train.num_gpus={cfg.train.num_gpus} puts the "
                        f"learner on {wanted}): unset it, the launcher sets it from the config")
    if problems:
        raise ConfigError("this run cannot start here:\n  " + "\n  ".join(problems))


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
