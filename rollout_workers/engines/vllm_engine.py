"""vLLM engine adapter (vLLM >= 0.33.0, < 0.34), for GPU clusters. Tests drive it through the
fake vLLM (`rollout_workers.fake_vllm`), injected as `vllm_module`.

Streaming: the whole preemptive batch is queued at once with `LLM.enqueue` (entrypoints/llm.py:483;
so vLLM's continuous batching and prefix caching see every request, as the DASH paper's single big
engine call wants), then `llm.llm_engine.step()` (v1/engine/llm_engine.py:319) is driven here
exactly as `LLM.wait_for_completion` -> `_run_engine` does (entrypoints/common/offline.py:589), and
each request is yielded the step it finishes. The sync `LLM` was chosen over `AsyncLLM` because a
Ray actor method that is a plain generator needs no event loop, and `LLM.generate` on sub-batches
would shrink the batch vLLM can schedule.

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
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator, Sequence

import torch
from packaging.version import Version
from safetensors import safe_open
from transformers import AutoConfig

from rollout_workers.engines.base import (TORCH_DTYPES, Engine, GroupOutput, SamplingParamsSpec, check_weight_set,
                                          encode_prompts)
from rollout_workers.seeding import derive_seed
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
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"VLLMEngine dtype must be one of {list(TORCH_DTYPES)}, got {dtype!r}")
        if weight_transfer_backend not in ("ipc", "nccl"):
            raise ValueError(f"VLLMEngine weight_transfer_backend must be 'ipc' or 'nccl', got {weight_transfer_backend!r}")
        self._vllm = load_vllm(vllm_module)
        root = self._vllm.__name__
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
        self._dtype = TORCH_DTYPES[dtype]
        self._version = 0
        self._sleeping = False

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
        # vLLM refuses n > 1 with greedy sampling (sampling_params.py:769): sample once, copy G times.
        sampling = [self._vllm.SamplingParams(
            n=1 if params.greedy else params.n, temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p, max_tokens=params.max_new_tokens, logprobs=0,
            seed=derive_seed(params.seed, "prompt", i)) for i in range(len(encoded))]
        # enqueue() renders and queues every request (it sets output_kind=FINAL_ONLY) and returns
        # the internal request ids, in prompt order.
        internal_ids = self.llm.enqueue([self._inputs_mod.TokensPrompt(prompt_token_ids=list(ids)) for ids in encoded],
                                        sampling, use_tqdm=False)
        # A RequestOutput carries the *external* id (a counter inside LLM), not enqueue's internal one,
        # so outputs are matched back by their prompt token ids (first-in first-out among equal prompts).
        waiting: dict[tuple[int, ...], list[int]] = {}
        for i, ids in enumerate(encoded):
            waiting.setdefault(tuple(ids), []).append(i)
        pending = dict(enumerate(internal_ids))
        version = self._version
        self.completed_prompts = 0
        try:
            while pending:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM reports no unfinished requests but {len(pending)} of this batch "
                                       "never finished (aborted or dropped by the engine)")
                for out in engine.step():
                    queue = waiting.get(tuple(out.prompt_token_ids or ()))
                    if not out.finished or not queue:
                        continue
                    i = queue.pop(0)
                    del pending[i]
                    self.completed_prompts += 1
                    completions = tuple(self._completion(c) for c in out.outputs)
                    if params.greedy:
                        completions = completions * params.n
                    yield GroupOutput(prompts[i], tuple(encoded[i]), completions, version)
        finally:
            if pending:  # consumer stopped early or an error: free the engine of this batch
                engine.abort_request(list(pending.values()), internal=True)

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
        """Weights as the engine holds them, read with `LLM.apply_model` (llm.py:604). Real vLLM fuses
        layers (qkv_proj, gate_up_proj), so names equal checkpoint names only on the fake; the real
        one also needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 to ship the callable. Tests only."""
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
