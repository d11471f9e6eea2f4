"""vLLM adapter through the fake vLLM: generation end to end, the weight-update handshake end to
end, the version check, bad input.

    PYTHONPATH=$PWD python -m pytest -q tests/test_vllm_adapter.py
"""
from __future__ import annotations

import types

import pytest
import torch

from rollout_workers.engines.base import SamplingParamsSpec
from rollout_workers.engines.hf import HFEngine
from rollout_workers.engines.vllm_engine import VLLMEngine, load_vllm
from rollout_workers.types import Prompt

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
            assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            ids = torch.tensor([list(g.prompt_token_ids) + list(c.token_ids)])
            with torch.no_grad():
                logits = ref.model(input_ids=ids).logits[0, len(g.prompt_token_ids) - 1:-1]
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs_sampler), want, atol=1e-4, rtol=0)


def test_weight_update_handshake_end_to_end(engine):
    before = dict(engine.named_weights())
    new = {n: torch.randn_like(t) * 0.05 for n, t in before.items()}
    with pytest.raises(ValueError, match="missing"):
        engine.update_weights(list(new.items())[1:], version=3)
    assert engine.version == 0 and all(torch.equal(t, before[n]) for n, t in engine.named_weights())
    engine.update_weights(new.items(), version=3)
    assert engine.version == 3
    assert engine.llm.get_weight_version() == "3"
    after = dict(engine.named_weights())
    assert all(torch.equal(after[n], new[n]) for n in new)
    groups = list(engine.generate(PROMPTS[:1], SamplingParamsSpec(n=2, max_new_tokens=4)))
    assert groups[0].policy_version == 3


def test_sleep_blocks_generation_until_wake_up(engine):
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        next(engine.generate(PROMPTS[:1], SamplingParamsSpec(n=1, max_new_tokens=2)))
    engine.wake_up()
    assert len(list(engine.generate(PROMPTS[:1], SamplingParamsSpec(n=1, max_new_tokens=2)))) == 1


def test_version_check_names_installed_and_supported():
    old = types.ModuleType("vllm")
    old.__version__ = "0.10.2"
    with pytest.raises(RuntimeError, match=r"vLLM 0\.10\.2 is installed .*supports vLLM >=0\.33\.0,<0\.34"):
        load_vllm(old)
    with pytest.raises(ImportError, match="needs vLLM >=0.33.0,<0.34"):
        load_vllm("no_such_vllm_module")


def test_bad_input(engine):
    with pytest.raises(ValueError, match="'e-0' is empty"):
        next(engine.generate([Prompt("e-0", "", "1")], SamplingParamsSpec(n=1)))
    with pytest.raises(ValueError, match="'l-0' has .* tokens, longer"):
        next(engine.generate([Prompt("l-0", "7 " * 300, "1")], SamplingParamsSpec(n=1)))
    assert not engine.llm.llm_engine.has_unfinished_requests()  # nothing was queued
