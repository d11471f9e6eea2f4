"""Driver-side dispatch of one preemptive batch over the rollout workers, streaming scored groups
back as they arrive, surviving worker deaths without losing or duplicating a prompt.

    PYTHONPATH=$PWD python -m pytest -q tests/test_worker.py
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from rollout_workers.config import ON_WORKER_DEATH
from rollout_workers.engines.base import SamplingParamsSpec
from rollout_workers.types import Prompt, ScoredGroup
from rollout_workers.seeding import derive_seed
from rollout_workers.worker import RefusedPrompt, RolloutRequest


@dataclass
class BatchReport:
    """What one `Dispatcher.run` call did besides yielding groups (filled while it runs)."""

    refused: Counter = field(default_factory=Counter)
    """Reason -> prompts the workers refused before sampling (no group will come for them)."""
    unsampled: list[Prompt] = field(default_factory=list)
    """Prompts left unsampled because every worker died and, with on_worker_death="restart", the
    restart waits for the driver (`Dispatcher.restart_dead`, on the driver's own thread)."""


@dataclass
class _Stream:
    worker: int
    gen: object
    pending: dict[str, Prompt] = field(default_factory=dict)


class Dispatcher:
    """Spreads a batch over `workers` and merges their streams of ScoredGroups.

    on_worker_death: "redispatch" (the dead worker's unfinished prompts go to the live ones),
    "restart" (they go to the live ones too, and the driver later replaces the dead worker with
    `restart_dead`, which calls `worker_factory(index)`) or "raise". `run` never restarts a worker
    itself: a restart loads the learner's weights, which must not race the learner (it may be in
    the middle of a step while a prefetch thread samples), so the driver restarts workers between
    iterations on its own thread. Every wait is bounded by `timeout_s`: a worker that sends nothing
    for that long raises TimeoutError naming it.
    """

    def __init__(self, workers: Sequence, timeout_s: float = 600.0, on_worker_death: str = "redispatch",
                 worker_factory: Callable[[int], object] | None = None) -> None:
        if not workers:
            raise ValueError("Dispatcher needs at least one rollout worker")
        if on_worker_death not in ON_WORKER_DEATH:
            raise ValueError(f"on_worker_death must be one of {list(ON_WORKER_DEATH)}, got {on_worker_death!r}")
        if on_worker_death == "restart" and worker_factory is None:
            raise ValueError("on_worker_death='restart' needs a worker_factory(index) -> ActorHandle")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.workers: list = list(workers)
        self.alive = [True] * len(self.workers)
        self.names = ray.get([w.name.remote() for w in self.workers], timeout=timeout_s)
        self.timeout_s = timeout_s
        self.on_worker_death = on_worker_death
        self.worker_factory = worker_factory
        self.deaths = 0
        """Worker deaths seen so far."""
        self.duplicates_dropped = 0
        """Groups received twice for the same (uid, batch_id) and not yielded again."""
        self.skipped: list[str] = []
        """Uids that a worker refused (a RefusedPrompt) or ended its stream without returning."""
        self._requests = 0
        self._engine_threads = 0
        """Of the current run() call (see `run`)."""

    @property
    def dead(self) -> list[int]:
        """Indices of the workers that died and are not restarted yet."""
        return [i for i, a in enumerate(self.alive) if not a]

    def restart_dead(self) -> list[int]:
        """Replace every dead worker by `worker_factory(index)` (on_worker_death="restart"); returns
        the indices restarted. Call it from the driver's thread, never while the learner is busy."""
        if self.on_worker_death != "restart":
            return []
        restarted = self.dead
        for i in restarted:
            self.workers[i] = self.worker_factory(i)
            self.names[i] = ray.get(self.workers[i].name.remote(), timeout=self.timeout_s)
            self.alive[i] = True
        return restarted

    def run(self, prompts: Sequence[Prompt], batch_id: int, params: SamplingParamsSpec,
            report: BatchReport | None = None, engine_threads: int = 0) -> Iterator[ScoredGroup]:
        """Sample every prompt once; yield each scored group as it arrives (any order). Refused and
        unsampled prompts go to `report` (a fresh one when None: then nothing may be left unsampled).
        `engine_threads`: torch threads each engine samples with (`RolloutRequest.engine_threads`)."""
        uids = [p.uid for p in prompts]
        if len(set(uids)) != len(uids):
            raise ValueError(f"batch {batch_id} has duplicate prompt uids; groups could not be told apart")
        streams: list[_Stream] = []
        self._requests = 0
        self._engine_threads = engine_threads
        own_report = report is None
        report = BatchReport() if report is None else report
        try:
            yield from self._run(list(prompts), batch_id, params, streams, report)
            if own_report and report.unsampled:
                raise RuntimeError(f"batch {batch_id}: every rollout worker died; {len(report.unsampled)} prompts "
                                   "unsampled (pass a BatchReport and call restart_dead to go on)")
        finally:
            # Early exit (error, timeout, consumer stopped): ask the workers to stop sampling;
            # they check the flag between groups (threaded actors, RolloutWorker.generate).
            for s in streams:
                ray.cancel(s.gen)

    def _run(self, prompts: list[Prompt], batch_id: int, params: SamplingParamsSpec,
             streams: list[_Stream], report: BatchReport) -> Iterator[ScoredGroup]:
        if self.on_worker_death == "restart" and not any(self.alive):
            report.unsampled.extend(prompts)  # the driver restarts the workers, then samples these
            return
        self._submit(prompts, batch_id, params, streams)
        yielded: set[tuple[str, int]] = set()
        while streams:
            ready, _ = ray.wait([s.gen for s in streams], num_returns=1, timeout=self.timeout_s)
            if not ready:
                late = ", ".join(f"{self.names[s.worker]} ({len(s.pending)} prompts pending)" for s in streams)
                raise TimeoutError(f"batch {batch_id}: no scored group for {self.timeout_s:.0f} s from {late}; "
                                   "a worker is frozen")
            stream = next(s for s in streams if s.gen is ready[0])
            try:
                group: ScoredGroup | RefusedPrompt = ray.get(next(stream.gen), timeout=self.timeout_s)
            except StopIteration:
                streams.remove(stream)
                self.skipped.extend(stream.pending)
                report.refused.update({"not_returned": len(stream.pending)} if stream.pending else {})
                continue
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                streams.remove(stream)
                self._on_death(stream, e, batch_id, params, streams, report)
                continue
            except GetTimeoutError as e:
                raise TimeoutError(f"batch {batch_id}: worker {self.names[stream.worker]} announced a group "
                                   f"but it did not arrive within {self.timeout_s:.0f} s") from e
            except ray.exceptions.RayTaskError as e:
                raise RuntimeError(f"batch {batch_id}: rollout worker {self.names[stream.worker]} failed: "
                                   f"{e.cause!r}") from e
            if isinstance(group, RefusedPrompt):
                if stream.pending.pop(group.uid, None) is not None:
                    self.skipped.append(group.uid)
                    report.refused[group.reason] += 1
                continue
            key = (group.prompt.uid, batch_id)
            stream.pending.pop(group.prompt.uid, None)
            if group.batch_id != batch_id or key in yielded:
                self.duplicates_dropped += 1
                continue
            yielded.add(key)
            yield group

    def _submit(self, prompts: list[Prompt], batch_id: int, params: SamplingParamsSpec,
                streams: list[_Stream]) -> None:
        """Split `prompts` into one chunk per live worker, most to the least loaded (in-flight prompts)."""
        live = [i for i, a in enumerate(self.alive) if a]
        if not live:
            raise RuntimeError(f"batch {batch_id}: every rollout worker has died; {len(prompts)} prompts unsampled")
        load = {i: sum(len(s.pending) for s in streams if s.worker == i) for i in live}
        total = sum(load.values()) + len(prompts)
        target = -(-total // len(live))  # even share of all in-flight work, rounded up
        start = 0
        for i in sorted(live, key=lambda i: load[i]):
            take = max(0, min(target - load[i], len(prompts) - start))
            if take == 0:
                continue
            chunk = prompts[start:start + take]
            start += take
            # Each request of a batch samples from its own seed: workers must not share random streams.
            req = RolloutRequest(prompts=tuple(chunk), batch_id=batch_id,
                                 params=replace(params, seed=derive_seed(params.seed, "request", self._requests)),
                                 engine_threads=self._engine_threads)
            self._requests += 1
            streams.append(_Stream(i, self.workers[i].generate.remote(req), {p.uid: p for p in chunk}))
        assert start == len(prompts)

    def _on_death(self, stream: _Stream, error: Exception, batch_id: int, params: SamplingParamsSpec,
                  streams: list[_Stream], report: BatchReport) -> None:
        self.deaths += 1
        name = self.names[stream.worker]
        if self.on_worker_death == "raise":
            raise RuntimeError(f"batch {batch_id}: rollout worker {name} died: {error}") from error
        self.alive[stream.worker] = False
        # Every stream of that worker is lost, not only the one that reported it.
        lost = [stream] + [s for s in streams if s.worker == stream.worker]
        for s in lost[1:]:
            streams.remove(s)
        orphans = [p for s in lost for p in s.pending.values()]
        if not orphans:
            return
        if self.on_worker_death == "restart" and not any(self.alive):
            report.unsampled.extend(orphans)  # the driver restarts the workers, then samples these
            return
        self._submit(orphans, batch_id, params, streams)
