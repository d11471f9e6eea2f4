"""The transport registry: `sync.transport` name -> the `Transport` spec (weight_sync.base) that
says how each side of a sync is built and what the transport needs from the run. `WeightSender` /
`WeightReceiver`, `make_endpoint` and the driver's rules (launch.config) ask the registry; nothing
else branches on a transport's name.

    PYTHONPATH=$PWD python -m pytest -q tests/test_weight_sync.py -k registry

Links are imported lazily by their factories: "nccl" and "ipc" need vllm and CUDA, which a CPU
machine lacks, and importing this module must stay cheap (weight_sync.config validates against it).
The link modules import weight_sync.base, never this module, so the lazy imports close no cycle.
"""
from __future__ import annotations

from typing import Any

from weight_sync.base import PLACEMENTS, GatherOnlyLink, ReceiverLink, SenderLink, SyncEndpoint, Transport


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
    "gloo": Transport(_gloo_sender, _gloo_receiver, _no_handles, PLACEMENTS, "", needs_vllm=False,
                      vllm_backend="reload"),
    "ray": Transport(_ray_sender, _ray_receiver, _ray_handles, PLACEMENTS, "", needs_vllm=False,
                     vllm_backend="reload"),
    "nccl": Transport(_nccl_sender, None, _engine_handles, ("auto", "disaggregated"),
                      "NCCL refuses two members of one communicator on one GPU, as learner rank 0 and engine 0 "
                      "are when colocated", needs_vllm=True, vllm_backend="nccl"),
    "ipc": Transport(_ipc_sender, None, _engine_handles, ("colocated",),
                     "CUDA IPC hands device memory only to a process on the same GPU", needs_vllm=True,
                     vllm_backend="ipc", learner_rank_per_engine_gpu=True),
}


def get_transport(name: str) -> Transport:
    """The registered transport `name`; a clear error naming `sync.transport` otherwise."""
    if name not in TRANSPORTS:
        raise ValueError(f"sync.transport must be one of {sorted(TRANSPORTS)}, got {name!r}")
    return TRANSPORTS[name]
