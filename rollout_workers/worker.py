"""The rollout worker: a Ray actor that owns one inference engine and a reward pool, takes a large
preemptive batch (DASH, arXiv 2505.17218 Sec. 4: every prompt of an optimizer step in one engine
call) and streams back scored groups as the engine completes them.

Advantages are left None: the learner computes them in one place.

    PYTHONPATH=$PWD python -m pytest -q tests/test_worker.py
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
import time
from typing import Iterator, NamedTuple, Sequence

import ray
import torch

from rollout_workers.config import RolloutConfig
from rollout_workers.engines.base import Engine, SamplingParamsSpec
from rollout_workers.types import Prompt, ScoredGroup


@dataclass(frozen=True)
class RolloutRequest:
    """One sampling request to one worker: a preemptive batch of prompts."""

    prompts: tuple[Prompt, ...]
    """Prompts to sample, all submitted to the engine at once."""
    batch_id: int
    """Iteration id echoed into every ScoredGroup (the driver dedupes on (uid, batch_id))."""
    params: SamplingParamsSpec
    """Sampling parameters; `params.n` is the group size G."""


class WorkerStats(NamedTuple):
    """Counters of one worker since it started."""

    prompts: int
    """Prompts sampled (scored groups yielded)."""
    completions: int
    """Completions sampled."""
    reward_timeouts: int
    """Completions whose scoring timed out (scored 0)."""
    reward_errors: int
    """Completions whose scoring raised (scored 0)."""
    skipped_prompts: int
    """Prompts refused before sampling: empty, or longer than rollout.max_prompt_tokens / the context."""
    batches_in_flight: int
    """Requests whose stream has not ended yet."""
    score_seconds: float
    """Wall seconds spent scoring completions (inside the generate stream)."""
    first_yield_progress: tuple[int, int]
    """(prompts the engine had completed, prompts in the batch) when the last batch's first group was
    yielded; first < second means groups leave before the batch ends."""


_ACTOR_THREADS = 4
"""Threads per worker actor: a streaming batch, a re-dispatched batch queued behind it, a weight
update queued behind them, and one left for stats()/version()."""


def sampling_spec(cfg: RolloutConfig, iteration: int, greedy: bool = False) -> SamplingParamsSpec:
    """Sampling parameters of iteration `iteration` (seeded from rollout.seed; greedy for eval)."""
    return SamplingParamsSpec(n=1 if greedy else cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 1_000_003 * iteration, greedy=greedy)


def make_engine(cfg: RolloutConfig, model_path: str, vllm_module: str = "vllm",
                weight_transfer_backend: str = "ipc") -> Engine:
    """The engine rollout.engine names, configured from the rollout section. `vllm_module` and
    `weight_transfer_backend` ("ipc" for object-store updates, "nccl" when the learner pushes
    through vLLM's NCCL transfer) only matter for vLLM."""
    if cfg.engine == "vllm":
        from rollout_workers.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, dtype=cfg.dtype, seed=cfg.seed, tensor_parallel_size=cfg.tensor_parallel_size,
                          gpu_memory_utilization=cfg.gpu_memory_utilization,
                          enable_prefix_caching=cfg.enable_prefix_caching, enable_sleep_mode=cfg.enable_sleep_mode,
                          weight_transfer_backend=weight_transfer_backend, vllm_module=vllm_module)
    from rollout_workers.engines.hf import HFEngine

    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    return HFEngine(model_path, dtype=cfg.dtype, device=device, gen_batch_tokens=cfg.gen_batch_tokens, seed=cfg.seed)


class RolloutWorker:
    """Ray actor (create it with `make_rollout_workers`): one engine, one reward pool."""

    def __init__(self, cfg: RolloutConfig, model_path: str, name: str, vllm_module: str = "vllm",
                 weight_transfer_backend: str = "ipc") -> None:
        from rollout_workers.rewards import RewardPool

        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        self._cfg = cfg
        self._name = name
        self._engine = make_engine(cfg, model_path, vllm_module, weight_transfer_backend)
        self._rewards = RewardPool(cfg.reward_fn, processes=cfg.reward_processes, timeout_s=cfg.reward_timeout_s,
                                   format_reward=cfg.format_reward, answer_format=cfg.answer_format)
        # Threaded actor (make_rollout_workers): stats()/version() answer while a batch streams;
        # the engine serves one generate() or update_weights() at a time, in arrival order.
        self._engine_lock = threading.Lock()
        self._counts = dict(prompts=0, completions=0, reward_timeouts=0, reward_errors=0, skipped_prompts=0,
                            batches_in_flight=0)
        self._first_yield_progress = (0, 0)
        self._score_seconds = 0.0

    def name(self) -> str:
        return self._name

    def version(self) -> int:
        return self._engine.version

    def stats(self) -> WorkerStats:
        return WorkerStats(**self._counts, score_seconds=self._score_seconds,
                           first_yield_progress=self._first_yield_progress)

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> int:
        """Load new weights (object-store path) and return the version now in use."""
        with self._engine_lock:
            self._engine.update_weights(named_tensors, version)
            return self._engine.version

    @ray.method(num_returns="streaming")
    def generate(self, request: RolloutRequest) -> Iterator[ScoredGroup]:
        """Sample the whole request in one engine call; yield each prompt's scored group as soon as
        the engine completes it. Prompts that cannot be sampled are counted and skipped."""
        self._counts["batches_in_flight"] += 1
        try:
            with self._engine_lock:
                kept = self._admissible(request)
                groups = self._engine.generate(kept, request.params)
                for k, group in enumerate(groups):
                    if ray.get_runtime_context().is_canceled():
                        groups.close()  # the driver gave up on this batch: stop sampling it
                        return
                    if k == 0:
                        self._first_yield_progress = (self._engine.completed_prompts, len(kept))
                    t0 = time.perf_counter()
                    scored = self._rewards.score([c.text for c in group.completions],
                                                 [group.prompt.gold] * len(group.completions))
                    score_seconds = time.perf_counter() - t0
                    self._score_seconds += score_seconds
                    self._counts["prompts"] += 1
                    self._counts["completions"] += len(group.completions)
                    self._counts["reward_timeouts"] += scored.timeouts
                    self._counts["reward_errors"] += scored.errors
                    yield ScoredGroup(prompt=group.prompt, prompt_token_ids=group.prompt_token_ids,
                                      completions=group.completions, rewards=tuple(scored.rewards),
                                      policy_version=group.policy_version, batch_id=request.batch_id,
                                      worker=self._name, score_seconds=score_seconds)
        finally:
            self._counts["batches_in_flight"] -= 1

    def _admissible(self, request: RolloutRequest) -> list[Prompt]:
        limit = min(self._cfg.max_prompt_tokens, self._engine.context - request.params.max_new_tokens)
        kept = []
        for p in request.prompts:
            n = len(self._engine.tokenizer(p.text)["input_ids"]) if p.text else 0
            if 1 <= n <= limit:
                kept.append(p)
            else:
                self._counts["skipped_prompts"] += 1
        return kept

    def close(self) -> None:
        """Stop the reward pool's processes."""
        self._rewards.close()


def make_rollout_workers(cfg: RolloutConfig, model_path: str, placement_group=None, vllm_module: str = "vllm",
                         name_prefix: str = "rollout", first_bundle: int = 0,
                         num_gpus_per_worker: float | None = None, worker_cls: type = RolloutWorker,
                         indices: Sequence[int] | None = None, weight_transfer_backend: str = "ipc") -> list:
    """Create `cfg.num_workers` RolloutWorker actors (ActorHandles). With a placement group, worker i
    goes to bundle `first_bundle + i`. GPUs per worker: `num_gpus_per_worker`, by default
    `tensor_parallel_size` for vLLM and 0 for transformers (the fake vLLM runs on CPU: pass 0).
    `worker_cls`: RolloutWorker or a subclass adding methods (launch adds the weight-sync receiver).
    `indices`: which workers to (re)create, default all (a restart passes the dead one's index)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor = ray.remote(worker_cls)
    handles = []
    for i in (range(cfg.num_workers) if indices is None else indices):
        if num_gpus_per_worker is None:
            num_gpus_per_worker = cfg.tensor_parallel_size if cfg.engine == "vllm" else 0
        opts = dict(num_cpus=cfg.cpus_per_worker, num_gpus=num_gpus_per_worker,
                    max_concurrency=_ACTOR_THREADS, max_restarts=0)
        if placement_group is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=placement_group, placement_group_bundle_index=first_bundle + i)
        handles.append(actor.options(**opts).remote(cfg, model_path, f"{name_prefix}-{i}", vllm_module,
                                                    weight_transfer_backend))
    return handles
