"""vLLM adapter through the fake vLLM: generation end to end, both weight paths end to end (the
"reload" worker extension and the native IPC handshake), the worker's engine lock across a native
update, a failed and an aborted update (vLLM's update session closed), the version checks, bad
input, where the engine core runs (`rollout.vllm_engine_core`), and hub model ids resolved from the
Hugging Face cache (a fake one under tmp: no network).

    PYTHONPATH=$PWD python -m pytest -q tests/test_vllm_adapter.py
"""
from __future__ import annotations

import contextlib
import os
import shutil
import types
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file
from torch.multiprocessing.reductions import reduce_tensor

from rollout_workers.config import RolloutConfig
from rollout_workers.engines import vllm_engine
from rollout_workers.engines.base import EngineOptions, SamplingParamsSpec, make_engine
from rollout_workers.engines.hf import HFEngine
from rollout_workers.engines.vllm_engine import EngineWeightsLost, VLLMEngine, checkpoint_shapes, load_vllm
from rollout_workers.model_dir import is_hub_id, resolve_model_dir
from rollout_workers.types import Prompt
from rollout_workers.worker import RolloutRequest, make_rollout_workers

FAKE = "tests.fake_vllm"
PROMPTS = [Prompt(f"v-{i}", f"Q: {i} + {i + 4} = ?\nA:" + " y" * (i % 2), str(2 * i + 4)) for i in range(4)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> VLLMEngine:
    # A small scheduler budget makes the fake finish the batch over several step() calls.
    return VLLMEngine(str(tiny_model_dir), vllm_module=FAKE, enable_sleep_mode=True,
                      llm_kwargs={"max_num_batched_tokens": 100})


def test_generation_end_to_end_streams_per_step(engine, tiny_model_dir):
    params = SamplingParamsSpec(n=3, max_new_tokens=10, seed=5)
    gen = engine.generate(PROMPTS, params)
    first = next(gen)
    # The batch is still in flight inside vLLM when the first group comes out.
    assert engine.llm.llm_engine.has_unfinished_requests()
    groups = [first] + list(gen)
    assert sorted(g.prompt.uid for g in groups) == sorted(p.uid for p in PROMPTS)
    assert not engine.llm.llm_engine.has_unfinished_requests()
    ref = HFEngine(str(tiny_model_dir))
    for g in groups:
        assert len(g.completions) == 3 and g.policy_version == 0
        assert list(g.prompt_token_ids) == engine.tokenizer(g.prompt.text)["input_ids"]
        for c in g.completions:
            assert c.finish_reason in ("stop", "length") and len(c.logprobs_sampler) == len(c.token_ids) >= 1
            assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True).rstrip("\ufffd")
            ids = torch.tensor([list(g.prompt_token_ids) + list(c.token_ids)])
            with torch.no_grad():
                logits = ref.model(input_ids=ids).logits[0, len(g.prompt_token_ids) - 1:-1]
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs_sampler), want, atol=1e-4, rtol=0)


def test_stopping_early_aborts_the_rest_of_the_batch(engine):
    gen = engine.generate(PROMPTS, SamplingParamsSpec(n=2, max_new_tokens=6))
    next(gen)
    assert engine.llm.llm_engine.has_unfinished_requests()
    gen.close()
    assert not engine.llm.llm_engine.has_unfinished_requests()


def test_identical_prompts_each_get_their_group(engine):
    twins = [Prompt("twin-a", "Q: 1 + 1 = ?\nA:", "2"), Prompt("twin-b", "Q: 1 + 1 = ?\nA:", "2")]
    groups = list(engine.generate(twins, SamplingParamsSpec(n=2, max_new_tokens=4)))
    assert sorted(g.prompt.uid for g in groups) == ["twin-a", "twin-b"]


def test_greedy_group_is_argmax_repeated(engine):
    (g,) = engine.generate(PROMPTS[:1], SamplingParamsSpec(n=3, max_new_tokens=5, greedy=True))
    assert len(g.completions) == 3 and len({c.token_ids for c in g.completions}) == 1
    ids = torch.tensor([list(g.prompt_token_ids) + list(g.completions[0].token_ids)])
    with torch.no_grad():
        logits = engine.llm.apply_model(lambda m: m(input_ids=ids).logits[0])[0]
    assert list(g.completions[0].token_ids) == logits[len(g.prompt_token_ids) - 1:-1].argmax(-1).tolist()


def test_reload_path_end_to_end(engine):
    """gloo / ray sync into vLLM: all-or-nothing, version stamped, prefix cache reset."""
    before = dict(engine.named_weights())
    resets = engine.llm.prefix_cache_resets
    new = random_weights(before)
    with pytest.raises(ValueError, match="missing"):
        engine.update_weights(list(new.items())[1:], version=3)
    assert engine.version == 0 and all(torch.equal(t, before[n]) for n, t in engine.named_weights())
    engine.update_weights(new.items(), version=3)
    assert engine.version == 3 and engine.llm.prefix_cache_resets == resets + 1
    after = dict(engine.named_weights())
    assert all(torch.equal(after[n], new[n]) for n in new)
    groups = list(engine.generate(PROMPTS[:1], SamplingParamsSpec(n=2, max_new_tokens=4)))
    assert groups[0].policy_version == 3


def test_reload_passes_only_a_file_path_through_collective_rpc(engine, monkeypatch):
    """The engine core in its own process (vLLM's default, every GPU) msgpack-encodes
    collective_rpc arguments and results: a tensor would arrive as a list. The fake refuses tensors
    there, as the real one would break on them; the adapter passes a safetensors file in shared
    memory instead, and removes it afterwards (the update and the read-back alike)."""
    with pytest.raises(TypeError, match="torch.Tensor reaches vLLM's engine core as a list"):
        engine.llm.collective_rpc("dash_reload_weights", args=([("model.norm.weight", torch.ones(64))],))
    used: list[str] = []
    real_weights_file = vllm_engine.weights_file

    @contextlib.contextmanager
    def recording(nbytes: int) -> Iterator[str]:
        with real_weights_file(nbytes) as path:
            used.append(path)
            assert os.path.exists(path)
            yield path

    monkeypatch.setattr(vllm_engine, "weights_file", recording)
    new = random_weights(dict(engine.named_weights()))
    engine.update_weights(new.items(), version=engine.version + 1)
    served = dict(engine.named_weights())
    assert all(torch.equal(served[n], new[n]) for n in new)
    assert len(used) == 3 and not any(os.path.exists(p) for p in used)
    if Path("/dev/shm").is_dir():
        assert all(p.startswith("/dev/shm/") for p in used)


def random_weights(current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new checkpoint-named set; the tiny model ties lm_head to the embedding, so it has none."""
    return {n: torch.randn_like(t) * 0.05 for n, t in current.items() if n != "lm_head.weight"}


def ipc_update_info(weights: dict[str, torch.Tensor]) -> dict:
    """What a trainer-side IPC engine sends, with the fake's CPU stand-in for a GPU UUID."""
    return {"names": list(weights), "dtype_names": [str(t.dtype).split(".")[-1] for t in weights.values()],
            "shapes": [list(t.shape) for t in weights.values()],
            "ipc_handles": [{"cpu": reduce_tensor(t)[1]} for t in weights.values()]}


@pytest.fixture
def ipc_engine(tiny_model_dir, monkeypatch) -> VLLMEngine:
    # The adapter itself must set VLLM_ALLOW_INSECURE_SERIALIZATION before building the LLM:
    # vLLM's engine core cannot decode IPC handles otherwise (the fake raises TypeError as it does).
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    return VLLMEngine(str(tiny_model_dir), vllm_module=FAKE, weight_transfer_backend="ipc")


def test_ipc_update_handshake_end_to_end(ipc_engine):
    assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    new = random_weights(dict(ipc_engine.named_weights()))
    ipc_engine.update_weights(new.items(), version=4)
    assert ipc_engine.version == 4 and ipc_engine.llm.get_weight_version() == "4"
    assert ipc_engine.llm.prefix_cache_resets == 1
    served = dict(ipc_engine.named_weights())
    assert all(torch.equal(served[n], new[n]) for n in new)


def test_failed_native_update_refuses_to_sample_until_a_complete_update(ipc_engine):
    """A native update that fails after start_weight_update (when real vLLM has moved its layers to
    the meta device) must never let the engine generate on what is left."""
    new = random_weights(dict(ipc_engine.named_weights()))
    ipc_engine.start_update()
    bad = ipc_update_info(new)
    bad["shapes"] = bad["shapes"][1:]
    with pytest.raises(ValueError, match="`shapes` should be of the same size"):
        ipc_engine.update_chunk(bad)
    with pytest.raises(EngineWeightsLost, match="native weight update failed midway"):
        next(ipc_engine.generate(PROMPTS[:1], SamplingParamsSpec(n=1, max_new_tokens=2)))
    ipc_engine.update_weights(new.items(), version=2)
    assert ipc_engine.version == 2
    assert len(list(ipc_engine.generate(PROMPTS[:1], SamplingParamsSpec(n=1, max_new_tokens=2)))) == 1


def test_an_aborted_update_closes_vllms_update_session(ipc_engine):
    """vLLM 0.33 keeps an update session open from start_weight_update to finish_weight_update
    (gpu_worker.py `_weight_update_active`): a second start, or releasing the trainer connection,
    raises while it is open. An abort must close it, so start -> abort -> start -> chunk -> finish
    works, while the engine refuses to sample between the abort and the complete update."""
    new = random_weights(dict(ipc_engine.named_weights()))
    ipc_engine.start_update()
    ipc_engine.abort_update("learner rank 0 failed")
    with pytest.raises(RuntimeError, match="without a matching start_weight_update"):
        ipc_engine.llm.finish_weight_update()  # the abort itself closed vLLM's session
    with pytest.raises(EngineWeightsLost, match="aborted: learner rank 0 failed"):
        next(ipc_engine.generate(PROMPTS[:1], SamplingParamsSpec(n=1, max_new_tokens=2)))
    ipc_engine.start_update()  # without the close, vLLM raises: a weight update is already active
    ipc_engine.update_chunk(ipc_update_info(new))
    ipc_engine.finish_update(6)
    assert ipc_engine.version == 6 and ipc_engine.llm.get_weight_version() == "6"
    served = dict(ipc_engine.named_weights())
    assert all(torch.equal(served[n], new[n]) for n in new)
    assert len(list(ipc_engine.generate(PROMPTS[:1], SamplingParamsSpec(n=1, max_new_tokens=2)))) == 1
    # An abort after a failed chunk (vLLM's worker closed the session itself), then a re-init of
    # the trainer connection (its shutdown is refused during a session) and a complete update.
    ipc_engine.start_update()
    bad = ipc_update_info(new)
    bad["names"] = bad["names"][1:]
    with pytest.raises(ValueError, match="should be of the same size"):
        ipc_engine.update_chunk(bad)
    ipc_engine.abort_update("chunk failed")
    ipc_engine.start_update()
    ipc_engine.abort_update("restart")
    ipc_engine.init_transfer({"packed": False})
    assert ipc_engine.llm.open_transfer_engines == 1
    ipc_engine.update_weights(new.items(), version=7)
    assert ipc_engine.version == 7


def test_fake_keeps_vllms_update_session(ipc_engine):
    """The fake's session rules are 0.33.0's (gpu_worker.py:1533-1646), so the test above means
    something: a second start while one is open raises, and so do a chunk or finish without one and
    a transfer shutdown during one."""
    llm = ipc_engine.llm
    with pytest.raises(RuntimeError, match="finish_weight_update called without a matching start_weight_update"):
        llm.finish_weight_update()
    llm.start_weight_update()
    with pytest.raises(RuntimeError, match="called while a weight update is already active"):
        llm.start_weight_update()
    with pytest.raises(RuntimeError, match="Cannot release a trainer connection during a weight update"):
        llm.shutdown_weight_transfer_engine()
    llm.finish_weight_update()
    with pytest.raises(RuntimeError, match="start_weight_update must be called before update_weights"):
        llm.update_weights({"update_info": {}})
    llm.shutdown_weight_transfer_engine()


def test_reinit_shuts_the_previous_transfer_engine_down(ipc_engine):
    """A worker restart re-opens the transfer on the surviving engines: the old connection (a NCCL
    communicator on GPUs) must be shut down first, not leaked."""
    assert ipc_engine.llm.open_transfer_engines == 1
    ipc_engine.init_transfer({"packed": False})
    ipc_engine.init_transfer({"packed": False})
    assert ipc_engine.llm.open_transfer_engines == 1


@pytest.mark.slow
def test_worker_holds_its_engine_lock_through_a_native_update(ray_local, tiny_model_dir):
    """From vllm_start_weight_update to vllm_finish_weight_update no batch may step the engine
    (the calls arrive on different threads of the actor)."""
    import ray

    cfg = RolloutConfig(engine="vllm", engine_lock_timeout_s=0.5, reward_fn="tests.reward_fns:odd_length")
    (worker,) = make_rollout_workers(cfg, str(tiny_model_dir), vllm_module=FAKE, num_gpus_per_worker=0,
                                     name_prefix="lock", weight_transfer_backend="ipc")
    try:
        request = RolloutRequest(tuple(PROMPTS[:2]), 0, SamplingParamsSpec(n=2, max_new_tokens=3))
        new = {n: torch.randn_like(t) * 0.05 for n, t in load_file(str(tiny_model_dir / "model.safetensors")).items()}
        ray.get(worker.vllm_start_weight_update.remote(), timeout=60)
        with pytest.raises(ray.exceptions.RayTaskError, match=r"generate waited rollout\.engine_lock_timeout_s=0\.5"):
            ray.get(next(worker.generate.remote(request)), timeout=60)
        ray.get(worker.vllm_update_weights.remote(ipc_update_info(new)), timeout=60)
        assert ray.get(worker.vllm_finish_weight_update.remote("5"), timeout=60) == 5
        groups = [ray.get(ref, timeout=60) for ref in worker.generate.remote(request)]
        assert [g.policy_version for g in groups] == [5, 5]
        with pytest.raises(ray.exceptions.RayTaskError, match="without vllm_start_weight_update"):
            ray.get(worker.vllm_update_weights.remote(ipc_update_info(new)), timeout=60)
    finally:
        ray.kill(worker)


def test_sleep_blocks_generation_until_wake_up(engine):
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        next(engine.generate(PROMPTS[:1], SamplingParamsSpec(n=1, max_new_tokens=2)))
    engine.wake_up()
    assert len(list(engine.generate(PROMPTS[:1], SamplingParamsSpec(n=1, max_new_tokens=2)))) == 1


def test_version_check_names_installed_and_supported():
    """Generation and the reload path accept the CPU build (0.32) and 0.33; the native GPU
    transfers need 0.33; each error names the installed and the needed versions."""
    def vllm_of(version: str) -> types.ModuleType:
        module = types.ModuleType("vllm")
        module.__version__ = version
        return module

    assert load_vllm(vllm_of("0.32.0"), "reload").__version__ == "0.32.0"
    assert load_vllm(vllm_of("0.33.1"), "nccl").__version__ == "0.33.1"
    with pytest.raises(RuntimeError, match=r"vLLM 0\.32\.0 is installed .*'nccl' needs vLLM 0\.33\.x .*CPU build is 0\.32"):
        load_vllm(vllm_of("0.32.0"), "nccl")
    with pytest.raises(RuntimeError, match=r"vLLM 0\.10\.2 is installed .*'reload' needs vLLM 0\.32\.x or 0\.33\.x"):
        load_vllm(vllm_of("0.10.2"), "reload")
    with pytest.raises(ImportError, match=r"needs vLLM 0\.33\.x for weight path 'ipc'"):
        load_vllm("no_such_vllm_module", "ipc")


def test_bad_input(engine):
    with pytest.raises(ValueError, match="'e-0' is empty"):
        next(engine.generate([Prompt("e-0", "", "1")], SamplingParamsSpec(n=1)))
    with pytest.raises(ValueError, match="'l-0' has .* tokens, longer"):
        next(engine.generate([Prompt("l-0", "7 " * 300, "1")], SamplingParamsSpec(n=1)))
    assert not engine.llm.llm_engine.has_unfinished_requests()  # nothing was queued


def test_engine_core_placement_is_configured(tiny_model_dir, monkeypatch):
    """`rollout.vllm_engine_core`: auto = in the worker's process on CPU; process = vLLM's own
    engine-core process (the GPU layout) on CPU too. vLLM reads VLLM_ENABLE_V1_MULTIPROCESSING
    when the LLM is built."""
    with pytest.raises(ValueError, match=r"rollout\.vllm_engine_core must be one of \['auto', 'process', 'inline'\]"):
        RolloutConfig(vllm_engine_core="separate")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "unset")
    for core, flag in (("auto", "0" if not torch.cuda.is_available() else "1"), ("process", "1"), ("inline", "0")):
        make_engine(RolloutConfig(engine="vllm", vllm_engine_core=core), str(tiny_model_dir),
                    EngineOptions(vllm_module=FAKE))
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == flag, core


def test_cores_reserved_for_vllms_scheduler_are_configured(tiny_model_dir, monkeypatch):
    """`rollout.vllm_cpu_reserved_cores` reaches vLLM (VLLM_CPU_NUM_OF_RESERVED_CPU, read when its
    engine core spawns the model's process) only where it means something: the CPU build with its
    engine core in its own process (never on a GPU). -1 leaves vLLM's own rule."""
    with pytest.raises(ValueError, match=r"rollout\.vllm_cpu_reserved_cores must be >= 0 \(or -1"):
        RolloutConfig(vllm_cpu_reserved_cores=-2)
    on_cpu = not torch.cuda.is_available()
    for core, reserved, expected in (("process", 0, "0"), ("process", 2, "2"), ("process", -1, None),
                                     ("inline", 0, None), ("auto", 0, None)):
        monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
        make_engine(RolloutConfig(engine="vllm", vllm_engine_core=core, vllm_cpu_reserved_cores=reserved),
                    str(tiny_model_dir), EngineOptions(vllm_module=FAKE))
        assert os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU") == (expected if on_cpu else None), (core, reserved)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache under tmp (HF_HOME / HF_HUB_CACHE), offline."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once, at import.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_model(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """Lay `model_dir` out as the hub cache does: models--Org--Name/snapshots/<commit>/ + refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_to_its_cached_snapshot(hf_cache, tiny_model_dir):
    """model.path="Org/Name" (a hub id, no network): the engine reads the cached snapshot, where
    `checkpoint_shapes` would otherwise glob a literal "Org/Name" directory."""
    snapshot = cache_model(hf_cache, "DashTest/Tiny", tiny_model_dir)
    assert is_hub_id("DashTest/Tiny") and is_hub_id("Qwen/Qwen2.5-0.5B")
    assert not any(is_hub_id(p) for p in ("./DashTest/Tiny", "/abs/model", "~/model", "a/b/c", "model", "Org/bad name",
                                          str(tiny_model_dir)))
    assert Path(resolve_model_dir("DashTest/Tiny")) == snapshot
    assert resolve_model_dir(str(tiny_model_dir)) == str(tiny_model_dir)
    assert checkpoint_shapes(resolve_model_dir("DashTest/Tiny")) == checkpoint_shapes(str(tiny_model_dir))
    engine = VLLMEngine("DashTest/Tiny", vllm_module=FAKE)
    (group,) = engine.generate(PROMPTS[:1], SamplingParamsSpec(n=2, max_new_tokens=3))
    assert len(group.completions) == 2


def test_hub_id_not_in_the_cache_names_the_id(hf_cache, tiny_model_dir, monkeypatch):
    """Offline, an id the cache lacks (or holds without safetensors weights) is an error naming it;
    online, only config / weights / tokenizer files are downloaded, and a failed download names the
    id too."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(FileNotFoundError, match=r"hub model 'DashTest/Missing' is not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model_dir("DashTest/Missing")
    partial = cache_model(hf_cache, "DashTest/ConfigOnly", tiny_model_dir)
    for f in partial.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="'DashTest/ConfigOnly'"):
        resolve_model_dir("DashTest/ConfigOnly")
    with pytest.raises(FileNotFoundError, match="neither a local directory nor"):
        resolve_model_dir("./no/such/dir")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def snapshot_download(repo_id: str, local_files_only: bool = False, allow_patterns=None, **kwargs):
        calls.append((repo_id, local_files_only, tuple(allow_patterns or ())))
        raise LocalEntryNotFoundError("no connection (test)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(FileNotFoundError, match=r"hub model 'DashTest/Missing' is not in the .* downloading it failed"):
        resolve_model_dir("DashTest/Missing")
    assert [c[:2] for c in calls] == [("DashTest/Missing", True), ("DashTest/Missing", False)]
    assert "*.safetensors" in calls[1][2] and not any(p.endswith((".bin", ".pth", ".gguf")) for p in calls[1][2])
