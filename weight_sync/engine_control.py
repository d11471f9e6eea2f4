"""The typed control plane between learner rank 0 and the inference engines for the transports in
which the learner drives the engines itself (vLLM's native "nccl" and "ipc").

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_weight_sync.py -k control

- `EngineWeightControl`: what an engine offers a trainer-side transfer engine: vLLM's
  `VLLMWeightSyncClient` protocol (vllm/distributed/weight_transfer/base.py l.618-642 in vLLM
  0.33.0) plus `shutdown_weight_transfer_engine` (vllm/entrypoints/rl/offline.py l.29). Implemented
  engine-side (rollout_workers.engines.vllm_engine.VLLMEngine.sync_client()).
- `ControlCall`: one call of that protocol as a value (`InitTransfer`, `StartUpdate`, ...); its
  `apply` calls the protocol method directly, so no method is ever named by a string.
- `WeightControlTarget`: the one remote method an engine actor exposes, `weight_control(call)`;
  launch.actors.SyncedRolloutWorker applies the call to its engine.
- `ActorSyncClient`: vLLM's `VLLMWeightSyncClient` over such actors, with a timeout on every call
  that names the engine that did not answer or died (vLLM's trainer engines call it).

Nothing here imports vllm, so it is tested on CPU with actors that record the calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import ray

from weight_sync.endpoint import SyncEndpoint, SyncError


class EngineWeightControl(Protocol):
    """An inference engine's side of vLLM's weight-transfer handshake (plain dicts, as vLLM's own
    client protocol takes them)."""

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: dict[str, Any]) -> None: ...

    def finish_weight_update(self, weight_version: str) -> None: ...

    def shutdown_weight_transfer_engine(self) -> None:
        """Drop the engine's trainer connection (NCCL communicator); a no-op when it has none."""
        ...


class ControlCall(Protocol):
    """One `EngineWeightControl` call as a value that travels to the engine's actor."""

    def apply(self, control: EngineWeightControl) -> None: ...


@dataclass(frozen=True)
class InitTransfer:
    init_info: dict[str, Any] = field(hash=False)

    def apply(self, control: EngineWeightControl) -> None:
        control.init_weight_transfer_engine(self.init_info)


@dataclass(frozen=True)
class StartUpdate:
    def apply(self, control: EngineWeightControl) -> None:
        control.start_weight_update()


@dataclass(frozen=True)
class UpdateWeights:
    update_info: dict[str, Any] = field(hash=False)

    def apply(self, control: EngineWeightControl) -> None:
        control.update_weights(self.update_info)


@dataclass(frozen=True)
class FinishUpdate:
    weight_version: str

    def apply(self, control: EngineWeightControl) -> None:
        control.finish_weight_update(self.weight_version)


@dataclass(frozen=True)
class ShutdownTransfer:
    def apply(self, control: EngineWeightControl) -> None:
        control.shutdown_weight_transfer_engine()


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
        """Every engine first drops any trainer connection it still holds (after a worker restart
        the survivors hold the previous group's communicator, which a second init would leak),
        then joins the new group. vLLM's payload puts every worker at `rank_offset=1`
        (nccl_common.py l.130-147: `build_worker_init_payload`); with several independent engines
        that would make them all rank 1, so engine i gets its own offset 1 + i (one worker per
        engine: launch.config refuses tensor parallelism with these transports)."""
        self._each(ShutdownTransfer())
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
