"""The transport registry: `sync.transport` name -> how each side of a sync is built, and the two
link protocols every transport implements. `WeightSender` / `WeightReceiver` and the driver's
rules ask the registry; nothing else branches on a transport's name.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_weight_sync.py -k registry

Links are imported lazily by their factories: "nccl" and "ipc" need vllm and CUDA, which a CPU
machine lacks, and importing this module must stay cheap (weight_sync.config validates against it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from weight_sync.buckets import SendPlan, iter_packed_buckets

if TYPE_CHECKING:
    from weight_sync.endpoint import SyncEndpoint

ALL_PLACEMENTS = ("auto", "cpu", "colocated", "disaggregated")


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

    @property
    def receivers_participate(self) -> bool:
        return self.receiver is not None


def _gloo_sender(endpoint: SyncEndpoint, rank: int) -> SenderLink:
    from weight_sync.gloo_transport import GlooSenderLink

    return GlooSenderLink(endpoint) if rank == 0 else GatherOnlyLink(endpoint)


def _gloo_receiver(endpoint: SyncEndpoint, name: str) -> ReceiverLink:
    from weight_sync.gloo_transport import GlooReceiverLink

    return GlooReceiverLink(endpoint, name)


def _ray_sender(endpoint: SyncEndpoint, rank: int) -> SenderLink:
    from weight_sync.ray_transport import RaySenderLink

    return RaySenderLink(endpoint) if rank == 0 else GatherOnlyLink(endpoint)


def _ray_receiver(endpoint: SyncEndpoint, name: str) -> ReceiverLink:
    from weight_sync.ray_transport import RayReceiverLink

    return RayReceiverLink(endpoint, name)


def _ray_handles(engines: tuple[Any, ...], names: tuple[str, ...]) -> tuple[Any, ...]:
    from weight_sync.ray_transport import start_mailbox

    return (start_mailbox(),)


def _no_handles(engines: tuple[Any, ...], names: tuple[str, ...]) -> tuple[Any, ...]:
    return ()


def _nccl_sender(endpoint: SyncEndpoint, rank: int) -> SenderLink:
    from weight_sync.vllm_transport import NCCLSenderLink  # needs vllm + CUDA

    return NCCLSenderLink(endpoint, rank)


def _ipc_sender(endpoint: SyncEndpoint, rank: int) -> SenderLink:
    from weight_sync.vllm_transport import IPCSenderLink  # needs vllm + CUDA

    return IPCSenderLink(endpoint, rank)


def _engine_handles(engines: tuple[Any, ...], names: tuple[str, ...]) -> tuple[Any, ...]:
    if len(engines) != len(names):
        raise ValueError(f"this transport drives the engines itself: give one actor handle per receiver name "
                         f"({len(engines)} handles for {len(names)} names)")
    return tuple(engines)


TRANSPORTS: dict[str, Transport] = {
    "gloo": Transport(_gloo_sender, _gloo_receiver, _no_handles, ALL_PLACEMENTS, "", needs_vllm=False,
                      vllm_backend="reload"),
    "ray": Transport(_ray_sender, _ray_receiver, _ray_handles, ALL_PLACEMENTS, "", needs_vllm=False,
                     vllm_backend="reload"),
    "nccl": Transport(_nccl_sender, None, _engine_handles, ("auto", "disaggregated"),
                      "NCCL refuses two members of one communicator on one GPU, as learner rank 0 and engine 0 "
                      "are when colocated", needs_vllm=True, vllm_backend="nccl"),
    "ipc": Transport(_ipc_sender, None, _engine_handles, ("colocated",),
                     "CUDA IPC hands device memory only to a process on the same GPU", needs_vllm=True,
                     vllm_backend="ipc"),
}


def get_transport(name: str) -> Transport:
    """The registered transport `name`; a clear error naming `sync.transport` otherwise."""
    if name not in TRANSPORTS:
        raise ValueError(f"sync.transport must be one of {sorted(TRANSPORTS)}, got {name!r}")
    return TRANSPORTS[name]
