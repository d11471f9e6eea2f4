"""GPU transports through vLLM's own weight-transfer API (vLLM 0.33.x only): "nccl" (a NCCL group
between learner rank 0 and every vLLM worker) and "ipc" (CUDA IPC handles, learner and engine
sharing a GPU). Imported lazily by `weight_sync.sync.WeightSender` for those transports only;
it needs vllm and CUDA, so it cannot run on the CPU test machines. What it adds to vLLM is a
`WeightSource` for DeepSpeed (the same bucket-by-bucket ZeRO-3 gather and cast that the gloo
transport uses and tests: `weight_sync.buckets.iter_cast_tensors`) and a control-plane client
with timeouts that names the engine at fault.

    # on a GPU cluster with vllm==0.33.* (the CPU tests cover the shared WeightSource logic):
    PYTHONPATH=$PWD python -m pytest -q tests/test_weight_sync.py

The vLLM 0.33.0 API this is written against (paths under vllm/):
- distributed/weight_transfer/base.py:
  `ParamMeta(name, dtype, shape, owners=None)` (l.133), `WeightSource` (l.215) with `metadata` as a
  `functools.cached_property` (checked in `__init_subclass__`, l.236) and `iter_full()` (l.266),
  `TrainerInitInfo(rank=...)` with `is_sender = rank == 0` (l.372-403),
  `WeightTransferInitRequest` / `WeightTransferUpdateRequest` (l.415, l.422),
  `VLLMWeightSyncClient` protocol: init_weight_transfer_engine / start_weight_update /
  update_weights / finish_weight_update(weight_version) (l.618-642).
- distributed/weight_transfer/nccl_engine.py: `NCCLTrainerInitInfo(master_address, master_port,
  world_size, packed=True, packed_buffer_size_bytes, packed_num_buffers, *, rank)` (l.53-81),
  `NCCLTrainerWeightTransferEngine.trainer_init(init_info, client=, source=)` (l.301-345; rank 0
  runs `client.init_weight_transfer_engine(payload)` concurrently with opening its endpoint),
  `send_weights()` (l.347-394; every trainer rank calls it, non-senders only drive `iter_full()`
  so the gathers line up; the sender runs `client.update_weights` in a thread next to the packed
  broadcast and then `client.finish_weight_update()`).
- distributed/weight_transfer/nccl_common.py: `build_worker_init_payload` puts every worker at
  `rank_offset=1` (l.130-147); a worker's group rank is rank_offset + dp_index * (TP*PP) + rank
  (`_worker_group_rank`, l.239-244). Several independent engines would therefore all claim rank 1,
  so `ActorSyncClient` rewrites `rank_offset` per engine (1 + i * workers_per_engine).
- distributed/weight_transfer/ipc_engine.py: `IPCTrainerInitInfo(packed, packed_buffer_size_bytes,
  *, rank)` (l.48-59), `IPCTrainerWeightTransferEngine.trainer_init` / `send_weights` (l.284, l.318):
  every trainer rank must own every parameter (true here: each bucket is gathered on all ranks)
  and the IPC handles are all-gathered over the default process group (DeepSpeed's).
- entrypoints/rl/offline.py: `LLM.init_weight_transfer_engine(request)`, `start_weight_update()`,
  `update_weights(request)`, `finish_weight_update(weight_version)` (l.12-62). An engine actor
  exposes them to `ActorSyncClient` as `vllm_init_weight_transfer_engine(init_info: dict)`,
  `vllm_start_weight_update()`, `vllm_update_weights(update_info: dict)` and
  `vllm_finish_weight_update(version: str)` (plain dicts, as vLLM's own VLLMWeightSyncClient
  protocol takes; launch.actors.SyncedRolloutWorker forwards them to its engine). The engine is
  created with `LLM(..., weight_transfer_config=WeightTransferConfig(backend="nccl"|"ipc"))`.
Known limit: the NCCL broadcast itself has no timeout (PyNccl); a peer dying mid-broadcast is
caught by the driver's `ray.get(..., timeout=sync.timeout_s)`, and the learner must be restarted.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import ray
import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    WeightSource,
)
from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

from weight_sync.buckets import SendPlan, iter_cast_tensors
from weight_sync.endpoint import SyncEndpoint, SyncError

SUPPORTED_VLLM = ("0.33.",)


def check_vllm_version() -> None:
    """The weight-transfer API changes between vLLM minors: fail at start-up, not mid-run."""
    import vllm

    if not str(vllm.__version__).startswith(SUPPORTED_VLLM):
        raise ImportError(f"weight_sync nccl/ipc transports support vLLM {SUPPORTED_VLLM}, found {vllm.__version__}")


class DeepSpeedWeightSource(WeightSource):
    """vLLM `WeightSource` over a DeepSpeed model: every rank owns every parameter (owners=None),
    `iter_full` gathers one bucket at a time (ZeRO-3) and yields each tensor cast to the wire dtype."""

    def __init__(self, plan: SendPlan, wire_dtype: torch.dtype) -> None:
        self._plan = plan
        self._wire_dtype = wire_dtype

    @functools.cached_property
    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, self._wire_dtype, s) for n, s in zip(self._plan.names, self._plan.shapes)]

    def iter_full(self):
        yield from iter_cast_tensors(self._plan, self._wire_dtype)


class ActorSyncClient:
    """`VLLMWeightSyncClient` over engine actors (each forwarding to its `LLM`), with a timeout on
    every call that names the engine that did not answer or died."""

    def __init__(self, endpoint: SyncEndpoint, workers_per_engine: int) -> None:
        self.endpoint = endpoint
        self.workers_per_engine = workers_per_engine
        self.version: int = -1
        self.phase = "rendezvous"

    def _all(self, call: Callable[[int, Any], Any]) -> None:
        ep = self.endpoint
        refs = [call(i, h) for i, h in enumerate(ep.engine_handles)]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ep.timeout_s)
        late = [ep.receiver_names[i] for i, r in enumerate(refs) if r not in ready]
        if late:
            raise SyncError(self.version, self.phase, late, f"no answer within {ep.timeout_s} s")
        for i, r in enumerate(refs):
            try:
                ray.get(r, timeout=ep.timeout_s)
            except Exception as e:  # noqa: BLE001 - RayActorError or the engine's own error
                raise SyncError(self.version, self.phase, [ep.receiver_names[i]], repr(e)) from e

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        def call(i: int, h: Any) -> Any:
            info = dict(init_info)
            if "rank_offset" in info:  # nccl: one rank range per engine (see module docstring)
                info["rank_offset"] = 1 + i * self.workers_per_engine
            return h.vllm_init_weight_transfer_engine.remote(info)
        self._all(call)

    def start_weight_update(self) -> None:
        self._all(lambda i, h: h.vllm_start_weight_update.remote())

    def update_weights(self, update_info) -> None:
        self._all(lambda i, h: h.vllm_update_weights.remote(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        # vLLM's engines call this without a version; ours stamps the round's version.
        version = str(self.version) if weight_version is None else weight_version
        self._all(lambda i, h: h.vllm_finish_weight_update.remote(version))


class VLLMSenderLink:
    """One learner rank's side of a vLLM trainer engine (rank 0 sends, others join the gathers)."""

    def __init__(self, endpoint: SyncEndpoint, rank: int, workers_per_engine: int) -> None:
        check_vllm_version()
        self.endpoint = endpoint
        self.rank = rank
        self.client = ActorSyncClient(endpoint, workers_per_engine)
        self.engine: NCCLTrainerWeightTransferEngine | IPCTrainerWeightTransferEngine | None = None

    def send(self, version: int, plan: SendPlan) -> int:
        ep = self.endpoint
        source = DeepSpeedWeightSource(plan, ep.wire_dtype)
        self.client.version = version
        if self.engine is None:
            self.client.phase = "rendezvous"
            if ep.transport == "nccl":
                info = NCCLTrainerInitInfo(
                    master_address=ep.host, master_port=ep.port,
                    world_size=1 + len(ep.receiver_names) * self.client.workers_per_engine,
                    packed=True, packed_buffer_size_bytes=ep.bucket_bytes, rank=self.rank)
                self.engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=self.client, source=source)
            else:
                info = IPCTrainerInitInfo(packed=True, packed_buffer_size_bytes=ep.bucket_bytes, rank=self.rank)
                self.engine = IPCTrainerWeightTransferEngine.trainer_init(info, client=self.client, source=source)
        # Same metadata each round -> vLLM ships no names/shapes again (nccl_engine.py l.361).
        self.engine.source = source
        self.client.phase = "buckets"
        self.engine.send_weights()
        if self.rank != 0:
            return 0
        itemsize = torch.empty((), dtype=ep.wire_dtype).element_size()
        return sum(itemsize * torch.Size(s).numel() for s in plan.shapes)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
