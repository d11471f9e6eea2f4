"""Driver side of the rendezvous: `make_endpoint` builds the `SyncEndpoint` passed to every sender
and receiver (the record itself and `SyncError`, the one error every transport raises, live in
weight_sync.base and are re-exported here), plus the per-round results.

    PYTHONPATH=$PWD python -m pytest -q tests/test_weight_sync.py
"""
from __future__ import annotations

import socket
from typing import Any, NamedTuple

import torch

from weight_sync.base import SyncEndpoint, SyncError
from weight_sync.buckets import dtype_from_name
from weight_sync.config import SyncConfig
from weight_sync.transports import get_transport

__all__ = ["ReceivedWeights", "SyncEndpoint", "SyncError", "SyncStats", "free_port", "make_endpoint"]


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
    spec = get_transport(config.transport)
    return SyncEndpoint(
        transport=config.transport, host=host, port=port,
        receiver_names=tuple(receiver_names), dtype=dtype, bucket_bytes=config.bucket_mb * 2 ** 20,
        timeout_s=config.timeout_s, receivers_participate=spec.receivers_participate,
        engine_handles=spec.handles(tuple(engine_handles), tuple(receiver_names)),
    )
