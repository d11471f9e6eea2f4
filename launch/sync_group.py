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
                 engine_dtype: str) -> None:
        self.cfg = cfg
        self.learner_ranks = list(learner_ranks)
        self.engine_dtype = engine_dtype
        self.endpoint: SyncEndpoint | None = None
        self.set_workers(workers, worker_names)

    def set_workers(self, workers: Sequence, worker_names: Sequence[str]) -> None:
        """(Re)build the side group for this set of workers, e.g. after a worker was restarted."""
        self.workers, self.worker_names = list(workers), list(worker_names)
        handles = tuple(self.workers) if self.cfg.transport in ("nccl", "ipc") else ()
        self.endpoint = make_endpoint(self.cfg, self.worker_names, dtype=self.engine_dtype, engine_handles=handles)
        refs = [r.init_weight_sender.remote(self.endpoint) for r in self.learner_ranks]
        if self.endpoint.receivers_participate:
            refs += [w.init_weight_receiver.remote(self.endpoint) for w in self.workers]
        ray.get(refs, timeout=self.cfg.timeout_s)

    def sync(self, version: int) -> SyncStats:
        """Every engine serves `version` afterwards, or this raises SyncError naming the engines
        and the phase (never hangs: bounded by sync.timeout_s plus a margin)."""
        send = [r.sync_weights.remote(version) for r in self.learner_ranks]
        recv = [w.receive_weights.remote(version) for w in self.workers] if self.endpoint.receivers_participate else []
        ready, pending = ray.wait(send + recv, num_returns=len(send) + len(recv),
                                  timeout=self.cfg.timeout_s + DRIVER_MARGIN_S)
        late = [self.worker_names[i] for i, ref in enumerate(recv) if ref in pending]
        if pending and not late:
            late = ["learner"]
        try:
            # A SyncError raised by a sender or receiver names the phase; surface it first.
            results = ray.get(ready, timeout=DRIVER_MARGIN_S)
        except RayActorError as e:
            dead = [self.worker_names[i] for i, ref in enumerate(recv) if ref in ready and _failed(ref)]
            raise SyncError(version, "actor died", dead or ["learner"], str(e)) from e
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, SyncError):
                raise e.cause from None
            raise
        if pending:
            raise SyncError(version, "driver wait", late, f"no answer within {self.cfg.timeout_s + DRIVER_MARGIN_S:.0f} s")
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


def _failed(ref) -> bool:
    try:
        ray.get(ref, timeout=0)
        return False
    except Exception:
        return True
