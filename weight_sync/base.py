"""The bottom of weight_sync: what every transport and the registry share. The rendezvous record
(`SyncEndpoint`), the one error type (`SyncError`), the link protocols every transport implements
(`SenderLink`, `ReceiverLink`, `GatherOnlyLink`) and the spec a transport registers (`Transport`).
It imports only weight_sync.buckets; the registry (transports.py), the links and the endpoint
factory (endpoint.py) sit on top of it.

    PYTHONPATH=$PWD python -m pytest -q tests/test_weight_sync.py tests/test_imports.py
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from weight_sync.buckets import SendPlan, dtype_from_name, iter_packed_buckets

PLACEMENTS = ("auto", "cpu", "colocated", "disaggregated")
"""The `train.placement` values; a transport lists the ones it works with (`Transport.placements`)."""


class SyncError(RuntimeError):
    """A sync that did not complete: names the version, the phase ("rendezvous", "header",
    "bucket k/n", "ack") and the engines at fault, so the driver can say which engine to restart."""

    def __init__(self, version: int, phase: str, engines: list[str], detail: str) -> None:
        self.version = version
        self.phase = phase
        self.engines = list(engines)
        super().__init__(f"weight sync v{version} failed in phase {phase!r}; engines: {self.engines}: {detail}")

    def __reduce__(self):  # keep the fields when Ray ships the exception to the driver
        return (SyncError, (self.version, self.phase, self.engines, self.args[0]))


@dataclass(frozen=True)
class SyncEndpoint:
    """Everything both sides need to meet, created once by the driver (`endpoint.make_endpoint`).

    Ranks in the side group: 0 is learner rank 0 (the sender); receiver `receiver_names[i]` is
    rank i + 1. Nothing here refers to engine or learner classes, only to names and addresses."""

    transport: str
    """A registered transport name (weight_sync.transports.TRANSPORTS; see SyncConfig.transport)."""
    host: str
    """Address of learner rank 0 (TCPStore master for gloo/nccl)."""
    port: int
    """A free TCP port on `host`."""
    receiver_names: tuple[str, ...]
    """One name per engine, in rank order; errors name engines by these."""
    dtype: str
    """Wire dtype = the engines' dtype ("bfloat16", "float16", "float32"); the learner casts to it."""
    bucket_bytes: int
    """Bytes per bucket: one gather and one collective per bucket."""
    timeout_s: float
    """A sync (first one: including the rendezvous) that does not finish in this time raises."""
    receivers_participate: bool
    """The transport's `Transport.receivers_participate`, looked up once by `make_endpoint`. True:
    the driver calls every engine's `receive(version)` next to the learners' `sync`. False:
    learner rank 0 drives the engines itself (vLLM's control plane), so the driver calls only the
    learners."""
    engine_handles: tuple[Any, ...] = field(default=(), compare=False)
    """nccl/ipc: the engine actor handles the learner drives (vLLM control plane); ray: (mailbox,)."""

    @property
    def world_size(self) -> int:
        return 1 + len(self.receiver_names)

    def receiver_rank(self, name: str) -> int:
        if name not in self.receiver_names:
            raise ValueError(f"unknown receiver {name!r}; endpoint has {list(self.receiver_names)}")
        return 1 + self.receiver_names.index(name)

    @property
    def wire_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)


class SenderLink(Protocol):
    """One learner rank's end of a transport. Every rank gets one and calls `send` each round with
    the same plan: the ZeRO-3 gathers are collectives, so non-sending ranks must drive them too."""

    def send(self, version: int, plan: SendPlan, deadline: float) -> int:
        """Move every bucket of `plan` as `version`; the bytes this rank put on the wire.
        Raises SyncError (naming the phase and engines) if it cannot finish by `deadline`."""
        ...

    def close(self) -> None:
        """Release the group/handles; the link is unusable afterwards."""
        ...


class ReceiverLink(Protocol):
    """One engine's end of a transport whose engines take part in each round (gloo, ray)."""

    def receive(self, version: int, out_dtype: torch.dtype | None, deadline: float
                ) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str], int]:
        """The complete `version` as (named tensors, tied aliases, bytes received), or SyncError:
        nothing partial."""
        ...

    def close(self) -> None:
        ...


class GatherOnlyLink:
    """A learner rank other than 0 under a transport where only rank 0 transmits (gloo, ray):
    it joins each bucket's ZeRO-3 gather and sends nothing."""

    def __init__(self, endpoint: SyncEndpoint) -> None:
        self.endpoint = endpoint

    def send(self, version: int, plan: SendPlan, deadline: float) -> int:
        for _ in iter_packed_buckets(plan, self.endpoint.wire_dtype):
            pass
        return 0

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Transport:
    """How one transport is built, and what it needs from the rest of the run."""

    sender: Callable[[SyncEndpoint, int], SenderLink]
    """Makes learner rank `rank`'s link."""
    receiver: Callable[[SyncEndpoint, str], ReceiverLink] | None
    """Makes engine `name`'s link; None when learner rank 0 drives the engines itself (vLLM's
    native transfer), so the driver calls only the learners."""
    handles: Callable[[tuple[Any, ...], tuple[str, ...]], tuple[Any, ...]]
    """Driver-side, in `make_endpoint`: the actor handles the endpoint carries, given the engine
    actors and their names."""
    placements: tuple[str, ...]
    """`train.placement` values this transport can work with."""
    placement_note: str
    """Why it needs those placements (quoted when a config is refused; "" when it takes any)."""
    needs_vllm: bool
    """Only vLLM engines can take part (vLLM's own weight-transfer API)."""
    vllm_backend: str
    """The weight path a vLLM engine is built with under this transport (rollout_workers.engines.
    vllm_engine): "reload" (named tensors delivered by the worker), or vLLM's native "nccl" / "ipc"."""
    learner_rank_per_engine_gpu: bool = False
    """Every engine GPU needs a learner rank of its own (CUDA IPC: each engine takes its weights
    from the learner rank on its GPU); launch.config refuses fewer learner ranks than engine GPUs."""

    @property
    def receivers_participate(self) -> bool:
        return self.receiver is not None
