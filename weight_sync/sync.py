"""The public interface: `WeightSender` on every learner rank, `WeightReceiver` in every engine,
`load_into_module` to apply a received version all-or-nothing. Each side holds one link of the
transport the endpoint names (weight_sync.transports.TRANSPORTS: gloo, ray, nccl, ipc).

    PYTHONPATH=$PWD python -m pytest -q tests/test_weight_sync.py

Driver, once:   host, port = <learner rank 0's node address and a port free there>
                ep = make_endpoint(cfg.sync, engine_names, "bfloat16", host, port)
                learner ranks: WeightSender(ep, rank); engines: WeightReceiver(ep, name)
Driver, each round (one call; the first one also does the rendezvous):
    refs = [l.sync_weights.remote(v) for l in learners]            # -> sender.sync(v, params)
    if ep.receivers_participate:
        refs += [e.receive_weights.remote(v) for e in engines]     # -> receiver.receive(v)
    ray.get(refs, timeout=ep.timeout_s + margin)
"""
from __future__ import annotations

import time
from typing import Iterable

import torch

from weight_sync.base import ReceiverLink, SenderLink
from weight_sync.buckets import NameMap, make_plan, strip_module_prefix
from weight_sync.endpoint import ReceivedWeights, SyncEndpoint, SyncStats
from weight_sync.transports import get_transport


class WeightSender:
    """Learner side. Every learner rank calls `sync` each round with its (possibly ZeRO-3
    partitioned) parameters: all ranks gather bucket by bucket in step, rank 0 transmits."""

    def __init__(self, endpoint: SyncEndpoint, rank: int, name_map: NameMap = strip_module_prefix) -> None:
        self.endpoint = endpoint
        self.rank = rank
        self.name_map = name_map
        self._link: SenderLink = get_transport(endpoint.transport).sender(endpoint, rank)

    def sync(self, version: int, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> SyncStats:
        """Send `named_params` (training names; mapped, cast to `endpoint.dtype`) as `version`.
        Raises SyncError naming the phase and the engines if it cannot finish in `timeout_s`."""
        start = time.monotonic()
        plan = make_plan(named_params, self.endpoint.wire_dtype, self.endpoint.bucket_bytes, self.name_map)
        sent = self._link.send(version, plan, start + self.endpoint.timeout_s)
        return SyncStats(version, sent, len(plan.buckets), len(plan.names), time.monotonic() - start)

    def close(self) -> None:
        self._link.close()


class WeightReceiver:
    """Engine side (transports whose engines take part: gloo, ray). `out_dtype` casts what arrives
    in the wire dtype to this engine's dtype when the fleet is mixed (default: keep the wire dtype
    = `endpoint.dtype`).

    gloo, no cast: the returned tensors are views of receive buffers that are reused by the next
    `receive` (fresh buffers would page-fault at ~4x the cost of the transfer itself), so apply
    them (`load_into_module` copies) before receiving the next version."""

    def __init__(self, endpoint: SyncEndpoint, name: str, out_dtype: torch.dtype | None = None) -> None:
        make_link = get_transport(endpoint.transport).receiver
        if make_link is None:
            raise ValueError(f"transport {endpoint.transport!r} is driven by the learner through vLLM; "
                             "engines expose vLLM's weight-update methods instead of a WeightReceiver")
        self.endpoint = endpoint
        self.name = name
        self.rank = endpoint.receiver_rank(name)
        self.out_dtype = out_dtype
        self._link: ReceiverLink = make_link(endpoint, name)

    def receive(self, version: int) -> ReceivedWeights:
        """Every tensor of `version`, only once all buckets arrived; SyncError otherwise (the
        engine then keeps its previous weights)."""
        start = time.monotonic()
        tensors, aliases, nbytes = self._link.receive(version, self.out_dtype, start + self.endpoint.timeout_s)
        return ReceivedWeights(version, tensors, aliases, nbytes, time.monotonic() - start)

    def close(self) -> None:
        self._link.close()


def load_into_module(module: torch.nn.Module, received: ReceivedWeights) -> None:
    """Copy a received version into `module`'s parameters in place, all-or-nothing: every name
    and shape is checked before the first copy. A tied alias (e.g. `lm_head.weight`) shares
    storage with its source and is updated with it; an untied one gets the source's values."""
    params = dict(module.named_parameters(remove_duplicate=False))
    values = dict(received.named_tensors)
    targets: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for name, value in list(values.items()) + [(a, values.get(s)) for a, s in received.aliases.items()]:
        if name not in params:
            raise ValueError(f"received weight {name!r} has no parameter in {type(module).__name__}")
        if value is None or tuple(params[name].shape) != tuple(value.shape):
            got = None if value is None else tuple(value.shape)
            raise ValueError(f"received weight {name!r} has shape {got}, the module's is {tuple(params[name].shape)}")
        targets.append((params[name], value))
    sent = set(values) | set(received.aliases)
    missing = [n for n in params if n not in sent]
    if missing:
        raise ValueError(f"version {received.version} lacks {len(missing)} parameters, e.g. {missing[:3]}")
    with torch.no_grad():
        for param, value in targets:
            if param.data_ptr() != value.data_ptr():
                param.copy_(value)
