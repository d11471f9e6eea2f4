"""CPU transport: a side torch.distributed gloo group between learner rank 0 (rank 0, TCPStore
master) and the engines (ranks 1..N), next to whatever default group DeepSpeed uses.

    PYTHONPATH=$PWD python -m pytest -q tests/test_weight_sync.py -k gloo

One round: header length (int64[1]) -> JSON header (uint8) -> one broadcast per packed bucket
-> an ack all-reduce (int32[world], each receiver writes 1 in its own slot once it holds the
complete version). Every op waits with the time left before the round's deadline. Each receiver
also records its progress ("<version>:<step>", step -1 = entered `receive`) in the store, so a
failure names the engines that never came or did not get through the failing phase, even when
the gloo error only says "connection reset" or "timed out".
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from weight_sync.base import SyncEndpoint, SyncError
from weight_sync.buckets import (
    SendPlan,
    bucket_nbytes,
    decode_header,
    dtype_from_name,
    encode_header,
    iter_packed_buckets,
    max_bucket_nbytes,
    plan_header,
    unpack_bucket,
)


def _left(deadline: float) -> timedelta:
    return timedelta(seconds=max(deadline - time.monotonic(), 0.001))


def phase_name(step: int, num_buckets: int) -> str:
    """Step 0 is the header, 1..n the buckets, n+1 the ack."""
    if step == 0:
        return "header"
    if step <= num_buckets:
        return f"bucket {step}/{num_buckets}"
    return "ack"


class GlooSenderLink:
    """Learner rank 0's end of the group."""

    def __init__(self, endpoint: SyncEndpoint) -> None:
        self.endpoint = endpoint
        self.store: dist.TCPStore | None = None
        self.pg: dist.ProcessGroupGloo | None = None
        self._staging: list[torch.Tensor] = []

    def staging(self, nbytes: int) -> list[torch.Tensor]:
        """Two pack buffers reused for every bucket of every round: bucket k is packed into one
        while bucket k-1 is still being sent from the other (see `send`)."""
        if not self._staging or self._staging[0].numel() < nbytes:
            self._staging = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(2)]
        return self._staging

    def connect(self, version: int, deadline: float) -> None:
        ep = self.endpoint
        try:
            # wait_for_workers=False: the receivers' arrival is checked by the group's own
            # rendezvous below, which knows the deadline.
            self.store = dist.TCPStore(ep.host, ep.port, ep.world_size, is_master=True,
                                       timeout=_left(deadline), wait_for_workers=False)
            self.pg = dist.ProcessGroupGloo(self.store, 0, ep.world_size, _left(deadline))
        except Exception as e:  # noqa: BLE001 - re-raised with the engines that never arrived
            missing = self._missing("name", None) if self.store is not None else list(ep.receiver_names)
            self.close()
            raise SyncError(version, "rendezvous", missing, repr(e)) from e

    def _missing(self, kind: str, expect: tuple[int, int] | None) -> list[str]:
        """Engines whose store record is absent or, for acks, behind (version, step)."""
        assert self.store is not None
        out = []
        for i, name in enumerate(self.endpoint.receiver_names):
            key = f"{kind}/{i + 1}"
            try:
                if not self.store.check([key]):
                    out.append(name)
                    continue
                if expect is not None:
                    v, step = (int(x) for x in self.store.get(key).decode().split(":"))
                    if (v, step) < expect:
                        out.append(name)
            except Exception:  # noqa: BLE001 - an unreadable record counts as not arrived
                out.append(name)
        return out

    def send(self, version: int, plan: SendPlan, deadline: float) -> int:
        """Broadcast the plan's header and packed buckets; the bytes sent (SenderLink.send)."""
        wire = self.endpoint.wire_dtype
        staging = self.staging(max_bucket_nbytes(plan, wire))
        return self._broadcast(version, plan_header(plan, version, wire), iter_packed_buckets(plan, wire, staging),
                               deadline)

    def _broadcast(self, version: int, header: dict, buckets: Iterator[torch.Tensor], deadline: float) -> int:
        """Broadcast header and buckets (an iterator of packed uint8 tensors, which must be driven
        to the end so the ZeRO-3 gathers of the other learner ranks line up, even after a
        failure). Returns the bytes sent; raises SyncError after the iterator is exhausted."""
        if self.pg is None:
            self.connect(version, deadline)
        assert self.pg is not None
        n = len(header["buckets"])
        step = 0
        sent = 0
        error: Exception | None = None
        try:
            head = encode_header(header)
            self.pg.broadcast(torch.tensor([head.numel()], dtype=torch.int64), 0, _left(deadline)).wait(_left(deadline))
            self.pg.broadcast(head, 0, _left(deadline)).wait(_left(deadline))
        except Exception as e:  # noqa: BLE001
            error = e
        pending: tuple[int, object, int] | None = None  # (step, work, bytes) of the bucket in flight
        # Advancing `buckets` gathers and packs bucket k while bucket k-1 is still on the wire;
        # k-1 is waited on before k+1 is packed into its buffer.
        for k, flat in enumerate(buckets):
            if error is not None:
                continue  # keep gathering in step with the other learner ranks, send nothing
            step = k + 1
            try:
                work = self.pg.broadcast(flat, 0, _left(deadline))
                if pending is not None:
                    step = pending[0]
                    pending[1].wait(_left(deadline))
                    sent += pending[2]
                pending = (k + 1, work, flat.numel())
            except Exception as e:  # noqa: BLE001
                error = e
        if error is None and pending is not None:
            step = pending[0]
            try:
                pending[1].wait(_left(deadline))
                sent += pending[2]
            except Exception as e:  # noqa: BLE001
                error = e
        if error is None:
            step = n + 1
            acks = torch.zeros(self.endpoint.world_size, dtype=torch.int32)
            try:
                self.pg.allreduce(acks, dist.ReduceOp.SUM, _left(deadline)).wait(_left(deadline))
            except Exception as e:  # noqa: BLE001
                error = e
            else:
                refused = [name for i, name in enumerate(self.endpoint.receiver_names) if int(acks[i + 1]) != 1]
                if refused:  # every collective completed: the group stays usable for the next round
                    raise SyncError(version, "ack", refused, "these engines rejected the round (see their log)")
        if error is not None:
            # Blame the engines that never entered `receive(version)` (dead, stuck, busy); if all
            # did, those that did not complete the failing step (for the ack, which nobody
            # completes when one is missing: those that did not receive every bucket).
            laggards = self._missing("ack", (version, -1)) or self._missing("ack", (version, min(step, n)))
            self.close()
            raise SyncError(version, phase_name(step, n), laggards or list(self.endpoint.receiver_names),
                            repr(error)) from error
        return sent

    def close(self) -> None:
        """A failed group is unusable (peers are mid-collective): drop it; a new endpoint is needed."""
        self.pg = None
        self.store = None


class GlooReceiverLink:
    """One engine's end of the group."""

    def __init__(self, endpoint: SyncEndpoint, name: str) -> None:
        self.endpoint = endpoint
        self.name = name
        self.rank = endpoint.receiver_rank(name)
        self.store: dist.TCPStore | None = None
        self.pg: dist.ProcessGroupGloo | None = None
        self._buffers: list[torch.Tensor] = []  # one receive buffer per bucket, reused across rounds

    def _buffer(self, k: int, nbytes: int) -> torch.Tensor:
        while len(self._buffers) <= k:
            self._buffers.append(torch.empty(0, dtype=torch.uint8))
        if self._buffers[k].numel() != nbytes:
            self._buffers[k] = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffers[k]

    def _fail(self, version: int, phase: str, e: Exception) -> SyncError:
        self.close()  # a failed group is unusable: the next round needs a new endpoint
        return SyncError(version, phase, [self.name], f"engine {self.name!r} (rank {self.rank}): {e!r}")

    def connect(self, version: int, deadline: float) -> None:
        ep = self.endpoint
        try:
            self.store = dist.TCPStore(ep.host, ep.port, ep.world_size, is_master=False, timeout=_left(deadline))
            self.store.set(f"name/{self.rank}", self.name)
            self.pg = dist.ProcessGroupGloo(self.store, self.rank, ep.world_size, _left(deadline))
        except Exception as e:  # noqa: BLE001
            raise self._fail(version, "rendezvous", e) from e

    def receive(self, version: int, out_dtype: torch.dtype | None, deadline: float
                ) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str], int]:
        """The complete version as (named tensors, aliases, bytes), or SyncError: nothing partial."""
        if self.pg is None:
            self.connect(version, deadline)
        assert self.pg is not None and self.store is not None
        step = 0
        n = 0
        try:
            self.store.set(f"ack/{self.rank}", f"{version}:-1")  # "entered receive(version)"
            length = torch.zeros(1, dtype=torch.int64)
            self.pg.broadcast(length, 0, _left(deadline)).wait(_left(deadline))
            head = torch.empty(int(length.item()), dtype=torch.uint8)
            self.pg.broadcast(head, 0, _left(deadline)).wait(_left(deadline))
            header = decode_header(head)
            n = len(header["buckets"])
            wire = dtype_from_name(header["dtype"])
            self.store.set(f"ack/{self.rank}", f"{header['version']}:0")
            out: list[tuple[str, torch.Tensor]] = []
            received = 0
            buckets = [(b["names"], [tuple(s) for s in b["shapes"]]) for b in header["buckets"]]
            flats = [self._buffer(k, bucket_nbytes(shapes, wire)) for k, (_, shapes) in enumerate(buckets)]
            # Every receive is posted at once (gloo matches ops by sequence number), so the next
            # bucket streams in while this one is unpacked.
            works = [self.pg.broadcast(flat, 0, _left(deadline)) for flat in flats]
            for k, ((names, shapes), flat, work) in enumerate(zip(buckets, flats, works)):
                step = k + 1
                work.wait(_left(deadline))
                received += flat.numel()
                for name, t in unpack_bucket(flat, names, shapes, wire):
                    out.append((name, t if out_dtype is None or out_dtype == wire else t.to(out_dtype)))
                self.store.set(f"ack/{self.rank}", f"{header['version']}:{step}")
            step = n + 1
            ok = header["version"] == version
            acks = torch.zeros(self.endpoint.world_size, dtype=torch.int32)
            acks[self.rank] = 1 if ok else 0
            self.pg.allreduce(acks, dist.ReduceOp.SUM, _left(deadline)).wait(_left(deadline))
            self.store.set(f"ack/{self.rank}", f"{header['version']}:{step}")
        except Exception as e:  # noqa: BLE001
            raise self._fail(version, phase_name(step, n), e) from e
        if not ok:
            raise SyncError(version, "header", [self.name],
                            f"engine {self.name!r} expected version {version}, the learner sent {header['version']}")
        if int(acks.sum()) != self.endpoint.world_size - 1:
            # Another engine rejected the round: the learner raises; this engine keeps its weights
            # too, so no two engines disagree about which version they hold.
            raise SyncError(version, "ack", [self.name], "another engine rejected this round")
        return out, dict(header["aliases"]), received

    def close(self) -> None:
        self.pg = None
        self.store = None
