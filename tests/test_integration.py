"""Learner -> weight sync -> engines with the real actors: DeepSpeed learner ranks (ZeRO 0/2/3,
2 ranks), a transformers rollout worker and a vLLM-adapter rollout worker over the fake vLLM,
the gloo transport. After a sync the engines hold the learner's weights bit for bit, report the
new version, stamp it into trajectories and generate differently.

    PYTHONPATH=$PWD python -m pytest -q tests/test_integration.py
"""
from __future__ import annotations

import dataclasses

import pytest
import ray
import torch

from conftest import kill_and_confirm
from launch.actors import SyncedLearnerRank, SyncedRolloutWorker
from launch.sync_group import SyncGroup
from learner.actor import LearnerGroup
from learner.config import LearnerConfig
from rollout_workers.config import RolloutConfig
from rollout_workers.dispatch import Dispatcher
from rollout_workers.engines.base import SamplingParamsSpec
from launch.data.synthetic import synthetic_problems
from rollout_workers.types import Completion, ScoredGroup
from rollout_workers.worker import make_rollout_workers
from weight_sync.config import SyncConfig
from weight_sync.endpoint import SyncError

TIMEOUT = 240.0


def fake_groups(prompts, tokenizer_ids, rewards_per_group):
    """Scored groups with real token ids, so the learner's step changes the weights."""
    groups = []
    for i, (p, rewards) in enumerate(zip(prompts, rewards_per_group)):
        comps = tuple(Completion(token_ids=tuple(tokenizer_ids[(i + j) % len(tokenizer_ids)]), logprobs_sampler=(-1.0,) * len(tokenizer_ids[(i + j) % len(tokenizer_ids)]),
                                 finish_reason="stop", text="") for j in range(len(rewards)))
        groups.append(ScoredGroup(prompt=p, prompt_token_ids=(5, 6, 7), completions=comps, rewards=tuple(rewards),
                                  policy_version=0, batch_id=0))
    return groups


def engine_weights(worker) -> dict[str, torch.Tensor]:
    return dict(ray.get(worker.named_weights.remote(), timeout=TIMEOUT))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, ranks", [(0, 1), (2, 2), (3, 2)])
def test_sync_makes_engines_equal_learner_and_stamps_version(ray_local, tiny_model_dir, zero_stage, ranks):
    lcfg = LearnerConfig(zero_stage=zero_stage, num_ranks=ranks, prompts_per_step=2, micro_batch_tokens=256, lr=1e-2,
                         cpus_per_rank=0.5)
    learner = LearnerGroup(lcfg, str(tiny_model_dir), max_new_tokens=8, timeout_s=TIMEOUT, rank_cls=SyncedLearnerRank)
    rcfg = RolloutConfig(group_size=2, max_new_tokens=8, cpus_per_worker=0.5, reward_processes=1)
    hf = make_rollout_workers(rcfg, str(tiny_model_dir), worker_cls=SyncedRolloutWorker, name_prefix="hf")[0]
    vllm = make_rollout_workers(dataclasses.replace(rcfg, engine="vllm"), str(tiny_model_dir), worker_cls=SyncedRolloutWorker,
                                vllm_module="tests.fake_vllm", name_prefix="vllm", num_gpus_per_worker=0)[0]
    workers = [hf, vllm]
    try:
        sync = SyncGroup(SyncConfig(timeout_s=60), learner.rank_actors, workers, ["hf-0", "vllm-0"], "float32", TIMEOUT)
        prompts = synthetic_problems(["add"], 2, 4, seed=1, split="train")[:4]
        params = SamplingParamsSpec(n=2, temperature=1.0, max_new_tokens=8, seed=3)
        dispatcher = Dispatcher(workers, timeout_s=TIMEOUT, on_worker_death="raise")
        before = {g.prompt.uid: g for g in dispatcher.run(prompts, batch_id=0, params=params)}
        assert {g.policy_version for g in before.values()} == {0}

        # One real optimizer step on mixed-reward groups changes the learner's weights.
        learner.begin_batch(2)
        learner.add_groups(fake_groups(prompts[:2], [[11, 12, 13], [14, 15], [16, 17, 18, 19]], [(1.0, 0.0), (0.0, 1.0)]))
        stats = learner.end_batch()
        assert stats.steps == 1 and learner.policy_version == 1
        sync.sync(1)

        want = learner.full_weights()
        for w, dtype in ((hf, torch.float32), (vllm, torch.float32)):
            got = engine_weights(w)
            assert set(got) >= set(want) - {"lm_head.weight"}
            for name, tensor in want.items():
                if name in got:
                    assert torch.equal(got[name], tensor.to(dtype)), name
            assert ray.get(w.version.remote(), timeout=TIMEOUT) == 1
        after = {g.prompt.uid: g for g in dispatcher.run(prompts, batch_id=1, params=params)}
        assert {g.policy_version for g in after.values()} == {1}
        # Same seed, same prompts, new weights: the sampled tokens or their logprobs change.
        changed = [before[u].completions[0].logprobs_sampler != after[u].completions[0].logprobs_sampler for u in before]
        assert any(changed)
    finally:
        learner.shutdown()
        for w in workers:
            ray.kill(w)


@pytest.mark.slow
def test_killed_engine_during_sync_is_named_within_timeout(ray_local, tiny_model_dir):
    lcfg = LearnerConfig(num_ranks=1, prompts_per_step=2, micro_batch_tokens=256, cpus_per_rank=0.5)
    learner = LearnerGroup(lcfg, str(tiny_model_dir), max_new_tokens=8, timeout_s=TIMEOUT, rank_cls=SyncedLearnerRank)
    rcfg = RolloutConfig(group_size=2, max_new_tokens=8, cpus_per_worker=0.5)
    workers = make_rollout_workers(dataclasses.replace(rcfg, num_workers=2), str(tiny_model_dir), worker_cls=SyncedRolloutWorker)
    try:
        sync = SyncGroup(SyncConfig(timeout_s=10), learner.rank_actors, workers, ["rollout-0", "rollout-1"], "float32", TIMEOUT)
        sync.sync(1)
        kill_and_confirm(workers[1], "version")
        with pytest.raises(SyncError) as err:
            sync.sync(2)
        assert "rollout-1" in err.value.engines
        assert "rollout-0" not in err.value.engines
        # The survivor still serves the last complete version: the round's ack needs every engine,
        # so no engine applies version 2 while another is missing.
        assert ray.get(workers[0].version.remote(), timeout=TIMEOUT) == 1

        # A fresh worker for the dead one is brought up through the group itself (as train.py's
        # restart does, for every transport): a new group, one sync, both serve the learner's weights.
        (fresh,) = make_rollout_workers(dataclasses.replace(rcfg, num_workers=2), str(tiny_model_dir),
                                        worker_cls=SyncedRolloutWorker, indices=[1])
        workers.append(fresh)
        sync.replace_worker(1, fresh, 2)
        want = learner.full_weights()
        for w in (workers[0], fresh):
            assert ray.get(w.version.remote(), timeout=TIMEOUT) == 2
            got = engine_weights(w)
            for name in set(want) & set(got):
                assert torch.equal(got[name], want[name]), name
    finally:
        learner.shutdown()
        for w in workers:
            ray.kill(w)
