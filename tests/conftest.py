"""Shared test set-up: pinned threads (2-core machines), CPU DeepSpeed, a local Ray for actor tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Ray workers inherit the environment: make the repo importable there without an install.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dash_rl_torch_extensions"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(2)


def ray_env() -> dict:
    """The runtime env every test cluster gives its actors (the repo importable, CPU DeepSpeed)."""
    return {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                         "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}}


def start_local_ray() -> None:
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env=ray_env())


def kill_and_confirm(handle, probe: str, timeout_s: float = 60.0) -> None:
    """`ray.kill` is asynchronous: a call sent right after it can still be served. Kill, then call
    the actor's no-argument method `probe` until Ray reports the actor dead (each call is a real
    round trip, bounded by `timeout_s`), so the next step of a test sees a dead actor."""
    import time

    import ray
    from ray.exceptions import RayActorError

    ray.kill(handle)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(getattr(handle, probe).remote(), timeout=timeout_s)
        except RayActorError:
            return
    raise TimeoutError(f"actor still answers {timeout_s} s after ray.kill")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (about 3 s to start)."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def own_ray():
    """For a module that needs its own Ray (declared GPUs, several nodes): stops the session's
    local Ray if it runs, and starts it again afterwards, so later modules find it as they left it
    (module-scoped actors of earlier modules are gone by then). Yields the runtime env for the
    module's own `ray.init`."""
    import ray

    restore = ray.is_initialized()
    if restore:
        ray.shutdown()
    yield ray_env()
    ray.shutdown()
    if restore:
        start_local_ray()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init tiny Qwen2 model + trained tokenizer in HF format."""
    from launch.tiny_model import _default_texts, write_tiny_model_dir

    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny"), _default_texts(), hidden_size=64, layers=2, heads=4)
