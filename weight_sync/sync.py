"""The public interface: `WeightSender` on every learner rank, `WeightReceiver` in every engine,
`load_into_module` to apply a received version all-or-nothing. Transports: gloo (CPU side group),
ray (object store), nccl / ipc (vLLM's own engines, GPU only).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_weight_sync.py

Driver, once:   ep = make_endpoint(cfg.sync, engine_names, dtype="bfloat16")
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

from weight_sync.buckets import (
    NameMap,
    encode_header,
    iter_packed_buckets,
    make_plan,
    max_bucket_nbytes,
    plan_header,
    strip_module_prefix,
)
from weight_sync.endpoint import ReceivedWeights, SyncEndpoint, SyncStats


class WeightSender:
    """Learner side. Every learner rank calls `sync` each round with its (possibly ZeRO-3
    partitioned) parameters: all ranks gather bucket by bucket in step, rank 0 transmits."""

    def __init__(self, endpoint: SyncEndpoint, rank: int, name_map: NameMap = strip_module_prefix,
                 workers_per_engine: int = 1) -> None:
        self.endpoint = endpoint
        self.rank = rank
        self.name_map = name_map
        self._link = None
        if endpoint.transport in ("nccl", "ipc"):
            from weight_sync.vllm_transport import VLLMSenderLink  # needs vllm + CUDA

            self._link = VLLMSenderLink(endpoint, rank, workers_per_engine)
        elif endpoint.transport == "gloo" and rank == 0:
            from weight_sync.gloo_transport import GlooSenderLink

            self._link = GlooSenderLink(endpoint)

    def sync(self, version: int, named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> SyncStats:
        """Send `named_params` (training names; mapped, cast to `endpoint.dtype`) as `version`.
        Raises SyncError naming the phase and the engines if it cannot finish in `timeout_s`."""
        start = time.monotonic()
        deadline = start + self.endpoint.timeout_s
        ep = self.endpoint
        wire = ep.wire_dtype
        plan = make_plan(named_params, wire, ep.bucket_bytes, self.name_map)
        if ep.transport in ("nccl", "ipc"):
            sent = self._link.send(version, plan)
        elif self.rank != 0:
            for _ in iter_packed_buckets(plan, wire):  # only join the ZeRO-3 gathers
                pass
            sent = 0
        elif ep.transport == "gloo":
            staging = self._link.staging(max_bucket_nbytes(plan, wire))
            sent = self._link.send(version, plan_header(plan, version, wire),
                                   iter_packed_buckets(plan, wire, staging), deadline)
        else:
            from weight_sync.ray_transport import ray_send

            header = bytes(encode_header(plan_header(plan, version, wire)).numpy().tobytes())
            sent = ray_send(ep, version, header, iter_packed_buckets(plan, wire), deadline)
        return SyncStats(version, sent, len(plan.buckets), len(plan.names), time.monotonic() - start)

    def close(self) -> None:
        if self._link is not None:
            self._link.close()


class WeightReceiver:
    """Engine side (gloo / ray). `out_dtype` casts what arrives in the wire dtype to this engine's
    dtype when the fleet is mixed (default: keep the wire dtype = `endpoint.dtype`).

    gloo, no cast: the returned tensors are views of receive buffers that are reused by the next
    `receive` (fresh buffers would page-fault at ~4x the cost of the transfer itself), so apply
    them (`load_into_module` copies) before receiving the next version."""

    def __init__(self, endpoint: SyncEndpoint, name: str, out_dtype: torch.dtype | None = None) -> None:
        if not endpoint.receivers_participate:
            raise ValueError(f"transport {endpoint.transport!r} is driven by the learner through vLLM; "
                             "engines expose vLLM's weight-update methods instead of a WeightReceiver")
        self.endpoint = endpoint
        self.name = name
        self.rank = endpoint.receiver_rank(name)
        self.out_dtype = out_dtype
        self._link = None
        if endpoint.transport == "gloo":
            from weight_sync.gloo_transport import GlooReceiverLink

            self._link = GlooReceiverLink(endpoint, name)

    def receive(self, version: int) -> ReceivedWeights:
        """Every tensor of `version`, only once all buckets arrived; SyncError otherwise (the
        engine then keeps its previous weights)."""
        start = time.monotonic()
        deadline = start + self.endpoint.timeout_s
        if self._link is not None:
            tensors, aliases, nbytes = self._link.receive(version, self.out_dtype, deadline)
        else:
            from weight_sync.ray_transport import ray_receive

            tensors, aliases, nbytes = ray_receive(self.endpoint, self.name, version, self.out_dtype, deadline)
        return ReceivedWeights(version, tensors, aliases, nbytes, time.monotonic() - start)


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
