"""The rendezvous (`SyncEndpoint`, made driver-side and passed to every sender and receiver),
the per-round results and the one error type every transport raises.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_weight_sync.py
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from weight_sync.buckets import dtype_from_name
from weight_sync.config import SyncConfig
from weight_sync.transports import get_transport


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
    """Everything both sides need to meet, created once by the driver (`make_endpoint`).

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

    @property
    def receivers_participate(self) -> bool:
        """True: the driver calls every engine's `receive(version)` next to the learners' `sync`.
        False: learner rank 0 drives the engines itself (vLLM's control plane), so the driver
        calls only the learners."""
        return get_transport(self.transport).receivers_participate


class SyncStats(NamedTuple):
    """What one learner rank did in `WeightSender.sync`."""

    version: int
    num_bytes: int        # bytes on the wire (0 on learner ranks other than 0)
    num_buckets: int
    num_tensors: int
    seconds: float


class ReceivedWeights(NamedTuple):
    """A complete version, returned only when every bucket arrived (all-or-nothing)."""

    version: int
    named_tensors: list[tuple[str, torch.Tensor]]   # engine names, engine dtype
    aliases: dict[str, str]                         # tied name -> sent name (re-tie, do not expect it)
    num_bytes: int
    seconds: float


def free_port() -> int:
    """A TCP port free right now on this host (call it on learner rank 0's node)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def make_endpoint(config: SyncConfig, receiver_names: list[str], dtype: str, host: str, port: int,
                  engine_handles: tuple[Any, ...] = ()) -> SyncEndpoint:
    """Driver-side: the endpoint for one learner -> engines group. `host`/`port` are learner rank
    0's node address and a port free there, asked of that rank (`free_port` run on its node): the
    driver may sit on another node, so neither can be chosen here. `engine_handles`: the engine
    actors, for transports where learner rank 0 drives them; the registry turns them into what the
    endpoint carries (for "ray" it starts the mailbox actor instead)."""
    if not receiver_names:
        raise ValueError("a weight sync needs at least one receiver")
    if len(set(receiver_names)) != len(receiver_names):
        raise ValueError(f"receiver names must be unique, got {receiver_names}")
    dtype_from_name(dtype)
    handles = get_transport(config.transport).handles(tuple(engine_handles), tuple(receiver_names))
    return SyncEndpoint(
        transport=config.transport, host=host, port=port,
        receiver_names=tuple(receiver_names), dtype=dtype, bucket_bytes=config.bucket_mb * 2 ** 20,
        timeout_s=config.timeout_s, engine_handles=handles,
    )
