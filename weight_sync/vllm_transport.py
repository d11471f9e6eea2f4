"""GPU transports through vLLM's own weight-transfer API (vLLM 0.33.x only): "nccl" (a NCCL group
between learner rank 0 and every vLLM worker) and "ipc" (CUDA IPC handles, learner and engine
sharing a GPU). Imported lazily by `weight_sync.sync.WeightSender` for those transports only;
it needs vllm and CUDA, so it cannot run on the CPU test machines. What it adds to vLLM is a
`WeightSource` for DeepSpeed (the same bucket-by-bucket ZeRO-3 gather and cast that the gloo
transport uses and tests: `weight_sync.buckets.iter_cast_tensors`) and a control-plane client
(`weight_sync.engine_control.ActorSyncClient`) with timeouts that names the engine at fault.

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
  so `weight_sync.engine_control.ActorSyncClient` rewrites `rank_offset` per engine (1 + i).
- distributed/weight_transfer/ipc_engine.py: `IPCTrainerInitInfo(packed, packed_buffer_size_bytes,
  *, rank)` (l.48-59), `IPCTrainerWeightTransferEngine.trainer_init` / `send_weights` (l.284, l.318):
  every trainer rank must own every parameter (true here: each bucket is gathered on all ranks)
  and the IPC handles are all-gathered over the default process group (DeepSpeed's).
- entrypoints/rl/offline.py: `LLM.init_weight_transfer_engine(request)`, `start_weight_update()`,
  `update_weights(request)`, `finish_weight_update(weight_version)`,
  `shutdown_weight_transfer_engine()` (l.12-62). The engine side is the typed
  `weight_sync.engine_control.EngineWeightControl` protocol (the rollout worker implements it over
  these calls); an engine actor receives each call as a `ControlCall` value through its one
  `weight_control(call)` method (launch.actors.SyncedRolloutWorker).
  The engine is created with `LLM(..., weight_transfer_config=WeightTransferConfig(backend="nccl"|"ipc"))`.
Known limit: the NCCL broadcast itself has no timeout (PyNccl); a peer dying mid-broadcast is
caught by the driver's `ray.get(..., timeout=sync.timeout_s)`, and the learner must be restarted.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import functools

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    WeightSource,
)
from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

from weight_sync.base import SyncEndpoint, SyncError
from weight_sync.buckets import SendPlan, bucket_nbytes, iter_cast_tensors, packed_buffer_bytes, params_off_device
from weight_sync.engine_control import ActorSyncClient

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


class VLLMSenderLink(ABC):
    """One learner rank's side of a vLLM trainer engine (SenderLink; rank 0 sends, others join the
    gathers). `NCCLSenderLink` and `IPCSenderLink` differ only in how the trainer engine is made."""

    def __init__(self, endpoint: SyncEndpoint, rank: int) -> None:
        check_vllm_version()
        self.endpoint = endpoint
        self.rank = rank
        self.client = ActorSyncClient(endpoint)
        self.engine: NCCLTrainerWeightTransferEngine | IPCTrainerWeightTransferEngine | None = None

    @abstractmethod
    def _trainer_init(self, buffer_bytes: int, source: DeepSpeedWeightSource
                      ) -> NCCLTrainerWeightTransferEngine | IPCTrainerWeightTransferEngine:
        """The trainer-side transfer engine of this transport (the only part the subclasses differ in)."""

    def send(self, version: int, plan: SendPlan, deadline: float) -> int:
        ep = self.endpoint
        self.client.version = version
        off = params_off_device(plan, "cuda")
        if off:  # checked before any engine is told to receive: a CPU tensor would leave them waiting
            raise SyncError(version, "rendezvous", list(ep.receiver_names),
                            f"learner rank {self.rank} holds {len(off)} parameters off the GPU (e.g. {off[0]!r}); "
                            f"{ep.transport} needs the learner on CUDA (DS_ACCELERATOR=cuda)")
        source = DeepSpeedWeightSource(plan, ep.wire_dtype)
        if self.engine is None:
            self.client.phase = "rendezvous"
            self.engine = self._trainer_init(packed_buffer_bytes(plan, ep.wire_dtype, ep.bucket_bytes), source)
        # Same metadata each round -> vLLM ships no names/shapes again (nccl_engine.py l.361).
        self.engine.source = source
        self.client.phase = "buckets"
        try:
            self.engine.send_weights()
        except Exception as e:
            if self.rank == 0:  # engines that started the update must not sample on half-loaded layers
                self.client.abort_weight_update(f"learner rank 0: {e!r}")
            if isinstance(e, SyncError):
                raise
            raise SyncError(version, self.client.phase, list(ep.receiver_names), repr(e)) from e
        if self.rank != 0:
            return 0
        return bucket_nbytes(plan.shapes, ep.wire_dtype)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


class NCCLSenderLink(VLLMSenderLink):
    """sync.transport=nccl: one NCCL group, learner rank 0 = rank 0, engine i = rank 1 + i."""

    def _trainer_init(self, buffer_bytes: int, source: DeepSpeedWeightSource) -> NCCLTrainerWeightTransferEngine:
        ep = self.endpoint
        info = NCCLTrainerInitInfo(master_address=ep.host, master_port=ep.port, world_size=ep.world_size,
                                   packed=True, packed_buffer_size_bytes=buffer_bytes, rank=self.rank)
        return NCCLTrainerWeightTransferEngine.trainer_init(info, client=self.client, source=source)


class IPCSenderLink(VLLMSenderLink):
    """sync.transport=ipc: CUDA IPC handles of each learner rank's packed buffer (colocated)."""

    def _trainer_init(self, buffer_bytes: int, source: DeepSpeedWeightSource) -> IPCTrainerWeightTransferEngine:
        info = IPCTrainerInitInfo(packed=True, packed_buffer_size_bytes=buffer_bytes, rank=self.rank)
        return IPCTrainerWeightTransferEngine.trainer_init(info, client=self.client, source=source)
