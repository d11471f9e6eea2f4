"""vLLM engine adapter (vLLM >= 0.33.0, < 0.34), for GPU clusters. Tests drive it through the
fake vLLM (`rollout_workers.fake_vllm`), injected as `vllm_module`.

Streaming: the whole preemptive batch is queued at once with `llm.llm_engine.add_request` (so
vLLM's continuous batching and prefix caching see every request, as the DASH paper's single big
engine call wants), then `llm.llm_engine.step()` is driven here, exactly as `LLM._run_engine`
does (vllm/entrypoints/common/offline.py:589), and each request is yielded the step it finishes.
The sync `LLM` was chosen over `AsyncLLM` because a Ray actor method that is a plain generator
needs no event loop, and `LLM.generate` on sub-batches would cut the batch vLLM can schedule.
Request ids are ours (external ids are what `RequestOutput.request_id` carries), so outputs map
back to prompts without depending on `enqueue`'s internal, randomised ids.

Logprobs: `LLM(logprobs_mode="processed_logprobs")` makes `logprobs=0` return the logprob of the
sampled token after temperature/top-p (vllm/config/model.py:291), the sampling distribution.

Weights: `update_weights(named_tensors, version)` validates the full set against the
checkpoint's names and shapes, then uses vLLM's native weight-transfer API with the "ipc"
backend (same GPU: the tensors are exported with CUDA IPC handles, as
vllm/distributed/weight_transfer/ipc_engine.py:388 does): `start_weight_update`,
`update_weights(WeightTransferUpdateRequest(...))`, `finish_weight_update(weight_version=...)`.
NCCL transfers from the learner go through `sync_client()` (the VLLMWeightSyncClient protocol,
vllm/distributed/weight_transfer/base.py:618) driven by weight_sync.

    PYTHONPATH=$PWD python -m pytest -q tests/test_vllm_adapter.py
"""
from __future__ import annotations

import importlib
import itertools
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator, Sequence

import torch
from packaging.version import Version
from safetensors import safe_open
from transformers import AutoConfig

from rollout_workers.engines.base import (Engine, GroupOutput, SamplingParamsSpec, check_weight_set,
                                          encode_prompts)
from rollout_workers.types import Completion, Prompt

SUPPORTED_VLLM = (Version("0.33.0"), Version("0.34"))
"""Supported vLLM versions: >= first, < second (the weight-transfer API and output fields used here)."""

def load_vllm(vllm_module: ModuleType | str | None) -> ModuleType:
    """Import vLLM (or the module given, e.g. "rollout_workers.fake_vllm") and check its version."""
    if vllm_module is None or isinstance(vllm_module, str):
        name = vllm_module or "vllm"
        try:
            vllm_module = importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"rollout.engine='vllm' needs vLLM >={SUPPORTED_VLLM[0]},<{SUPPORTED_VLLM[1]} "
                              f"(pip install 'dash-rl[vllm]'); importing {name!r} failed: {e}") from e
    installed = getattr(vllm_module, "__version__", "unknown")
    try:
        ok = SUPPORTED_VLLM[0] <= Version(installed) < SUPPORTED_VLLM[1]
    except Exception:
        ok = False
    if not ok:
        raise RuntimeError(f"vLLM {installed} is installed ({vllm_module.__name__}); this adapter supports "
                           f"vLLM >={SUPPORTED_VLLM[0]},<{SUPPORTED_VLLM[1]}")
    return vllm_module


def checkpoint_shapes(model_path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) weight names and shapes of a safetensors checkpoint; a tied
    `lm_head.weight` that the checkpoint omits is optional."""
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {model_path}")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    optional = {}
    config = json.loads((Path(model_path) / "config.json").read_text())
    if config.get("tie_word_embeddings") and "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
        optional["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes, optional


class VLLMEngine(Engine):
    """An `Engine` over `vllm.LLM`."""

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, enable_prefix_caching: bool = True,
                 enable_sleep_mode: bool = False, weight_transfer_backend: str = "ipc",
                 vllm_module: ModuleType | str | None = None, llm_kwargs: dict[str, Any] | None = None) -> None:
        self._vllm = load_vllm(vllm_module)
        root = self._vllm.__name__
        self._sp_mod = importlib.import_module(f"{root}.sampling_params")
        self._wt_mod = importlib.import_module(f"{root}.distributed.weight_transfer.base")
        config_mod = importlib.import_module(f"{root}.config")
        self._inputs_mod = importlib.import_module(f"{root}.inputs")
        self._backend = weight_transfer_backend
        self.llm = self._vllm.LLM(
            model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
            enable_sleep_mode=enable_sleep_mode, logprobs_mode="processed_logprobs",
            weight_transfer_config=config_mod.WeightTransferConfig(backend=weight_transfer_backend),
            **(llm_kwargs or {}))
        if weight_transfer_backend == "ipc":
            self.llm.init_weight_transfer_engine(self._wt_mod.WeightTransferInitRequest(init_info={"packed": False}))
        self._tokenizer = self.llm.get_tokenizer()
        self.context = int(AutoConfig.from_pretrained(model_path).max_position_embeddings)
        self._expected, self._optional = checkpoint_shapes(model_path)
        self._dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self._version = 0
        self._sleeping = False
        self._batches = itertools.count()

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def version(self) -> int:
        return self._version

    def generate(self, prompts: Sequence[Prompt], params: SamplingParamsSpec) -> Iterator[GroupOutput]:
        if self._sleeping:
            raise RuntimeError("the vLLM engine is asleep: call wake_up() before generate()")
        encoded = encode_prompts(self._tokenizer, prompts, params.max_new_tokens, self.context)
        engine = self.llm.llm_engine
        tag = next(self._batches)
        pending: dict[str, int] = {}
        for i, ids in enumerate(encoded):
            sp = self._vllm.SamplingParams(
                n=params.n, temperature=0.0 if params.greedy else params.temperature,
                top_p=1.0 if params.greedy else params.top_p, max_tokens=params.max_new_tokens,
                logprobs=0, seed=params.seed + i, output_kind=self._sp_mod.RequestOutputKind.FINAL_ONLY)
            request_id = f"dash-{tag}-{i}"
            engine.add_request(request_id, self._inputs_mod.TokensPrompt(prompt_token_ids=list(ids)), sp)
            pending[request_id] = i
        version = self._version
        self.completed_prompts = 0
        try:
            while pending:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM reports no unfinished requests but {len(pending)} of this batch "
                                       "never finished (aborted or dropped by the engine)")
                for out in engine.step():
                    if not out.finished or out.request_id not in pending:
                        continue
                    i = pending.pop(out.request_id)
                    self.completed_prompts += 1
                    yield GroupOutput(prompts[i], tuple(encoded[i]),
                                      tuple(self._completion(c) for c in out.outputs), version)
        finally:
            if pending:  # consumer stopped early or an error: free the engine of this batch
                engine.abort_request(list(pending))

    def _completion(self, c) -> Completion:
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a completion with finish_reason={c.finish_reason!r}")
        if c.logprobs is None or len(c.logprobs) != len(c.token_ids):
            raise RuntimeError("vLLM returned no per-token logprobs; SamplingParams(logprobs=0) was ignored")
        # logprobs: one dict[token_id, Logprob] per position; the sampled token is always a key.
        return Completion(token_ids=tuple(c.token_ids),
                          logprobs_sampler=tuple(pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)),
                          finish_reason=c.finish_reason, text=c.text)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        weights = check_weight_set(named_tensors, self._expected, self._optional)
        if self._backend != "ipc":
            raise RuntimeError(f"update_weights(named tensors) needs weight_transfer_backend='ipc'; with "
                               f"{self._backend!r} the learner pushes weights through sync_client()")
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        key = str(torch.cuda.get_device_properties(device.index).uuid) if device.type == "cuda" else "cpu"
        from torch.multiprocessing.reductions import reduce_tensor

        names, dtype_names, shapes, handles, keep_alive = [], [], [], [], []
        for name, tensor in weights.items():
            t = tensor.detach().to(device=device, dtype=self._dtype).contiguous()
            keep_alive.append(t)  # reduce_tensor's args do not own the storage (ipc_engine.py:392)
            names.append(name)
            dtype_names.append(str(t.dtype).split(".")[-1])
            shapes.append(list(t.shape))
            handles.append({key: reduce_tensor(t)[1]})
        self.llm.start_weight_update()
        self.llm.update_weights(self._wt_mod.WeightTransferUpdateRequest(update_info={
            "names": names, "dtype_names": dtype_names, "shapes": shapes, "ipc_handles": handles}))
        self.llm.finish_weight_update(weight_version=str(int(version)))
        self._version = int(version)

    def sync_client(self) -> "VLLMSyncClient":
        """The engine's side of vLLM's weight-sync handshake, for a trainer-side transfer engine."""
        return VLLMSyncClient(self)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Weights as the engine holds them, by checkpoint name. Real vLLM fuses layers (qkv, gate_up),
        so names match only for the fake; on a real engine this reads them with `LLM.apply_model`."""
        model = self.llm.apply_model(lambda m: {n: p.detach().cpu() for n, p in m.named_parameters()})[0]
        yield from model.items()

    def sleep(self, level: int = 1) -> None:
        """Free GPU memory while a colocated learner trains (needs enable_sleep_mode)."""
        self.llm.sleep(level=level)
        self._sleeping = True

    def wake_up(self) -> None:
        self.llm.wake_up()
        self._sleeping = False


class VLLMSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol (base.py:618: four methods taking plain dicts) over a
    `VLLMEngine`; `finish_weight_update` also stamps the adapter's integer policy version."""

    def __init__(self, engine: VLLMEngine) -> None:
        self._engine = engine

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._engine.llm.init_weight_transfer_engine(self._engine._wt_mod.WeightTransferInitRequest(init_info=init_info))

    def start_weight_update(self) -> None:
        self._engine.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._engine.llm.update_weights(self._engine._wt_mod.WeightTransferUpdateRequest(update_info=update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._engine.llm.finish_weight_update(weight_version=weight_version)
        if weight_version is not None:
            self._engine._version = int(weight_version)
