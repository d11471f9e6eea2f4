"""Rollout workers (real Ray actors) and the driver-side dispatcher: streaming, exactly-once
delivery, a killed worker's prompts re-dispatched, errors and timeouts that never hang.

    PYTHONPATH=$PWD python -m pytest -q tests/test_worker.py
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import replace
from typing import Iterator

import pytest
import ray
import torch

from rollout_workers.config import RolloutConfig
from rollout_workers.dispatch import BatchReport, Dispatcher
from rollout_workers.engines.base import MissingCapability, SamplingParamsSpec
from rollout_workers.rewards import score_math
from rollout_workers.types import Prompt, ScoredGroup
from rollout_workers.worker import RolloutRequest, RolloutWorker, make_rollout_workers

PARAMS = SamplingParamsSpec(n=2, max_new_tokens=6, seed=0)


def _cfg(**kw) -> RolloutConfig:
    # gen_batch_tokens=60 with G=2 and 6 new tokens: about 2 prompts per generate() chunk.
    base = dict(num_workers=1, group_size=2, max_new_tokens=6, gen_batch_tokens=60, cpus_per_worker=0.5,
                reward_processes=1, max_prompt_tokens=40)
    base.update(kw)
    return RolloutConfig(**base)


def _prompts(n: int, tag: str) -> list[Prompt]:
    return [Prompt(f"{tag}-{i}", f"Q: {i} + {i} = ?\nA:", str(2 * i)) for i in range(n)]


@pytest.fixture(scope="module")
def workers(ray_local, tiny_model_dir):
    """One transformers worker and one vLLM-adapter worker (over the fake vLLM, on CPU)."""
    hf = make_rollout_workers(_cfg(), str(tiny_model_dir), name_prefix="hf")
    fake = make_rollout_workers(_cfg(engine="vllm"), str(tiny_model_dir), name_prefix="vllm",
                                vllm_module="tests.fake_vllm", num_gpus_per_worker=0)
    yield hf + fake
    for w in hf + fake:
        ray.kill(w)


def test_every_prompt_once_streamed_and_scored(workers):
    prompts = _prompts(10, "a") + [Prompt("a-empty", "", "0"), Prompt("a-long", "9 " * 60, "0")]
    disp, report = Dispatcher(workers, timeout_s=120), BatchReport()
    groups = list(disp.run(prompts, batch_id=7, params=PARAMS, report=report))
    assert Counter(g.prompt.uid for g in groups) == Counter(p.uid for p in prompts[:10])
    assert sorted(disp.skipped) == ["a-empty", "a-long"]
    # Each refusal reaches the driver with its reason (the learner is told these groups never come).
    assert report.refused == Counter({"empty": 1, "over_max_prompt_tokens": 1}) and report.unsampled == []
    assert {g.worker for g in groups} == {"hf-0", "vllm-0"}
    for g in groups:
        assert g.batch_id == 7 and g.policy_version == 0 and g.advantages is None
        assert len(g.completions) == 2 and len(g.rewards) == 2
        assert list(g.rewards) == [score_math(c.text, g.prompt.gold) for c in g.completions]
    stats = ray.get([w.stats.remote() for w in workers], timeout=60)
    assert sum(s.prompts for s in stats) == 10 and sum(s.completions for s in stats) == 20
    assert sum(s.skipped_prompts for s in stats) == 2
    # Each group carries its own scoring time (the driver's "score" phase); they add up to the workers' totals.
    assert all(g.score_seconds > 0 for g in groups)
    assert sum(g.score_seconds for g in groups) == pytest.approx(sum(s.score_seconds for s in stats), rel=1e-9)
    for s in stats:
        done_when_first_left, batch = s.first_yield_progress
        # The first group left the worker while most of its batch was still unsampled.
        assert batch >= 4 and done_when_first_left < batch
        assert s.batches_in_flight == 0


def test_length_check_and_engine_read_the_carried_token_ids(workers, tiny_model_dir):
    """A prompt tokenized at load carries its ids: the worker measures it by them (a short text
    with 41 carried ids is over max_prompt_tokens=40) and the engine samples them as they are; a
    prompt without ids is tokenized by the worker, once, and travels on with them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    bare = _prompts(4, "c")
    carried = [replace(p, uid=f"{p.uid}-ids", token_ids=tuple(tokenizer(p.text)["input_ids"])) for p in bare]
    padded = replace(bare[0], uid="c-padded", token_ids=(tokenizer.eos_token_id,) * 41)
    disp, report = Dispatcher(workers, timeout_s=120), BatchReport()
    groups = list(disp.run(bare + carried + [padded], batch_id=8, params=PARAMS, report=report))
    assert report.refused == Counter({"over_max_prompt_tokens": 1}) and disp.skipped == ["c-padded"]
    assert len(groups) == 8
    for g in groups:
        assert g.prompt.token_ids == g.prompt_token_ids == tuple(tokenizer(g.prompt.text)["input_ids"])


def test_update_weights_through_the_actor(workers, tiny_model_dir):
    from safetensors.torch import load_file

    state = load_file(str(tiny_model_dir / "model.safetensors"))
    named = [(n, t + 0.01) for n, t in state.items()]
    assert ray.get([w.update_weights.remote(named, 4) for w in workers], timeout=60) == [4, 4]
    assert ray.get([w.version.remote() for w in workers], timeout=60) == [4, 4]
    groups = list(Dispatcher(workers, timeout_s=120).run(_prompts(4, "u"), batch_id=8, params=PARAMS))
    assert sorted(g.prompt.uid for g in groups) == [f"u-{i}" for i in range(4)]
    assert {g.policy_version for g in groups} == {4}
    with pytest.raises(ray.exceptions.RayTaskError, match="missing"):
        ray.get(workers[0].update_weights.remote(named[1:], 5), timeout=60)
    assert ray.get(workers[0].version.remote(), timeout=60) == 4


def test_weights_interface_of_the_worker(workers, tiny_model_dir):
    """What launch's weight sync uses (launch.actors): the engine dtype and CPU copies of the
    weights, through public methods of the worker."""
    assert ray.get([w.engine_dtype.remote() for w in workers], timeout=60) == [torch.float32, torch.float32]
    hf, fake = (dict(ray.get(w.named_weights.remote(), timeout=60)) for w in workers)
    assert set(hf) >= set(fake) - {"lm_head.weight"} and all(t.device.type == "cpu" for t in hf.values())
    for name, tensor in fake.items():
        if name in hf:
            assert torch.equal(hf[name], tensor), name


def test_all_tensor_work_of_a_worker_runs_on_its_one_torch_thread(ray_local, tiny_model_dir):
    """libgomp gives each thread that starts a parallel region its own helper threads; with more
    helpers than cores it stops spin-waiting, and sampling slowed by 35% once a weight load had run
    on one of Ray's method threads (README, "Sampling speed"). So sampling, loading and reading
    weights all run on the worker's one torch thread, across requests."""
    from safetensors.torch import load_file

    # Defined here, so that Ray ships the class by value (the tests folder is not importable in a worker).
    class ThreadRecordingWorker(RolloutWorker):
        """A worker whose engine notes the thread of each sampling chunk, weight load and weight read."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.seen: list[tuple[str, str]] = []
            engine = self._engine
            for method in ("sample_token_ids", "update_weights", "named_weights"):
                def recorded(*a, _fn=getattr(engine, method), _name=method, **kw):
                    self.seen.append((_name, threading.current_thread().name))
                    return _fn(*a, **kw)
                setattr(engine, method, recorded)

        def threads_seen(self) -> list[tuple[str, str]]:
            return list(self.seen)

    [w] = make_rollout_workers(_cfg(), str(tiny_model_dir), name_prefix="t", worker_cls=ThreadRecordingWorker)
    try:
        disp = Dispatcher([w], timeout_s=120)
        assert len(list(disp.run(_prompts(2, "t1"), batch_id=1, params=PARAMS))) == 2
        named = list(load_file(str(tiny_model_dir / "model.safetensors")).items())
        assert ray.get(w.update_weights.remote(named, 1), timeout=60) == 1
        assert len(ray.get(w.named_weights.remote(), timeout=60)) >= len(named) - 1
        assert len(list(disp.run(_prompts(2, "t2"), batch_id=2, params=PARAMS))) == 2
        seen = ray.get(w.threads_seen.remote(), timeout=60)
    finally:
        ray.kill(w)
    assert [m for m, _ in seen].count("update_weights") == 1 and [m for m, _ in seen].count("named_weights") == 1
    assert [m for m, _ in seen].count("sample_token_ids") >= 2  # one chunk per request at least
    assert {t for _, t in seen} == {"t-0-torch_0"}


def test_missing_capability_is_named_and_leaves_the_worker_usable(workers):
    """Sleep mode and vLLM's native transfer are optional engine capabilities (protocols of
    rollout_workers.engines.base): the transformers engine has neither, and the worker says so,
    naming the engine, the capability and the engines that have it, before taking the engine lock."""
    hf = workers[0]
    with pytest.raises(MissingCapability, match=r"hf-0: sleep needs an engine with sleep mode \(base\.Sleepable\); "
                                                r"rollout\.engine=transformers \(HFEngine\) does not have it "
                                                r"\(rollout\.engine with it: \['vllm'\]\)"):
        ray.get(hf.sleep.remote(), timeout=60)
    with pytest.raises(MissingCapability, match=r"hf-0: vllm_start_weight_update needs an engine with native weight "
                                                r"transfer \(base\.NativeWeightTransfer\); rollout\.engine=transformers"):
        ray.get(hf.vllm_start_weight_update.remote(), timeout=60)
    ray.get(hf.vllm_abort_weight_update.remote("nothing open"), timeout=60)  # no update open: nothing to do
    groups = list(Dispatcher([hf], timeout_s=120).run(_prompts(2, "c"), batch_id=11, params=PARAMS))
    assert sorted(g.prompt.uid for g in groups) == ["c-0", "c-1"]


@ray.remote(max_concurrency=2)
class _FrozenWorker:
    """Same surface as RolloutWorker, but generate() never yields: a hung engine."""

    def __init__(self) -> None:
        self.never = threading.Event()

    def name(self) -> str:
        return "frozen-0"

    def generate(self, request: RolloutRequest) -> Iterator[ScoredGroup]:
        self.never.wait()
        yield from ()


def test_frozen_worker_times_out_with_its_name(ray_local):
    frozen = _FrozenWorker.remote()
    disp = Dispatcher([frozen], timeout_s=2.0)
    with pytest.raises(TimeoutError, match=r"frozen-0 \(12 prompts pending\)"):
        list(disp.run(_prompts(12, "t"), batch_id=9, params=PARAMS))
    ray.kill(frozen)


def test_killed_worker_prompts_are_redispatched(ray_local, tiny_model_dir):
    # One prompt per generate() chunk, so the victim is still busy when it is killed.
    ws = make_rollout_workers(_cfg(num_workers=2, gen_batch_tokens=20), str(tiny_model_dir), name_prefix="k")
    disp = Dispatcher(ws, timeout_s=120)
    prompts = _prompts(24, "k")
    run = disp.run(prompts, batch_id=1, params=PARAMS)
    got = [next(run)]
    victim = 0 if got[0].worker == "k-0" else 1
    ray.kill(ws[victim])
    got += list(run)
    assert Counter(g.prompt.uid for g in got) == Counter(p.uid for p in prompts)
    assert disp.deaths == 1 and disp.alive == [victim != 0, victim != 1]
    survivor = f"k-{1 - victim}"
    assert sum(g.worker == survivor for g in got) > 12  # it took over some of the victim's share
    ray.kill(ws[1 - victim])


def test_restart_mode_replaces_a_killed_worker_when_the_driver_asks(ray_local, tiny_model_dir):
    """run() never restarts (a restart loads the learner's weights: the driver does it, on its own
    thread, between iterations); with no worker left it hands the rest back as unsampled."""
    cfg = _cfg(gen_batch_tokens=20)
    ws = make_rollout_workers(cfg, str(tiny_model_dir), name_prefix="r")
    fresh = []

    def factory(index: int):
        fresh.extend(make_rollout_workers(cfg, str(tiny_model_dir), name_prefix=f"r-new{index}"))
        return fresh[-1]

    disp = Dispatcher(ws, timeout_s=120, on_worker_death="restart", worker_factory=factory)
    prompts, report = _prompts(12, "r"), BatchReport()
    run = disp.run(prompts, batch_id=4, params=PARAMS, report=report)
    got = [next(run)]
    ray.kill(ws[0])
    got += list(run)
    assert fresh == [] and disp.dead == [0] and disp.deaths == 1
    assert Counter(g.prompt.uid for g in got) + Counter(p.uid for p in report.unsampled) == Counter(p.uid for p in prompts)
    assert disp.restart_dead() == [0] and disp.names == ["r-new0-0"] and disp.alive == [True]
    rest = list(disp.run(report.unsampled, batch_id=4, params=PARAMS))
    assert Counter(g.prompt.uid for g in got + rest) == Counter(p.uid for p in prompts)
    assert {g.worker for g in rest} == {"r-new0-0"}
    ray.kill(fresh[0])


def test_engine_error_surfaces_with_worker_name(ray_local, tiny_model_dir):
    ws = make_rollout_workers(_cfg(), str(tiny_model_dir), name_prefix="nan")
    from safetensors.torch import load_file

    state = load_file(str(tiny_model_dir / "model.safetensors"))
    ray.get(ws[0].update_weights.remote([(n, torch.full_like(t, float("nan"))) for n, t in state.items()], 1), timeout=60)
    with pytest.raises(RuntimeError, match="rollout worker nan-0 failed: .*(probability|nan|inf)"):
        list(Dispatcher(ws, timeout_s=120).run(_prompts(3, "n"), batch_id=2, params=PARAMS))
    ray.kill(ws[0])


def test_engine_that_fails_to_start_is_named(ray_local, tiny_model_dir):
    (w,) = make_rollout_workers(_cfg(engine="vllm"), str(tiny_model_dir), name_prefix="nov",
                                vllm_module="no_such_vllm", num_gpus_per_worker=0)
    with pytest.raises(ray.exceptions.ActorDiedError, match=r"needs vLLM 0\.32\.x or 0\.33\.x for weight path .reload."):
        Dispatcher([w], timeout_s=120)


def test_request_and_dispatcher_validation(workers):
    with pytest.raises(ValueError, match="duplicate prompt uids"):
        list(Dispatcher(workers, timeout_s=60).run(_prompts(2, "d") * 2, batch_id=3, params=PARAMS))
    with pytest.raises(ValueError, match="worker_factory"):
        Dispatcher(workers, on_worker_death="restart")
    assert RolloutRequest(tuple(_prompts(1, "r")), 0, PARAMS).params.n == 2
