"""vLLM adapter through the fake vLLM: generation end to end, both weight paths end to end (the
"reload" worker extension and the native IPC handshake), the worker's engine lock across a native
update, a failed update, the version checks, bad input.

    PYTHONPATH=$PWD python -m pytest -q tests/test_vllm_adapter.py
"""
from __future__ import annotations

import os
import types

import pytest
import torch
from safetensors.torch import load_file
from torch.multiprocessing.reductions import reduce_tensor

from rollout_workers.engines.base import SamplingParamsSpec
from rollout_workers.engines.hf import HFEngine
from rollout_workers.config import RolloutConfig
from rollout_workers.engines.vllm_engine import EngineWeightsLost, VLLMEngine, load_vllm
from rollout_workers.types import Prompt
from rollout_workers.worker import RolloutRequest, make_rollout_workers

FAKE = "rollout_workers.fake_vllm"
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
