"""Driver side of the weight sync: one `sync(version)` call per round moves the learner's new
weights to every rollout worker (weight_sync does the transport; this file only knows which
actors play which part).

Used by `python -m launch.train`; tested by tests/test_integration.py.
"""
from __future__ import annotations

from typing import Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from weight_sync.config import SyncConfig
from weight_sync.endpoint import SyncEndpoint, SyncError, SyncStats, make_endpoint

# Margin on top of sync.timeout_s for the driver's own wait: the senders/receivers time out first
# and raise a SyncError that names the phase; the driver's timeout only catches a frozen actor.
DRIVER_MARGIN_S = 30.0


class SyncGroup:
    """Learner ranks (senders) and rollout workers (receivers) of one run."""

    def __init__(self, cfg: SyncConfig, learner_ranks: Sequence, workers: Sequence, worker_names: Sequence[str],
                 engine_dtype: str, actor_timeout_s: float) -> None:
        """`actor_timeout_s` bounds waiting for actors that may still be starting (loading models)."""
        self.cfg = cfg
        self.actor_timeout_s = actor_timeout_s
        self.learner_ranks = list(learner_ranks)
        self.engine_dtype = engine_dtype
        self.endpoint: SyncEndpoint | None = None
        self.set_workers(workers, worker_names)

    def set_workers(self, workers: Sequence, worker_names: Sequence[str]) -> None:
        """(Re)build the side group for this set of workers, e.g. after a worker was restarted.
        The rendezvous is learner rank 0's node address and a port free there (asked of that
        rank): the group's listener runs there, and the driver may be on another node."""
        self.workers, self.worker_names = list(workers), list(worker_names)
        host, port = ray.get(self.learner_ranks[0].rendezvous_address.remote(), timeout=self.actor_timeout_s)
        self.endpoint = make_endpoint(self.cfg, self.worker_names, self.engine_dtype, host, port,
                                      engine_handles=tuple(self.workers))
        refs = [r.init_weight_sender.remote(self.endpoint) for r in self.learner_ranks]
        if self.endpoint.receivers_participate:
            refs += [w.init_weight_receiver.remote(self.endpoint) for w in self.workers]
        ray.get(refs, timeout=self.actor_timeout_s)

    def replace_worker(self, index: int, worker, version: int) -> None:
        """Bring a fresh worker (replacing `workers[index]`) to `version` through the group itself,
        before it samples: a new group with it, then one sync. Every transport works this way
        (the nccl engines take weights only from the learner's broadcast, never from the driver)."""
        workers = list(self.workers)
        workers[index] = worker
        self.set_workers(workers, self.worker_names)
        self.sync(version)

    def sync(self, version: int) -> SyncStats:
        """Every engine serves `version` afterwards, or this raises SyncError naming the engines
        and the phase (never hangs: bounded by sync.timeout_s plus a margin). A dead engine is
        named alone; the survivors keep their last complete version."""
        send = [r.sync_weights.remote(version) for r in self.learner_ranks]
        recv = [w.receive_weights.remote(version) for w in self.workers] if self.endpoint.receivers_participate else []
        _, pending = ray.wait(send + recv, num_returns=len(send) + len(recv),
                              timeout=self.cfg.timeout_s + DRIVER_MARGIN_S)
        dead = [name for name, ref in zip(self.worker_names, recv) if ref not in pending and _died(ref)]
        if dead:
            raise SyncError(version, "engine died", dead, "rollout worker actor is dead")
        if pending:
            late = [name for name, ref in zip(self.worker_names, recv) if ref in pending] or ["learner"]
            raise SyncError(version, "driver wait", late, f"no answer within {self.cfg.timeout_s + DRIVER_MARGIN_S:.0f} s")
        try:
            results = ray.get(send + recv, timeout=DRIVER_MARGIN_S)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, SyncError):  # raised by a sender or receiver: it names the phase
                raise e.cause from None
            raise
        except RayActorError as e:
            raise SyncError(version, "learner died", ["learner"], str(e)) from e
        versions = results[len(send):]
        wrong = [n for n, v in zip(self.worker_names, versions) if v != version]
        if wrong:
            raise SyncError(version, "version check", wrong, f"engines report versions {versions}")
        return results[0]

    def close(self) -> None:
        refs = [r.close_weight_sender.remote() for r in self.learner_ranks]
        try:
            ray.get(refs, timeout=30)
        except (RayActorError, GetTimeoutError):
            pass  # shutting down: the actors are about to be killed anyway


def _died(ref) -> bool:
    """True when the actor behind a finished ref is dead (not merely raised an error)."""
    try:
        ray.get(ref, timeout=0)
        return False
    except RayActorError:
        return True
    except Exception:
        return False
