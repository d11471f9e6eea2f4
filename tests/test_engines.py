"""HF engine: shapes, the batch-wise cut at the first EOS, logprobs vs a teacher-forced pass, determinism, greedy, chunking, bad input,
and token ids carried from load time (`Prompt.token_ids`) equal to the engine's own encoding.
The engine registry: lookups, an unknown name refused from every entry point, its facts checked
against the engine classes' capabilities, and an import that stays cheap.

    PYTHONPATH=$PWD python -m pytest -q -p no:cacheprovider tests/test_engines.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from launch.data.model_prompts import prompts_for_model
from launch.data.synthetic import synthetic_problems
from rollout_workers.config import RolloutConfig
from rollout_workers.engines.base import (Engine, EngineOptions, NativeWeightTransfer, SamplingParamsSpec, Sleepable,
                                          make_engine)
from rollout_workers.engines.hf import CutRow, HFEngine, ReservedLayer, cut_at_eos
from rollout_workers.engines.registry import ENGINES, engine_names, get_engine
from rollout_workers.types import Prompt

ROOT = Path(__file__).resolve().parents[1]
UNKNOWN = r"rollout\.engine must be one of \['transformers', 'vllm'\], got 'nope'"
"""The registry's refusal of an unknown engine name, whichever entry point asked."""

PROMPTS = [Prompt(f"t-{i}", f"Q: {i} + {2 * i + 1} = ?\nA:" + " x" * (i % 3), str(3 * i + 1)) for i in range(5)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> HFEngine:
    # A small budget forces several generate() chunks for 5 prompts x G=3.
    return HFEngine(str(tiny_model_dir), gen_batch_tokens=150, seed=0)


def _teacher_forced_logprobs(engine: HFEngine, prompt_ids, token_ids, temperature: float) -> torch.Tensor:
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0].float()  # (P+T, V)
    logits = logits[len(prompt_ids) - 1:-1] / temperature  # (T, V): position t predicts token t
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]  # (T,)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forced_pass(engine, temperature):
    params = SamplingParamsSpec(n=3, temperature=temperature, top_p=1.0, max_new_tokens=12, seed=3)
    groups = list(engine.generate(PROMPTS, params))
    assert [g.prompt.uid for g in groups] == [p.uid for p in PROMPTS]
    for g in groups:
        assert len(g.completions) == 3 and g.policy_version == 0
        assert list(g.prompt_token_ids) == engine.tokenizer(g.prompt.text)["input_ids"]
        for c in g.completions:
            assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs_sampler) == len(c.token_ids)
            eos_at = [i for i, t in enumerate(c.token_ids) if t == engine.tokenizer.eos_token_id]
            if c.finish_reason == "stop":
                assert eos_at == [len(c.token_ids) - 1]  # EOS kept, nothing after it
            else:
                assert c.finish_reason == "length" and not eos_at and len(c.token_ids) == 12
            assert engine.tokenizer.pad_token_id not in c.token_ids
            want = _teacher_forced_logprobs(engine, g.prompt_token_ids, c.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(c.logprobs_sampler), want, atol=1e-4, rtol=0)


def test_top_p_logprobs_are_those_of_the_renormalised_nucleus(engine):
    temperature, top_p = 0.8, 0.5
    groups = list(engine.generate(PROMPTS[:2], SamplingParamsSpec(n=2, temperature=temperature, top_p=top_p,
                                                                  max_new_tokens=6, seed=4)))
    for g in groups:
        for c in g.completions:
            ids = torch.tensor([list(g.prompt_token_ids) + list(c.token_ids)])
            with torch.no_grad():
                logits = engine.model(input_ids=ids).logits[0, len(g.prompt_token_ids) - 1:-1].double()
            for t, tok in enumerate(c.token_ids):
                probs = torch.softmax(logits[t] / temperature, -1)
                order = probs.argsort(descending=True)
                before = probs[order].cumsum(0) - probs[order]  # mass strictly above each token
                nucleus = order[before < top_p]  # smallest prefix reaching top_p
                assert tok in nucleus.tolist()
                want = torch.log(probs[tok] / probs[nucleus].sum())
                assert abs(c.logprobs_sampler[t] - float(want)) < 1e-4


def test_seed_determinism_and_variety(engine):
    params = SamplingParamsSpec(n=4, max_new_tokens=8, seed=11)
    a = [[c.token_ids for c in g.completions] for g in engine.generate(PROMPTS[:2], params)]
    b = [[c.token_ids for c in g.completions] for g in engine.generate(PROMPTS[:2], params)]
    c = [[c.token_ids for c in g.completions] for g in engine.generate(PROMPTS[:2], SamplingParamsSpec(n=4, max_new_tokens=8, seed=12))]
    assert a == b
    assert a != c
    assert len(set(a[0])) > 1  # the G samples of one prompt differ (random-init model, T=1)


def test_greedy_is_argmax_and_identical_across_group(engine):
    groups = list(engine.generate(PROMPTS[:2], SamplingParamsSpec(n=2, max_new_tokens=6, greedy=True)))
    for g in groups:
        a, b = g.completions
        assert a.token_ids == b.token_ids
        ids = torch.tensor([list(g.prompt_token_ids) + list(a.token_ids)])
        with torch.no_grad():
            logits = engine.model(input_ids=ids).logits[0]
        argmax = logits[len(g.prompt_token_ids) - 1:-1].argmax(-1).tolist()
        assert list(a.token_ids) == argmax


def test_groups_are_yielded_per_chunk_before_the_batch_ends(engine):
    params = SamplingParamsSpec(n=3, max_new_tokens=8, seed=0)
    lens = [len(engine.tokenizer(p.text)["input_ids"]) for p in PROMPTS]
    chunks = engine.chunks(lens, 3, 8)
    assert len(chunks) >= 2 and all(len(c) * 3 * (max(lens[i] for i in c) + 8) <= 150 or len(c) == 1 for c in chunks)
    gen = engine.generate(PROMPTS, params)
    first = next(gen)  # only the first chunk has run: the generator is lazy per chunk
    assert first.prompt.uid == PROMPTS[0].uid
    rest = list(gen)
    assert len(rest) == len(PROMPTS) - 1


def test_update_weights_all_or_nothing(engine, tiny_model_dir):
    before = {n: t.clone() for n, t in engine.named_weights()}
    new = [(n, torch.full_like(t, 0.01)) for n, t in before.items()]
    bad_shape = new[:-1] + [(new[-1][0], torch.zeros(3))]
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights(bad_shape, version=5)
    with pytest.raises(ValueError, match="missing"):
        engine.update_weights(new[:-1], version=5)
    with pytest.raises(ValueError, match="unknown"):
        engine.update_weights(new + [("not.a.weight", torch.zeros(1))], version=5)
    assert engine.version == 0
    for n, t in engine.named_weights():
        assert torch.equal(t, before[n])
    other = HFEngine(str(tiny_model_dir))
    other.update_weights(new, version=5)
    assert other.version == 5
    assert all(torch.equal(t, torch.full_like(t, 0.01)) for _, t in other.named_weights())
    groups = list(other.generate(PROMPTS[:1], SamplingParamsSpec(n=1, max_new_tokens=2)))
    assert groups[0].policy_version == 5


def test_bad_input_is_refused_clearly(engine):
    params = SamplingParamsSpec(n=2, max_new_tokens=8)
    with pytest.raises(ValueError, match="'empty-1' is empty"):
        list(engine.generate([PROMPTS[0], Prompt("empty-1", "", "0")], params))
    too_long = Prompt("long-1", "1 " * 400, "0")
    with pytest.raises(ValueError, match="'long-1' has .* tokens, longer than the engine's limit of 248"):
        list(engine.generate([too_long], params))
    with pytest.raises(ValueError, match="group size G"):
        SamplingParamsSpec(n=0)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
"""A ChatML-like template for the tiny tokenizer (which has none), so that a chat-templated prompt
can be sampled by the tiny model."""


def test_load_time_token_ids_are_the_engines_own(engine, tiny_model_dir, tmp_path):
    """The driver tokenizes each prompt once at load (`prompts_for_model` -> `Prompt.token_ids`) and
    the engine samples those ids as they are: they must be exactly the ids the engine makes itself
    from the text, for a plain prompt and a chat-templated one, and sampling gives the same groups."""
    from transformers import AutoTokenizer

    chat_dir = tmp_path / "tiny_chat"
    shutil.copytree(tiny_model_dir, chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(chat_dir)
    problems = synthetic_problems(["add"], 2, 4, 0, "train")
    params = SamplingParamsSpec(n=2, max_new_tokens=6, seed=5)
    for model_dir, eng in ((tiny_model_dir, engine), (chat_dir, HFEngine(str(chat_dir), seed=0))):
        loaded = prompts_for_model(problems, str(model_dir), "auto", "boxed")
        chat = model_dir == chat_dir
        assert all(p.text.startswith("<|system|>") == chat for p in loaded)
        assert all(p.token_ids for p in loaded)
        bare = [replace(p, token_ids=None) for p in loaded]
        own, carried = list(eng.generate(bare, params)), list(eng.generate(loaded, params))
        assert [g.prompt_token_ids for g in own] == [p.token_ids for p in loaded]
        assert [g.prompt_token_ids for g in carried] == [p.token_ids for p in loaded]
        assert [[c.token_ids for c in g.completions] for g in own] == \
            [[c.token_ids for c in g.completions] for g in carried]


def test_carried_token_ids_are_sampled_as_they_are(engine):
    """The engine does not re-tokenize a prompt that carries ids (its length check reads them too)."""
    prompt = replace(PROMPTS[0], token_ids=tuple(engine.tokenizer(PROMPTS[1].text)["input_ids"]))
    (group,) = engine.generate([prompt], SamplingParamsSpec(n=1, max_new_tokens=2, greedy=True))
    assert group.prompt_token_ids == prompt.token_ids
    too_long = replace(PROMPTS[0], token_ids=(5,) * 400)
    with pytest.raises(ValueError, match="has 400 tokens, longer than the engine's limit"):
        list(engine.generate([too_long], SamplingParamsSpec(n=1)))


def test_prompt_is_prefilled_once_per_group_not_per_sample(engine):
    """Shared prefill: the prompt tokens go through the model for B rows, never B x G."""
    calls: list[tuple[int, int]] = []
    hook = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        prompts, n = PROMPTS[:2], 4
        params = SamplingParamsSpec(n=n, max_new_tokens=4, seed=1)  # both prompts fit one chunk
        width = max(len(engine.tokenizer(p.text)["input_ids"]) for p in prompts)
        groups = list(engine.generate(prompts, params))
    finally:
        hook.remove()
    assert [len(g.completions) for g in groups] == [n, n]
    assert calls[0] == (2, width - 1)  # one prefill of the prompts, all but their last token
    assert calls[1] == (2 * n, 1)  # then one token per step for every sample
    assert all(length == 1 and rows <= 2 * n for rows, length in calls[2:])  # (ended rows leave the batch)


def test_ended_rows_leave_the_batch_and_the_rest_keep_their_cache(engine):
    """An EOS takes its row out of the decode batch and its KV cache (HFEngine._decode): the
    steps after it run fewer rows, and every completion, those of the rows that stayed
    included, still has the logprobs of a teacher-forced pass (a cache row left behind or
    misaligned would change them)."""
    calls: list[tuple[int, int]] = []  # (rows, tokens) of each forward: prefills run > 1 token
    hook = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        params = SamplingParamsSpec(n=4, temperature=1.0, max_new_tokens=10, seed=11)
        groups = list(engine.generate(PROMPTS, params))
    finally:
        hook.remove()
    completions = [(g, c) for g in groups for c in g.completions]
    assert {c.finish_reason for _, c in completions} == {"stop", "length"}, "the seed should give both kinds"
    shrank = [a[1] == b[1] == 1 and b[0] < a[0] for a, b in zip(calls, calls[1:])]  # decode step after decode step
    assert any(shrank), f"no decode step ran fewer rows than the one before it: {calls}"
    for g, c in completions:
        want = _teacher_forced_logprobs(engine, g.prompt_token_ids, c.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(c.logprobs_sampler), want, atol=1e-4, rtol=0)


def test_reserved_cache_layer_holds_what_transformers_own_layer_holds():
    """`ReservedLayer` (KV written in place into a reserved buffer) against transformers'
    `DynamicLayer` (grown by torch.cat) through what a decode does: a prefill, the G-fold repeat,
    steps, rows leaving, and steps past the reserved capacity (it grows): the same keys and
    values, bit for bit, at every point."""
    from transformers.cache_utils import DynamicLayer

    gen = torch.Generator().manual_seed(0)
    kv = lambda n, t: (torch.randn(n, 2, t, 4, generator=gen), torch.randn(n, 2, t, 4, generator=gen))  # (N, H, T, D)
    reserved, dynamic = ReservedLayer(capacity=6), DynamicLayer()
    both = lambda: [(layer.update(*step), layer.get_seq_length()) for layer in (reserved, dynamic)]

    def check(out):
        (keys_r, values_r), length_r = out[0]
        (keys_d, values_d), length_d = out[1]
        assert length_r == length_d == keys_d.shape[-2]
        assert torch.equal(keys_r, keys_d) and torch.equal(values_r, values_d)

    step = kv(2, 3)  # prefill: 2 prompts, 3 tokens
    check(both())
    for layer in (reserved, dynamic):
        layer.batch_repeat_interleave(3)  # G = 3
    for t in range(2):
        step = kv(6, 1)
        check(both())
    keep = torch.tensor([0, 2, 5])
    for layer in (reserved, dynamic):
        layer.batch_select_indices(keep)  # rows that ended leave
    for t in range(4):  # 3 + 2 + 4 = 9 positions: past the capacity of 6
        step = kv(3, 1)
        check(both())
    assert reserved.get_seq_length() == 9 and reserved._keys_buffer.shape[-2] >= 9


def test_reserved_cache_samples_what_the_growing_cache_samples(tiny_model_dir):
    """The engine's reserved KV cache (fast path) against transformers' growing one (reference):
    the same seed draws the same tokens, with logprobs equal to float rounding, with rows leaving
    the batch on the way and with a capacity estimate that holds."""
    params = SamplingParamsSpec(n=4, temperature=1.0, max_new_tokens=10, seed=11)
    runs = {}
    for reserve in (True, False):
        eng = HFEngine(str(tiny_model_dir), gen_batch_tokens=150, seed=0, reserve_cache=reserve)
        runs[reserve] = [c for g in eng.generate(PROMPTS, params) for c in g.completions]
    assert {c.finish_reason for c in runs[True]} == {"stop", "length"}
    assert [c.token_ids for c in runs[True]] == [c.token_ids for c in runs[False]]
    for fast, ref in zip(runs[True], runs[False]):
        torch.testing.assert_close(torch.tensor(fast.logprobs_sampler), torch.tensor(ref.logprobs_sampler),
                                   atol=1e-5, rtol=0)


def _cut_one_element_at_a_time(new_tokens: torch.Tensor, logprobs: torch.Tensor, eos_ids) -> list[CutRow]:
    """The engine's former per-row loop (one device sync per element on a GPU): the reference."""
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids))
    rows = []
    for r in range(new_tokens.shape[0]):
        hits = is_eos[r].nonzero()
        length = int(hits[0]) + 1 if len(hits) else new_tokens.shape[1]
        rows.append(CutRow(tuple(int(t) for t in new_tokens[r, :length]),
                           tuple(float(x) for x in logprobs[r, :length]), "stop" if len(hits) else "length"))
    return rows


def test_cut_at_eos_equals_the_per_element_loop():
    """Rows with no EOS, an EOS first, last, in the middle, two EOS ids and tokens after the first
    EOS (generate pads them): lengths, finish reasons, ids and fp32 logprobs are those of the former
    element-by-element loop, bit for bit."""
    eos_ids = (2, 7)
    gen = torch.Generator().manual_seed(0)
    new_tokens = torch.randint(8, 50, (6, 9), generator=gen)  # (N, T), no EOS yet
    new_tokens[1, 0] = 2  # EOS first
    new_tokens[2, 8] = 7  # EOS last (second EOS id)
    new_tokens[3, 4] = 2
    new_tokens[3, 6] = 7  # a later EOS is cut off
    new_tokens[4, 3] = 7
    new_tokens[4, 4:] = 0  # pad after EOS
    logprobs = -torch.rand(6, 9, generator=gen)  # (N, T) fp32, as the recorder gives them
    got = cut_at_eos(new_tokens, logprobs, eos_ids)
    assert got == _cut_one_element_at_a_time(new_tokens, logprobs, eos_ids)
    assert [len(r.token_ids) for r in got] == [9, 1, 9, 5, 4, 9]
    assert [r.finish_reason for r in got] == ["length", "stop", "stop", "stop", "stop", "length"]
    assert all(type(t) is int for r in got for t in r.token_ids)
    assert all(type(x) is float for r in got for x in r.logprobs)


def test_generate_output_is_that_of_the_per_element_cut(engine, monkeypatch):
    """The engine end to end, with stops and lengths in one batch: each completion's ids, logprobs and
    finish reason are what the per-element loop gives on the same generate() output."""
    params = SamplingParamsSpec(n=4, temperature=1.0, max_new_tokens=10, seed=11)
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = cut_at_eos

    def spy(new_tokens, logprobs, eos_ids):
        captured.append((new_tokens.clone(), logprobs.clone()))
        return real(new_tokens, logprobs, eos_ids)

    monkeypatch.setattr("rollout_workers.engines.hf.cut_at_eos", spy)
    groups = list(engine.generate(PROMPTS, params))
    want = [row for new_tokens, logprobs in captured
            for row in _cut_one_element_at_a_time(new_tokens, logprobs, engine._eos_ids)]
    got = [c for g in groups for c in g.completions]
    assert [(c.token_ids, c.logprobs_sampler, c.finish_reason) for c in got] == [tuple(r) for r in want]
    assert {c.finish_reason for c in got} == {"stop", "length"}, "the seed should give both kinds"


# ----------------------------------------------------------------------------- the engine registry

def test_registry_names_and_facts():
    assert engine_names() == tuple(ENGINES) == ("transformers", "vllm")
    assert engine_names(lambda spec: spec.sleep_mode) == ("vllm",)
    assert engine_names(lambda spec: spec.package is None) == ("transformers",)
    assert get_engine("vllm").gpus_per_worker(2) == 2 and get_engine("transformers").gpus_per_worker(2) == 0
    with pytest.raises(ValueError, match=UNKNOWN):
        get_engine("nope")


def test_registry_facts_match_the_engine_classes():
    """A spec's declared capabilities are those its class implements (the protocols of base)."""
    for name, spec in ENGINES.items():
        cls = spec.load()
        assert issubclass(cls, Engine), name
        assert issubclass(cls, Sleepable) == spec.sleep_mode, name
        assert issubclass(cls, NativeWeightTransfer) == spec.native_weight_transfer, name


def test_unknown_engine_is_refused_by_every_entry_point(tmp_path, tiny_model_dir):
    """The rollout section, make_engine (given a config that skipped validation) and launch.eval
    (its --engine flag, and a config file naming the engine) all list the registered names."""
    from launch.config import ConfigError
    import launch.eval

    with pytest.raises(ValueError, match=UNKNOWN):
        RolloutConfig(engine="nope")
    unchecked = RolloutConfig()
    object.__setattr__(unchecked, "engine", "nope")  # frozen and validated: only a bypass gets here
    with pytest.raises(ValueError, match=UNKNOWN):
        make_engine(unchecked, str(tiny_model_dir))
    config = tmp_path / "nope.yaml"
    config.write_text("rollout:\n  engine: nope\n")
    with pytest.raises(ConfigError, match=UNKNOWN):
        launch.eval.main(["--checkpoint", str(tiny_model_dir), "--config", str(config)])
    run = subprocess.run([sys.executable, "-m", "launch.eval", "--checkpoint", str(tiny_model_dir), "--engine", "nope"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2 and "--engine: invalid choice: 'nope' (choose from 'transformers', 'vllm')" in run.stderr


def test_make_engine_builds_the_configured_engine(tiny_model_dir):
    engine = make_engine(RolloutConfig(gen_batch_tokens=77, seed=3), str(tiny_model_dir), EngineOptions(device="cpu"))
    assert type(engine) is HFEngine and engine.version == 0 and engine.tokenizer is not None
    assert engine.chunks([5, 5, 5], n=2, max_new_tokens=14) == [range(0, 2), range(2, 3)]  # 2 x 2 x 19 <= 77 < 3 x 2 x 19
    assert not isinstance(engine, Sleepable) and not isinstance(engine, NativeWeightTransfer)


def test_registry_import_stays_cheap():
    """rollout_workers.config validates rollout.engine against the registry: importing them imports
    neither an engine's module nor vLLM, transformers or torch."""
    code = ("import sys, rollout_workers.config, rollout_workers.engines.registry; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'transformers', 'torch'}), "
            "sorted(m for m in sys.modules if m.startswith('rollout_workers.engines.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == "[] ['rollout_workers.engines.registry']"
