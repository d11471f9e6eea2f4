"""The rollout worker: a Ray actor that owns one inference engine and a reward pool, takes a large
preemptive batch (DASH, arXiv 2505.17218 Sec. 4: every prompt of an optimizer step in one engine
call) and streams back scored groups as the engine completes them.

Scoring is off the engine's critical path: the engine runs on its own thread (`GroupFeed`) and
keeps sampling the rest of the batch while the actor's thread scores the groups it has finished
(the reward pool works in separate processes) and streams them out, in engine order.

All of the worker's tensor work (sampling, loading and reading weights, receiving a weight sync)
runs on one long-lived thread, the worker's torch thread. Why: libgomp gives every thread that
starts a parallel region its own team of helper threads, kept while that thread lives, and once
a process holds more helpers than cores it stops spin-waiting between regions. A weight copy on
one of Ray's long-lived method threads was enough: every later decode step's hundreds of small
regions then paid a sleep and wake-up, and sampling the reasoning bench's batch took 35% longer
(1.3 of 2 cores busy; README, "Sampling speed (third round)").

Advantages are left None: the learner computes them in one place.

The engine is private to the worker: callers (the driver, launch's weight-sync subclass) use the
worker's public methods (`update_weights`, `named_weights`, `engine_dtype`, `sleep`, the vllm_*
handshake). Optional engine capabilities are checked with isinstance against the protocols of
`rollout_workers.engines.base`; a missing one raises `MissingCapability` naming the engine.

    PYTHONPATH=$PWD python -m pytest -q tests/test_worker.py
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import Any, Callable, Generator, Generic, Iterator, NamedTuple, Sequence, TypeVar

import ray
import torch

from rollout_workers.config import RolloutConfig
from rollout_workers.engines.base import (TORCH_DTYPES, EngineOptions, MissingCapability, NativeWeightTransfer,
                                          SamplingParamsSpec, Sleepable, make_engine, prompt_token_ids)
from rollout_workers.engines.registry import engine_names, get_engine
from rollout_workers.types import OVER_MAX_PROMPT_TOKENS, Prompt, ScoredGroup


@dataclass(frozen=True)
class RolloutRequest:
    """One sampling request to one worker: a preemptive batch of prompts."""

    prompts: tuple[Prompt, ...]
    """Prompts to sample, all submitted to the engine at once."""
    batch_id: int
    """Iteration id echoed into every ScoredGroup (the driver dedupes on (uid, batch_id))."""
    params: SamplingParamsSpec
    """Sampling parameters; `params.n` is the group size G."""
    engine_threads: int = 0
    """Intra-op torch threads the engine samples this request with (0 = the actor's reservation,
    rollout.cpus_per_worker). The driver raises it while the learner idles (evaluation,
    train.thread_handover).
    In-process torch engines only: vLLM's CPU build binds its threads when it starts."""


class RefusedPrompt(NamedTuple):
    """A prompt of a request that the worker refused before sampling; sent on the same stream as
    the ScoredGroups, so the driver can tell the learner that this group will never come."""

    uid: str
    """The refused prompt's uid."""
    reason: str
    """"empty", OVER_MAX_PROMPT_TOKENS (rollout.max_prompt_tokens) or "over_context" (no room for
    max_new_tokens in the engine's context)."""


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
    """(prompts the engine had completed, prompts in the batch) when the last batch's first group
    left the engine for scoring; first < second means groups leave before the batch ends."""


_ACTOR_THREADS = 4
"""Threads per worker actor: a streaming batch, a re-dispatched batch queued behind it, a weight
update queued behind them, and one left for stats()/version(). (A batch's engine thread is extra.)"""
ENGINE_STOP_TIMEOUT_S = 600.0
"""How long closing a batch waits for its engine thread to finish the chunk it is sampling."""
_POLL_S = 0.5
"""How often a scorer waiting for the engine's next group checks whether the batch was cancelled."""

T = TypeVar("T")


class _Failed(NamedTuple):
    error: BaseException


_END = object()


def torch_thread(name: str) -> ThreadPoolExecutor:
    """The one long-lived thread a worker runs its tensor work on (see the module docstring),
    named `<name>-torch_0`."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-torch")


class GroupFeed(Generic[T]):
    """Runs a generator (the engine's `generate`) on `executor`'s thread, so that it keeps producing
    while the consumer works on what it already produced; iterating the feed yields the items in
    production order and re-raises the generator's exception. `on_item(k)` runs on the producer
    thread as item k leaves the generator. Use as a context manager: leaving it (batch done,
    cancelled, or failed) stops the producer after its current item, closes the generator on its
    own thread, and waits for it (ENGINE_STOP_TIMEOUT_S) so the engine is free again."""

    def __init__(self, source: Generator[T, None, None], executor: ThreadPoolExecutor,
                 on_item: Callable[[int], None] | None = None, cancelled: Callable[[], bool] = lambda: False,
                 name: str = "engine") -> None:
        self._source = source
        self._executor = executor
        self._on_item = on_item
        self._cancelled = cancelled
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._pumping: Future | None = None

    def __enter__(self) -> "GroupFeed[T]":
        self._pumping = self._executor.submit(self._pump)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        try:
            self._pumping.result(timeout=ENGINE_STOP_TIMEOUT_S)
        except FutureTimeout:
            raise RuntimeError(f"{self._name}: the engine did not stop within {ENGINE_STOP_TIMEOUT_S:.0f} s") from None

    def _pump(self) -> None:
        try:
            for k, item in enumerate(self._source):
                if self._on_item is not None:
                    self._on_item(k)
                self._queue.put(item)
                if self._stop.is_set():
                    break
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._queue.put(_Failed(e))
        finally:
            try:
                self._source.close()  # a generator is closed on the thread that runs it
            finally:
                self._queue.put(_END)

    def __iter__(self) -> Iterator[T]:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._cancelled():
                    return
                continue
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item


def with_torch_threads(threads: int, source: Generator[T, None, None]) -> Generator[T, None, None]:
    """`source`, run with `threads` intra-op torch threads (torch's count is process-wide: set when
    the engine starts the request, on the thread that runs it)."""
    torch.set_num_threads(threads)
    yield from source


def actor_device() -> str:
    """The torch device of this process's engine: "cuda" when Ray gave the actor a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"


class RolloutWorker:
    """Ray actor (create it with `make_rollout_workers`): one engine, one reward pool.
    `vllm_module` and `weight_transfer_backend` reach a vLLM engine (`EngineOptions`)."""

    def __init__(self, cfg: RolloutConfig, model_path: str, name: str, vllm_module: str = "vllm",
                 weight_transfer_backend: str = "reload") -> None:
        from rollout_workers.reward_pool import RewardPool

        self._own_threads = max(1, int(cfg.cpus_per_worker))
        """Torch threads of the actor's CPU reservation (a request may name another count)."""
        torch.set_num_threads(self._own_threads)
        self._cfg = cfg
        self._name = name
        self._torch_thread = torch_thread(name)
        self._engine = make_engine(cfg, model_path, EngineOptions(
            device=actor_device(), weight_transfer_backend=weight_transfer_backend, vllm_module=vllm_module))
        self._rewards = RewardPool(cfg.reward_fn, processes=cfg.reward_processes, timeout_s=cfg.reward_timeout_s,
                                   format_reward=cfg.format_reward, answer_format=cfg.answer_format)
        # Threaded actor (make_rollout_workers): stats()/version() answer while a batch streams;
        # the engine serves one generate() or weight update at a time, in arrival order. A native
        # vLLM update spans several calls (vllm_start_weight_update .. vllm_finish_weight_update) and
        # holds the lock across all of them: a threading.Lock may be released by another thread.
        self._engine_lock = threading.Lock()
        self._native_update_open = False
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

    # ------------------------------------------------------------------ weights, engine side
    # The one interface launch's weight sync uses (launch.actors.SyncedRolloutWorker): the dtype
    # received tensors are cast to, loading a complete set, reading the weights back.
    def engine_dtype(self) -> torch.dtype:
        """The dtype the engine computes in (rollout.dtype): a sync casts the learner's weights to it."""
        return TORCH_DTYPES[self._cfg.dtype]

    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> int:
        """Load new weights (gloo / ray sync, a restarted worker's preload) and return the version now
        in use."""
        self._acquire_engine("update_weights")
        try:
            self._on_torch_thread(self._engine.update_weights, named_tensors, version)
            return self._engine.version
        finally:
            self._engine_lock.release()

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """CPU copies of the engine's current weights by checkpoint name (equality checks after a sync)."""
        return self._on_torch_thread(lambda: [(n, t.detach().cpu().clone()) for n, t in self._engine.named_weights()])

    def _on_torch_thread(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on the worker's torch thread (module docstring); raises TimeoutError after
        rollout.engine_lock_timeout_s (the thread is busy with something that never ends) instead of
        waiting forever. Not a remote method: for this class and its subclasses."""
        timeout_s = self._cfg.engine_lock_timeout_s
        try:
            return self._torch_thread.submit(fn, *args).result(timeout=timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"{self._name}: {getattr(fn, '__qualname__', fn)} did not finish within "
                               f"{timeout_s:.0f} s on the worker's torch thread") from None

    def _acquire_engine(self, what: str) -> None:
        if not self._engine_lock.acquire(timeout=self._cfg.engine_lock_timeout_s):
            raise TimeoutError(f"{self._name}: {what} waited rollout.engine_lock_timeout_s="
                               f"{self._cfg.engine_lock_timeout_s} s for the engine (a batch still sampling?)")

    def _sleepable(self, what: str) -> Sleepable:
        """The engine as `Sleepable`, or MissingCapability naming the engine (checked before the lock)."""
        if not isinstance(self._engine, Sleepable):
            raise MissingCapability(self._missing(what, "sleep mode (base.Sleepable)",
                                                  engine_names(lambda spec: spec.sleep_mode)))
        return self._engine

    def _native_transfer(self, what: str) -> NativeWeightTransfer:
        """The engine as `NativeWeightTransfer`, or MissingCapability naming the engine."""
        if not isinstance(self._engine, NativeWeightTransfer):
            raise MissingCapability(self._missing(what, "native weight transfer (base.NativeWeightTransfer)",
                                                  engine_names(lambda spec: spec.native_weight_transfer)))
        return self._engine

    def _missing(self, what: str, capability: str, able: tuple[str, ...]) -> str:
        return (f"{self._name}: {what} needs an engine with {capability}; rollout.engine={self._cfg.engine} "
                f"({type(self._engine).__name__}) does not have it (rollout.engine with it: {list(able)})")

    # vLLM's native weight transfer (sync.transport nccl / ipc), driven by the learner's trainer-side
    # engine through these four calls (vLLM's VLLMWeightSyncClient protocol, plain dicts). The engine
    # lock is held from start to finish, so no generate() steps on layers vLLM moved to meta.
    def vllm_init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Open the trainer connection; a re-open (after another worker restarted) shuts the old one first."""
        engine = self._native_transfer("vllm_init_weight_transfer_engine")
        self._acquire_engine("vllm_init_weight_transfer_engine")
        try:
            engine.init_transfer(init_info)
        finally:
            self._engine_lock.release()

    def vllm_start_weight_update(self) -> None:
        """Take the engine lock (until finish/abort) and begin an update."""
        engine = self._native_transfer("vllm_start_weight_update")
        self._acquire_engine("vllm_start_weight_update")
        self._native_update_open = True
        try:
            engine.start_update()
        except BaseException:
            self._end_native_update()
            raise

    def vllm_update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        engine = self._native_transfer("vllm_update_weights")
        self._check_native_update_open("vllm_update_weights")
        try:
            engine.update_chunk(update_info)
        except BaseException:
            self._end_native_update()
            raise

    def vllm_finish_weight_update(self, version: str) -> int:
        """Finish the update (prefix cache reset, version stamped), release the lock; returns the version."""
        engine = self._native_transfer("vllm_finish_weight_update")
        self._check_native_update_open("vllm_finish_weight_update")
        try:
            engine.finish_update(int(version))
            return self._engine.version
        finally:
            self._end_native_update()

    def vllm_abort_weight_update(self, reason: str) -> None:
        """The sender gave up mid-update: release the lock; the engine refuses to sample until a
        complete update lands (EngineWeightsLost). An update is only open on an engine that has
        the capability (start checked it)."""
        if self._native_update_open:
            self._native_transfer("vllm_abort_weight_update").abort_update(reason)
            self._end_native_update()

    def _check_native_update_open(self, what: str) -> None:
        if not self._native_update_open:
            raise RuntimeError(f"{self._name}: {what} without vllm_start_weight_update (or after an abort)")

    def _end_native_update(self) -> None:
        self._native_update_open = False
        self._engine_lock.release()

    def sleep(self) -> None:
        """Sleep mode (`Sleepable`, vLLM's): free the engine's memory (weights offloaded, KV cache
        dropped) while a colocated learner trains; `wake_up` before the next sync or batch."""
        engine = self._sleepable("sleep")
        self._acquire_engine("sleep")
        try:
            engine.sleep()
        finally:
            self._engine_lock.release()

    def wake_up(self) -> None:
        engine = self._sleepable("wake_up")
        self._acquire_engine("wake_up")
        try:
            engine.wake_up()
        finally:
            self._engine_lock.release()

    @ray.method(num_returns="streaming")
    def generate(self, request: RolloutRequest) -> Iterator[ScoredGroup | RefusedPrompt]:
        """Sample the whole request in one engine call; yield each prompt's scored group as soon as
        the engine completes it. Prompts that cannot be sampled are counted and yielded first as
        RefusedPrompt (with the reason)."""
        self._counts["batches_in_flight"] += 1
        cancelled = ray.get_runtime_context().is_canceled

        def first_progress(k: int) -> None:
            if k == 0:
                self._first_yield_progress = (self._engine.completed_prompts, len(kept))

        try:
            self._acquire_engine("generate")
            try:
                kept, refused = self._admissible(request)
                for r in refused:  # not `yield from`: Ray's streaming generator sends into it
                    yield r
                # The engine samples on the feed's thread while this one scores: leaving the block
                # (done, cancelled by the driver, or failed) stops the engine before the lock is released.
                threads = request.engine_threads or self._own_threads
                with GroupFeed(with_torch_threads(threads, self._engine.generate(kept, request.params)),
                               self._torch_thread, first_progress, cancelled, self._name) as groups:
                    for scored in self._score_stream(groups, request.batch_id, cancelled):
                        yield scored
            finally:
                self._engine_lock.release()
        finally:
            self._counts["batches_in_flight"] -= 1

    def _score_stream(self, groups: Iterator, batch_id: int, cancelled: Callable[[], bool]) -> Iterator[ScoredGroup]:
        """Score each group the engine finished, in engine order, and yield it."""
        for group in groups:
            if cancelled():
                return  # the driver gave up on this batch: the feed stops the engine
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
                              policy_version=group.policy_version, batch_id=batch_id,
                              worker=self._name, score_seconds=score_seconds)

    def _admissible(self, request: RolloutRequest) -> tuple[list[Prompt], list[RefusedPrompt]]:
        """The prompts the engine can take, and the refused ones with their reason (the second line
        behind the driver's load-time `drop_long_prompts`). Lengths come from the ids the prompts
        carry; one that arrives without (built by hand) is tokenized here, once, and the engine
        gets it with its ids."""
        context_limit = self._engine.context - request.params.max_new_tokens
        kept, refused = [], []
        for p in request.prompts:
            if p.text and p.token_ids is None:
                p = replace(p, token_ids=tuple(prompt_token_ids(self._engine.tokenizer, p.text)))
            n = len(p.token_ids) if p.text else 0
            reason = ("empty" if n == 0 else OVER_MAX_PROMPT_TOKENS if n > self._cfg.max_prompt_tokens
                      else "over_context" if n > context_limit else None)
            if reason is None:
                kept.append(p)
            else:
                self._counts["skipped_prompts"] += 1
                refused.append(RefusedPrompt(p.uid, reason))
        return kept, refused

    def close(self) -> None:
        """Stop the reward pool's processes and the torch thread."""
        self._rewards.close()
        self._torch_thread.shutdown(wait=False)


def make_rollout_workers(cfg: RolloutConfig, model_path: str, placement_group=None, vllm_module: str = "vllm",
                         name_prefix: str = "rollout", first_bundle: int = 0,
                         num_gpus_per_worker: float | None = None, worker_cls: type = RolloutWorker,
                         indices: Sequence[int] | None = None, weight_transfer_backend: str = "reload") -> list:
    """Create `cfg.num_workers` RolloutWorker actors (ActorHandles). With a placement group, worker i
    goes to bundle `first_bundle + i`. GPUs per worker: `num_gpus_per_worker`, by default the
    engine's registry entry's (`EngineSpec.gpus_per_worker`: tensor_parallel_size for vLLM, 0 for
    transformers; the fake vLLM runs on CPU: pass 0).
    `worker_cls`: RolloutWorker or a subclass adding methods (launch adds the weight-sync receiver).
    `indices`: which workers to (re)create, default all (a restart passes the dead one's index)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor = ray.remote(worker_cls)
    if num_gpus_per_worker is None:
        num_gpus_per_worker = get_engine(cfg.engine).gpus_per_worker(cfg.tensor_parallel_size)
    handles = []
    for i in (range(cfg.num_workers) if indices is None else indices):
        opts = dict(num_cpus=cfg.cpus_per_worker, num_gpus=num_gpus_per_worker,
                    max_concurrency=_ACTOR_THREADS, max_restarts=0)
        if placement_group is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=placement_group, placement_group_bundle_index=first_bundle + i)
        handles.append(actor.options(**opts).remote(cfg, model_path, f"{name_prefix}-{i}", vllm_module,
                                                    weight_transfer_backend))
    return handles
