"""The typed control plane between learner rank 0 and the inference engines for the transports in
which the learner drives the engines itself (vLLM's native "nccl" and "ipc").

    PYTHONPATH=$PWD python -m pytest -q tests/test_weight_sync.py -k control

- `EngineWeightControl`: what an engine actor offers a trainer-side transfer engine: vLLM's
  `VLLMWeightSyncClient` protocol (vllm/distributed/weight_transfer/base.py l.618-642 in vLLM
  0.33.0) plus an abort. Implemented by the rollout worker (rollout_workers.worker.RolloutWorker),
  which holds its engine lock from start to finish of an update and shuts an old trainer
  connection down before a re-init (a restart re-inits the survivors).
- `ControlCall`: one call of that protocol as a value (`InitTransfer`, `StartUpdate`, ...); its
  `apply` calls the protocol method directly, so no method is ever named by a string.
- `WeightControlTarget`: the one remote method an engine actor exposes, `weight_control(call)`,
  which applies the call to itself (launch.actors.SyncedRolloutWorker).
- `ActorSyncClient`: vLLM's `VLLMWeightSyncClient` over such actors, with a timeout on every call
  that names the engine that did not answer or died (vLLM's trainer engines call it).

Nothing here imports vllm, so it is tested on CPU with actors that record the calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray.exceptions import GetTimeoutError, RayError

from weight_sync.base import SyncEndpoint, SyncError


class EngineWeightControl(Protocol):
    """An engine actor's side of vLLM's weight-transfer handshake (plain dicts, as vLLM's own
    client protocol takes them). Prefixed so they never clash with a worker's own methods."""

    def vllm_init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Join the trainer's transfer group (dropping any previous connection first)."""
        ...

    def vllm_start_weight_update(self) -> None: ...

    def vllm_update_weights(self, update_info: dict[str, Any]) -> None: ...

    def vllm_finish_weight_update(self, version: str) -> int:
        """Finish the update, stamp `version`; the version now served."""
        ...

    def vllm_abort_weight_update(self, reason: str) -> None:
        """The sender gave up mid-update: the engine must not sample until a complete update lands."""
        ...


class ControlCall(Protocol):
    """One `EngineWeightControl` call as a value that travels to the engine's actor."""

    def apply(self, control: EngineWeightControl) -> None: ...


@dataclass(frozen=True)
class InitTransfer:
    init_info: dict[str, Any] = field(hash=False)

    def apply(self, control: EngineWeightControl) -> None:
        control.vllm_init_weight_transfer_engine(self.init_info)


@dataclass(frozen=True)
class StartUpdate:
    def apply(self, control: EngineWeightControl) -> None:
        control.vllm_start_weight_update()


@dataclass(frozen=True)
class UpdateWeights:
    update_info: dict[str, Any] = field(hash=False)

    def apply(self, control: EngineWeightControl) -> None:
        control.vllm_update_weights(self.update_info)


@dataclass(frozen=True)
class FinishUpdate:
    version: str

    def apply(self, control: EngineWeightControl) -> None:
        control.vllm_finish_weight_update(self.version)


@dataclass(frozen=True)
class AbortUpdate:
    reason: str

    def apply(self, control: EngineWeightControl) -> None:
        control.vllm_abort_weight_update(self.reason)


class WeightControlTarget(Protocol):
    """The engine actor's method (called as `handle.weight_control.remote(call)`)."""

    def weight_control(self, call: ControlCall) -> None: ...


class ActorSyncClient:
    """`VLLMWeightSyncClient` over engine actors (`endpoint.engine_handles`, each a
    `WeightControlTarget`). `version` and `phase` are set by the sender before each step so a
    failure names them."""

    def __init__(self, endpoint: SyncEndpoint) -> None:
        self.endpoint = endpoint
        self.version: int = -1
        self.phase = "rendezvous"

    def _all(self, calls: list[ControlCall]) -> None:
        """Send `calls[i]` to engine i, wait for all (bounded by sync.timeout_s), name the failures."""
        ep = self.endpoint
        refs = [h.weight_control.remote(call) for h, call in zip(ep.engine_handles, calls)]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ep.timeout_s)
        late = [ep.receiver_names[i] for i, r in enumerate(refs) if r not in ready]
        if late:
            raise SyncError(self.version, self.phase, late, f"no answer within {ep.timeout_s} s")
        for i, r in enumerate(refs):
            try:
                ray.get(r, timeout=ep.timeout_s)
            except Exception as e:  # noqa: BLE001 - RayActorError or the engine's own error
                raise SyncError(self.version, self.phase, [ep.receiver_names[i]], repr(e)) from e

    def _each(self, call: ControlCall) -> None:
        self._all([call] * len(self.endpoint.engine_handles))

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Every engine joins the new group (after a worker restart the survivors too: each drops
        its previous connection first, EngineWeightControl). vLLM's payload puts every worker at
        `rank_offset=1` (nccl_common.py l.130-147: `build_worker_init_payload`); with several
        independent engines that would make them all rank 1, so engine i gets its own offset 1 + i
        (one worker per engine: launch.config refuses tensor parallelism)."""
        calls: list[ControlCall] = []
        for i in range(len(self.endpoint.engine_handles)):
            info = dict(init_info)
            if "rank_offset" in info:
                info["rank_offset"] = 1 + i
            calls.append(InitTransfer(info))
        self._all(calls)

    def start_weight_update(self) -> None:
        self._each(StartUpdate())

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._each(UpdateWeights(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        # vLLM's trainer engines call this without a version; ours stamps the round's version.
        self._each(FinishUpdate(str(self.version) if weight_version is None else weight_version))

    def abort_weight_update(self, reason: str) -> list[str]:
        """Best effort after a failed round: tell every engine still answering to release its
        update (it then refuses to sample until a complete update lands). Never raises; returns
        the engines that could not be told (dead or frozen)."""
        ep = self.endpoint
        refs = [h.weight_control.remote(AbortUpdate(reason)) for h in ep.engine_handles]
        missed = []
        for name, ref in zip(ep.receiver_names, refs):
            try:
                ray.get(ref, timeout=ep.timeout_s)
            except (RayError, GetTimeoutError):
                missed.append(name)
        return missed
