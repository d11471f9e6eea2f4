"""Mirrors vllm/entrypoints/llm.py (0.33) `LLM`, with the RL weight-sync methods of
vllm/entrypoints/rl/offline.py `RLOfflineMixin` and the `llm_engine` it drives
(vllm/v1/engine/llm_engine.py `LLMEngine`). Backed by `HFEngine`: real tokens, real logprobs."""
from __future__ import annotations

import importlib
import itertools
import os
import secrets
from typing import Any, Iterable

import torch
from torch.multiprocessing.reductions import rebuild_tensor

from rollout_workers.config import RolloutConfig
from rollout_workers.engines.base import SamplingParamsSpec
from rollout_workers.engines.hf import HFEngine
from tests.fake_vllm.config import WeightTransferConfig
from tests.fake_vllm.distributed.weight_transfer.base import (WeightTransferInitRequest,
                                                                        WeightTransferUpdateRequest)
from tests.fake_vllm.logprobs import Logprob
from tests.fake_vllm.outputs import CompletionOutput, RequestOutput, WeightVersionSpan
from tests.fake_vllm.sampling_params import RequestOutputKind, SamplingParams

FAKE_DEVICE_KEY = "cpu"
"""The fake's stand-in for the GPU UUID that keys a real IPC handle (ipc_engine.py:230)."""


# Mirrors vllm/v1/engine/llm_engine.py `class LLMEngine`: add_request (line 229), step (319),
# has_unfinished_requests (203), abort_request (224). The real engine schedules continuously;
# this one runs, per step(), one HFEngine.generate() call over the oldest queued requests that
# share sampling params and fit the token budget, and returns them finished (FINAL_ONLY).
class LLMEngine:
    def __init__(self, hf: HFEngine, model_name: str) -> None:
        self._hf = hf
        self._model_name = model_name
        self._queue: list[tuple[str, list[int], SamplingParams]] = []  # (internal id, prompt ids, params)
        self._external: dict[str, str] = {}  # internal id -> external id
        self.sleeping = False
        self.weight_version = "0"

    def add_request(self, request_id: str, prompt: dict, params: SamplingParams, **kwargs: Any) -> str:
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id)}")
        ids = list(prompt["prompt_token_ids"])
        if not ids:
            raise ValueError("The decoder prompt cannot be empty")
        if len(ids) + (params.max_tokens or 0) > self._hf.context:
            raise ValueError(f"The decoder prompt (length {len(ids)}) plus max_tokens is longer than the "
                             f"maximum model length of {self._hf.context}.")
        # Like the real engine, the returned id is the internal one (a random suffix,
        # input_processor.py:371), while outputs carry the external one (output_processor.py:402).
        internal = f"{request_id}-{secrets.token_hex(4)}"
        self._external[internal] = request_id
        self._queue.append((internal, ids, params))
        return internal

    def has_unfinished_requests(self) -> bool:
        return bool(self._queue)

    def abort_request(self, request_ids: list[str], internal: bool = False) -> None:
        drop = set(request_ids)
        self._queue = [q for q in self._queue if (q[0] if internal else self._external[q[0]]) not in drop]

    def step(self) -> list[RequestOutput]:
        if self.sleeping:
            raise RuntimeError("engine is sleeping: call wake_up() before stepping")
        if not self._queue:
            return []
        first = self._queue[0][2]
        same = [q for q in self._queue if _key(q[2]) == _key(first)]
        take = self._hf.chunks([len(q[1]) for q in same], first.n, first.max_tokens or 16)[0]
        batch = [same[i] for i in take]
        greedy = first.temperature == 0.0
        spec = SamplingParamsSpec(n=first.n, temperature=1.0 if greedy else first.temperature, top_p=first.top_p,
                                  max_new_tokens=first.max_tokens or 16, seed=first.seed or 0, greedy=greedy)
        rows = self._hf.sample_token_ids([q[1] for q in batch], spec, seed=first.seed or 0)
        done = {q[0] for q in batch}
        self._queue = [q for q in self._queue if q[0] not in done]
        tok = self._hf.tokenizer
        outputs = []
        for j, (rid, ids, sp) in enumerate(batch):
            comps = []
            for k, c in enumerate(rows[j * sp.n:(j + 1) * sp.n]):
                lps = None if sp.logprobs is None else [
                    {t: Logprob(logprob=lp, rank=None, decoded_token=tok.decode([t]))}
                    for t, lp in zip(c.token_ids, c.logprobs_sampler)]
                # vLLM detokenizes incrementally (v1/engine/detokenizer.py): bytes of a character
                # still incomplete when the completion ends are never emitted, where a one-shot
                # decode shows them as U+FFFD (tests/test_vllm_real.py compares the two).
                text = tok.decode(c.token_ids, skip_special_tokens=sp.skip_special_tokens).rstrip("\ufffd")
                comps.append(CompletionOutput(
                    index=k, text=text,
                    token_ids=list(c.token_ids), cumulative_logprob=sum(c.logprobs_sampler), logprobs=lps,
                    finish_reason=c.finish_reason, stop_reason=None,
                    weight_versions=[WeightVersionSpan(self.weight_version, 0, len(c.token_ids))]))
            outputs.append(RequestOutput(self._external.pop(rid), None, ids, None, comps, finished=True))
        return outputs


def _key(sp: SamplingParams) -> tuple:
    return (sp.n, sp.temperature, sp.top_p, sp.max_tokens, sp.logprobs, sp.seed is None)


# Mirrors vllm/distributed/weight_transfer/ipc_engine.py `IPCWeightTransferEngine` and the update
# info checks of `IPCWeightTransferUpdateInfo` (ipc_engine.py:63). A real handle maps a GPU UUID to
# `rebuild_cuda_tensor` args; on CPU the fake accepts {FAKE_DEVICE_KEY: reduce_tensor(cpu_tensor)[1]}.
class _FakeIPCTransferEngine:
    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._staged: dict[str, torch.Tensor] | None = None
        self.packed = False

    def init_transfer_engine(self, init_info: dict[str, Any]) -> None:
        unknown = set(init_info) - {"packed"}
        if unknown:
            raise ValueError(f"Invalid init_info for IPCWeightTransferEngine: unexpected keys {sorted(unknown)}")
        if init_info.get("packed", False):
            raise ValueError("the fake IPC engine implements packed=False only")

    def start_weight_update(self) -> None:
        self._staged = {}

    def shutdown(self) -> None:
        self._staged = None

    def update_weights(self, update_info: dict[str, Any]) -> None:
        if self._staged is None:
            raise RuntimeError("update_weights called before start_weight_update")
        names, dtypes, shapes = update_info["names"], update_info["dtype_names"], update_info["shapes"]
        handles = update_info.get("ipc_handles")
        if handles is None:
            raise ValueError("Either `ipc_handles` or `ipc_handles_pickled` must be provided")
        for field, value in (("dtype_names", dtypes), ("shapes", shapes), ("ipc_handles", handles)):
            if len(value) != len(names):
                raise ValueError(f"`{field}` should be of the same size as `names`: got {len(value)} and {len(names)}")
        for name, dtype_name, shape, handle in zip(names, dtypes, shapes, handles):
            if FAKE_DEVICE_KEY not in handle:
                raise ValueError(f"IPC handle not found for GPU UUID {FAKE_DEVICE_KEY}. "
                                 f"Available UUIDs: {list(handle.keys())}")
            tensor = rebuild_tensor(*handle[FAKE_DEVICE_KEY])
            if list(tensor.shape) != list(shape) or str(tensor.dtype).split(".")[-1] != dtype_name:
                raise ValueError(f"IPC tensor {name!r} is {tensor.dtype}{list(tensor.shape)}, "
                                 f"update_info says {dtype_name}{shape}")
            self._staged[name] = tensor.clone()

    def finish_weight_update(self) -> None:
        if self._staged is None:
            raise RuntimeError("finish_weight_update called before start_weight_update")
        _load_weights(self._model, self._staged.items())
        self._staged = None


def _load_weights(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """What a vLLM model's `load_weights` does for an unfused checkpoint: copy each named tensor
    into the parameter of that name (partial sets allowed, unknown names raise)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in weights:
            if name not in state:
                raise KeyError(f"no parameter named {name!r} in the model")
            state[name].copy_(tensor)


# Mirrors vllm/v1/worker/gpu_model_runner.py `GPUModelRunner.get_model` / `reload_weights` (l.5226:
# load the checkpoint-named tensors, then re-process the layers).
class _ModelRunner:
    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model

    def get_model(self) -> torch.nn.Module:
        return self._model

    def reload_weights(self, weights_iterator: Iterable[tuple[str, torch.Tensor]] | None = None,
                       weights_path: str | None = None, is_checkpoint_format: bool = True) -> None:
        _load_weights(self._model, weights_iterator or ())


# Mirrors vllm/v1/worker/gpu_worker.py `Worker` (its `model_runner` and weight-transfer methods);
# vLLM adds the class named by `worker_extension_cls` to the worker's bases
# (vllm/v1/worker/worker_base.py), so the extension's methods see `self.model_runner`.
#
# The update session is the worker's `_weight_update_active` flag, exactly as in 0.33.0's
# gpu_worker.py: False at construction (236); `_start_weight_update` raises while it is set
# (1569-1573) and sets it only after the transfer engine's start succeeded (1589);
# `update_weights` raises without it (1608-1611) and clears it when a chunk fails (1622-1626);
# `finish_weight_update` raises without it (1638-1641) and clears it after the transfer engine's
# finish (1644-1646: an exception there leaves it set); `shutdown_weight_transfer_engine` raises
# while it is set (1533-1537). 0.33 has no call that aborts a session, and `LLM` has no shutdown of
# its own: the worker's `shutdown` (1656) releases the transfer engine whatever the flag says.
class _Worker:
    rank = 0

    def __init__(self, model: torch.nn.Module, transfer: _FakeIPCTransferEngine | None) -> None:
        self.model_runner = _ModelRunner(model)
        self.weight_transfer_engine = transfer
        self._weight_update_active = False

    def _check_weight_transfer_engine(self) -> _FakeIPCTransferEngine:
        if self.weight_transfer_engine is None:
            raise RuntimeError("Weight transfer not configured. Please set weight_transfer_config to enable "
                               "weight transfer.")
        return self.weight_transfer_engine

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._check_weight_transfer_engine().init_transfer_engine(init_info)

    def shutdown_weight_transfer_engine(self) -> None:
        if self._weight_update_active:
            raise RuntimeError("Cannot release a trainer connection during a weight update")
        if self.weight_transfer_engine is not None:
            self.weight_transfer_engine.shutdown()

    def start_weight_update(self) -> None:
        engine = self._check_weight_transfer_engine()
        if self._weight_update_active:
            raise RuntimeError("start_weight_update called while a weight update is already active. "
                               "Call finish_weight_update first.")
        engine.start_weight_update()
        self._weight_update_active = True

    def update_weights(self, update_info: dict | list[dict]) -> None:
        engine = self._check_weight_transfer_engine()
        if not self._weight_update_active:
            raise RuntimeError("start_weight_update must be called before update_weights.")
        try:
            # A list is indexed by global worker rank (gpu_worker.py:1615); the fake has rank 0 only.
            engine.update_weights(update_info[self.rank] if isinstance(update_info, list) else update_info)
        except BaseException:
            self._weight_update_active = False
            raise

    def finish_weight_update(self) -> None:
        engine = self._check_weight_transfer_engine()
        if not self._weight_update_active:
            raise RuntimeError("finish_weight_update called without a matching start_weight_update.")
        engine.finish_weight_update()
        self._weight_update_active = False

    def shutdown(self) -> None:
        if self.weight_transfer_engine is not None:
            self.weight_transfer_engine.shutdown()


def _make_worker(extension: str | type | None, model: torch.nn.Module,
                 transfer: _FakeIPCTransferEngine | None) -> _Worker:
    if not extension:
        return _Worker(model, transfer)
    if isinstance(extension, str):
        module, _, name = extension.rpartition(".")
        extension = getattr(importlib.import_module(module), name)
    return type("WorkerWithExtension", (extension, _Worker), {})(model, transfer)


_MSGPACK_NATIVE = (type(None), bool, int, float, str, bytes)


def _check_crosses_engine_core(value: Any, where: str, insecure: bool) -> None:
    """What passes `collective_rpc` to an engine core in its own process (vLLM's default, the GPU
    layout), as vllm/v1/serial_utils.py (0.33.0) encodes it. A tensor never arrives as one:
    `MsgpackEncoder.enc_hook` turns it into a (dtype, shape, buffer) tuple (191, 256-272) and the
    engine core decodes untyped utility arguments as plain lists (core.py:1765, 1854-1868), so a
    worker method given a tensor gets a list; the fake refuses it outright. Other objects need
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 (pickled, 220-233), as the real encoder refuses them."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: a torch.Tensor reaches vLLM's engine core as a list (msgpack, "
                        "v1/serial_utils.py); pass plain values (e.g. a file path) through collective_rpc")
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_crosses_engine_core(v, where, insecure)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_crosses_engine_core(k, where, insecure)
            _check_crosses_engine_core(v, where, insecure)
    elif not isinstance(value, _MSGPACK_NATIVE) and not insecure:
        raise TypeError(f"{where}: Object of type {type(value)} is not serializable. Set "
                        "VLLM_ALLOW_INSECURE_SERIALIZATION=1 to allow fallback to pickle-based serialization "
                        "(before building the LLM: its engine-core process keeps the environment it started with).")


# Mirrors vllm/entrypoints/llm.py:62 `class LLM` (constructor at line 177; the kwargs below reach
# EngineArgs through **kwargs there: enable_prefix_caching, enable_sleep_mode,
# weight_transfer_config, logprobs_mode), get_tokenizer (385), enqueue (483), apply_model (604), sleep (839), wake_up (872), and
# RLOfflineMixin (entrypoints/rl/offline.py): init_weight_transfer_engine, start_weight_update,
# update_weights, finish_weight_update, get_weight_version.
class LLM:
    def __init__(self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.92, enable_prefix_caching: bool | None = None,
                 enable_sleep_mode: bool = False, weight_transfer_config: WeightTransferConfig | None = None,
                 logprobs_mode: str = "raw_logprobs", max_num_batched_tokens: int | None = None,
                 worker_extension_cls: str | type | None = None, **kwargs: Any) -> None:
        if logprobs_mode != "processed_logprobs":
            # HFEngine computes logprobs from the warped scores only; refusing other modes keeps
            # the fake from silently returning something the real engine would not.
            raise ValueError(f"the fake LLM implements logprobs_mode='processed_logprobs' only, got {logprobs_mode!r}")
        if tensor_parallel_size != 1:
            raise ValueError("the fake LLM runs on one CPU process: tensor_parallel_size must be 1")
        hf = HFEngine(model, dtype="float32" if dtype == "auto" else dtype, device="cpu",
                      gen_batch_tokens=max_num_batched_tokens or RolloutConfig.gen_batch_tokens, seed=seed)
        self._hf = hf
        self.llm_engine = LLMEngine(hf, model)
        self._request_counter = itertools.count()
        self._enable_sleep_mode = enable_sleep_mode
        self._weight_transfer_config = weight_transfer_config
        transfer: _FakeIPCTransferEngine | None = None
        if weight_transfer_config is not None:
            if weight_transfer_config.backend != "ipc":
                raise ValueError(f"Invalid weight transfer backend: {weight_transfer_config.backend}. "
                                 "Available engines (fake): ['ipc']")
            transfer = _FakeIPCTransferEngine(hf.model)
        self._worker = _make_worker(worker_extension_cls, hf.model, transfer)
        # The real engine core is a process spawned here: it keeps the environment of this moment,
        # and its msgpack decoder refuses pickled IPC handles unless this was set (serial_utils.py).
        self._insecure_serialization = os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") == "1"
        self.prefix_cache_resets = 0
        """Fake only: how many times reset_prefix_cache() ran (the fake caches no KV)."""
        self.open_transfer_engines = 0
        """Fake only: trainer connections opened and not shut down (a real one holds a communicator)."""

    def enqueue(self, prompts, sampling_params=None, lora_request=None, priority=None, use_tqdm=True,
                tokenization_kwargs=None, mm_processor_kwargs=None) -> list[str]:
        # Real: llm.py:483 -> _add_completion_requests -> _add_request (common/offline.py:568), which
        # sets output_kind=FINAL_ONLY and numbers requests with a counter (the external id).
        prompts = [prompts] if isinstance(prompts, dict) else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        ids = []
        for prompt, sp in zip(prompts, params):
            sp.output_kind = RequestOutputKind.FINAL_ONLY
            ids.append(self.llm_engine.add_request(str(next(self._request_counter)), prompt, sp))
        return ids

    def apply_model(self, func):
        # Real: runs `func` on the model in every worker, returns one result per worker (llm.py:604).
        return [func(self._hf.model)]

    def get_tokenizer(self):
        return self._hf.tokenizer

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        # Real: llm.py:573, runs `method` on every worker (one here) and returns their results,
        # both through the engine core's msgpack encoding (the fake models the engine core in its
        # own process, vLLM's default).
        _check_crosses_engine_core((args, kwargs or {}), f"collective_rpc({method!r}) arguments",
                                   self._insecure_serialization)
        result = getattr(self._worker, method)(*args, **(kwargs or {}))
        _check_crosses_engine_core(result, f"collective_rpc({method!r}) result", self._insecure_serialization)
        return [result]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        # Real: llm.py:832; False when requests are running and reset_running_requests is off.
        if self.llm_engine.has_unfinished_requests() and not reset_running_requests:
            return False
        self.prefix_cache_resets += 1
        return True

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        if not self._enable_sleep_mode:
            raise ValueError("Sleep mode is not enabled: construct LLM(..., enable_sleep_mode=True)")
        if mode == "abort":
            self.llm_engine.abort_request([q[0] for q in self.llm_engine._queue], internal=True)
        self.llm_engine.sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.llm_engine.sleeping = False
        return True

    # RLOfflineMixin (entrypoints/rl/offline.py, 0.33.0): each call is a collective_rpc to the
    # workers' methods of the same name; the update-session rules are the worker's (_Worker above).
    def init_weight_transfer_engine(self, request: WeightTransferInitRequest | dict) -> None:
        init_info = request["init_info"] if isinstance(request, dict) else request.init_info
        self.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})
        self.open_transfer_engines += 1

    def shutdown_weight_transfer_engine(self) -> None:
        self.collective_rpc("shutdown_weight_transfer_engine")
        self.open_transfer_engines = max(0, self.open_transfer_engines - 1)

    def start_weight_update(self) -> None:
        self.collective_rpc("start_weight_update")

    def update_weights(self, request: WeightTransferUpdateRequest | dict) -> None:
        update_info = request["update_info"] if isinstance(request, dict) else request.update_info
        self.collective_rpc("update_weights", kwargs={"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.collective_rpc("finish_weight_update")
        if weight_version is not None:
            self.llm_engine.weight_version = weight_version

    def get_weight_version(self) -> str:
        return self.llm_engine.weight_version
