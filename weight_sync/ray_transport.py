"""Fallback transport through Ray's object store: learner rank 0 `ray.put`s each packed bucket
and posts the refs with the JSON header to a small mailbox actor (started by `make_endpoint`);
each engine fetches the header and refs for the version it was asked for, gets the buckets and
acknowledges. The sender holds the refs (it owns the objects) until every engine has acked.

    PYTHONPATH=$PWD python -m pytest -q tests/test_weight_sync.py -k ray_transport
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Iterator

import ray
import torch

from weight_sync.base import SyncEndpoint, SyncError
from weight_sync.buckets import (
    SendPlan,
    bucket_nbytes,
    dtype_from_name,
    encode_header,
    iter_packed_buckets,
    plan_header,
    unpack_bucket,
)


@ray.remote(num_cpus=0)
class SyncMailbox:
    """Holds the latest posted version (header + bucket refs) and the engines' acks."""

    def __init__(self) -> None:
        self._version = -1
        self._header: bytes = b""
        self._refs: list = []
        self._acks: dict[int, set[str]] = {}
        self._changed = asyncio.Condition()

    async def post(self, version: int, header: bytes, refs: list) -> None:
        async with self._changed:
            self._version, self._header, self._refs = version, header, refs
            self._acks = {version: set()}
            self._changed.notify_all()

    async def fetch(self, version: int, timeout_s: float) -> tuple[bytes, list]:
        """Waits (at most `timeout_s`) until `version` is posted; an empty header on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._version >= version), timeout_s)
            except asyncio.TimeoutError:
                return b"", []
            return self._header, self._refs

    async def ack(self, version: int, name: str) -> None:
        async with self._changed:
            if version in self._acks:
                self._acks[version].add(name)
            self._changed.notify_all()

    async def wait_acks(self, version: int, names: list[str], timeout_s: float) -> list[str]:
        """The engines that acked `version` within `timeout_s`; drops the refs once all have."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: set(names) <= self._acks.get(version, set())), timeout_s)
            except asyncio.TimeoutError:
                pass
            acked = sorted(self._acks.get(version, set()))
            if set(names) <= set(acked) and self._version == version:
                self._refs = []
            return acked


def start_mailbox():
    """Driver-side: the mailbox actor for one endpoint."""
    return SyncMailbox.remote()


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


class RaySenderLink:
    """Learner rank 0's end (SenderLink): puts the buckets, posts them, waits for the acks."""

    def __init__(self, endpoint: SyncEndpoint) -> None:
        self.endpoint = endpoint

    def send(self, version: int, plan: SendPlan, deadline: float) -> int:
        wire = self.endpoint.wire_dtype
        header = bytes(encode_header(plan_header(plan, version, wire)).numpy().tobytes())
        return ray_send(self.endpoint, version, header, iter_packed_buckets(plan, wire), deadline)

    def close(self) -> None:
        pass  # the mailbox actor belongs to the endpoint (its refs die with the driver's handle)


class RayReceiverLink:
    """One engine's end (ReceiverLink)."""

    def __init__(self, endpoint: SyncEndpoint, name: str) -> None:
        self.endpoint = endpoint
        self.name = name

    def receive(self, version: int, out_dtype: torch.dtype | None, deadline: float
                ) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str], int]:
        return ray_receive(self.endpoint, self.name, version, out_dtype, deadline)

    def close(self) -> None:
        pass


def ray_send(endpoint: SyncEndpoint, version: int, header_bytes: bytes, buckets: Iterator[torch.Tensor],
             deadline: float) -> int:
    """Put every bucket, post, wait for every engine's ack. Returns the bytes put."""
    (mailbox,) = endpoint.engine_handles
    refs = []
    sent = 0
    for flat in buckets:
        refs.append(ray.put(flat.numpy()))
        sent += flat.numel()
    try:
        ray.get(mailbox.post.remote(version, header_bytes, refs), timeout=_left(deadline))
        acked = ray.get(mailbox.wait_acks.remote(version, list(endpoint.receiver_names), _left(deadline)),
                        timeout=_left(deadline) + 1.0)
    except Exception as e:  # noqa: BLE001 - the mailbox died or timed out
        raise SyncError(version, "header", list(endpoint.receiver_names), f"mailbox: {e!r}") from e
    missing = [n for n in endpoint.receiver_names if n not in acked]
    if missing:
        raise SyncError(version, "ack", missing, f"no ack within {endpoint.timeout_s} s")
    return sent


def ray_receive(endpoint: SyncEndpoint, name: str, version: int, out_dtype: torch.dtype | None, deadline: float
                ) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str], int]:
    """Fetch the header and buckets of `version` and ack; SyncError (nothing partial) otherwise."""
    (mailbox,) = endpoint.engine_handles
    try:
        header_bytes, refs = ray.get(mailbox.fetch.remote(version, _left(deadline)), timeout=_left(deadline) + 1.0)
    except Exception as e:  # noqa: BLE001
        raise SyncError(version, "header", [name], f"engine {name!r}: mailbox: {e!r}") from e
    if not header_bytes:
        raise SyncError(version, "header", [name], f"engine {name!r}: version {version} was not posted in time")
    header = json.loads(header_bytes.decode("utf-8"))
    if header["version"] != version:
        raise SyncError(version, "header", [name],
                        f"engine {name!r} expected version {version}, the learner posted {header['version']}")
    wire = dtype_from_name(header["dtype"])
    out: list[tuple[str, torch.Tensor]] = []
    received = 0
    n = len(header["buckets"])
    for k, (bucket, ref) in enumerate(zip(header["buckets"], refs)):
        try:
            arr = ray.get(ref, timeout=_left(deadline))
        except Exception as e:  # noqa: BLE001
            raise SyncError(version, f"bucket {k + 1}/{n}", [name], f"engine {name!r}: {e!r}") from e
        # A private copy: the object-store buffer is read-only and is freed after the acks.
        flat = torch.from_numpy(arr.copy())
        shapes = [tuple(s) for s in bucket["shapes"]]
        if flat.numel() != bucket_nbytes(shapes, wire):
            raise SyncError(version, f"bucket {k + 1}/{n}", [name], "bucket size disagrees with its header")
        received += flat.numel()
        for pname, t in unpack_bucket(flat, bucket["names"], shapes, wire):
            out.append((pname, t if out_dtype is None or out_dtype == wire else t.to(out_dtype)))
    try:
        ray.get(mailbox.ack.remote(version, name), timeout=_left(deadline))
    except Exception as e:  # noqa: BLE001
        raise SyncError(version, "ack", [name], f"engine {name!r}: {e!r}") from e
    return out, dict(header["aliases"]), received
