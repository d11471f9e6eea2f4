"""The actor classes the driver creates: the components' own actors plus the weight-sync ends.

`learner` and `rollout_workers` do not import `weight_sync` (imports flow from launch down), so the
sender is attached to the learner rank and the receiver to the rollout worker here, by subclassing.
Both sides are reached through their public methods only: `LearnerRank.named_parameters()` on the
learner, `RolloutWorker.engine_dtype()` / `update_weights()` / the vllm_* handshake on the engine.

Used by `python -m launch.train`; tested by
    PYTHONPATH=$PWD python -m pytest -q -p no:cacheprovider tests/test_integration.py -k "sync_makes and 0-1"
"""
from __future__ import annotations

from learner.actor import LearnerRank
from rollout_workers.worker import RolloutWorker
from weight_sync.endpoint import SyncEndpoint, SyncStats
from weight_sync.engine_control import ControlCall
from weight_sync.sync import WeightReceiver, WeightSender


class SyncedLearnerRank(LearnerRank):
    """A learner rank that also sends its weights (rank 0 transmits, all ranks join ZeRO-3 gathers)."""

    _sender: WeightSender | None = None

    def init_weight_sender(self, endpoint: SyncEndpoint) -> None:
        self.close_weight_sender()
        self._sender = WeightSender(endpoint, self.rank)

    def sync_weights(self, version: int) -> SyncStats:
        return self._sender.sync(version, self.named_parameters())

    def close_weight_sender(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None


class SyncedRolloutWorker(RolloutWorker):
    """A rollout worker whose engine receives new weights all-or-nothing."""

    _receiver: WeightReceiver | None = None

    def init_weight_receiver(self, endpoint: SyncEndpoint) -> None:
        if self._receiver is not None:  # a new group (a worker was restarted): drop the old one
            self._receiver.close()
        self._receiver = WeightReceiver(endpoint, self.name(), out_dtype=self.engine_dtype())

    def receive_weights(self, version: int) -> int:
        """Receive every bucket of `version`, then load them in one go; returns the version now served.
        On any failure the engine keeps its previous weights and version."""
        # The receive casts and copies tensors: on the worker's torch thread, like the engine's work
        # (rollout_workers/worker.py's docstring says why).
        received = self._on_torch_thread(self._receiver.receive, version)
        return self.update_weights(received.named_tensors, received.version)

    def weight_control(self, call: ControlCall) -> None:
        """One call of vLLM's weight-transfer handshake (sync.transport nccl/ipc), driven by learner
        rank 0 through weight_sync.engine_control.ActorSyncClient and applied to this worker, which
        implements `EngineWeightControl` (its vllm_* methods hold the engine lock from start to
        finish of an update). Typed: no method is named by a string."""
        call.apply(self)
