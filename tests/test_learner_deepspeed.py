"""The DASH learner on real DeepSpeed (CPU, gloo) and real Ray: exactness of the accumulated gradient,
filtered samples cost no forward pass, multi-step/epoch batches, non-finite step skipping, bad input,
reference model only with KL, resume bit-identical, HF export, learner/sampler logprob mismatch,
the varlen (one padding-free row) layout, the collective backends per accelerator.

    PYTHONPATH=$PWD python -m pytest -q tests/test_learner_deepspeed.py
"""
from __future__ import annotations

import dataclasses
import os
import random
import time

import pytest
import ray
import torch

from learner.config import LearnerConfig
from learner.batcher import LocalRankPool, StreamingBatcher
from learner.trainer import CollectiveBackends, clear_stale_build_lock, collective_backends
from learner.filtering import Sample, select_samples
from learner.losses import behaviour_weights, effective_sample_size, ppo_clip_loss_sum, step_normaliser, token_weights
from learner.packing import collate, pack_samples
from rollout_workers.types import Completion, Prompt, ScoredGroup
from weight_sync.endpoint import free_port

MAX_NEW = 12


def make_groups(n: int, seed: int, group_size: int = 4, vocab: int = 250) -> list[ScoredGroup]:
    """Random token groups; every third group is all-correct or all-wrong (filtered whole)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lens = [rng.randint(1, MAX_NEW) for _ in range(group_size)]
        comps = tuple(Completion(tuple(rng.randrange(vocab) for _ in range(c)),
                                 tuple(-3 * rng.random() for _ in range(c)), "stop", "") for c in lens)
        rewards = [float(i % 6 == 0)] * group_size if i % 3 == 0 else [1.0, 0.0] + [float(rng.random() < 0.5) for _ in range(group_size - 2)]
        out.append(ScoredGroup(Prompt(f"p{seed}-{i}", "", ""), tuple(rng.randrange(vocab) for _ in range(rng.randint(2, 8))),
                               comps, tuple(rewards), 0, seed))
    return out


def reference_gradients(model_dir, samples: list[Sample], cfg: LearnerConfig, samples_in: int) -> dict[str, torch.Tensor]:
    """Plain torch, one sample at a time, unpacked: grad of the aggregated loss of the whole batch
    (old logprobs: the detached current ones, rho = 1, or the sampler's when cfg says so)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total = 0.0
    for s in samples:
        p, c = len(s.prompt_token_ids), len(s.completion_token_ids)
        logits = model(torch.tensor([s.prompt_token_ids + s.completion_token_ids])).logits[0]
        logprobs = torch.log_softmax(logits[p - 1:p - 1 + c], -1).gather(1, torch.tensor(s.completion_token_ids)[:, None])[:, 0]
        old = torch.tensor(s.logprobs_sampler) if cfg.old_logprobs == "sampler" else logprobs.detach()
        weights, _ = behaviour_weights(old, torch.tensor(s.logprobs_sampler), cfg.off_policy, cfg.is_cap)
        total = total + ppo_clip_loss_sum(logprobs, old, torch.full((c,), s.advantage), token_weights(torch.tensor([c]), cfg.loss_agg),
                                          cfg.clip_eps_low, cfg.clip_eps_high,
                                          is_weights=weights if cfg.off_policy != "none" else None).loss_sum
    normaliser = step_normaliser(cfg.loss_agg, sum(len(s.completion_token_ids) for s in samples), len(samples),
                                 cfg.constant_normalizer or MAX_NEW * samples_in)
    (total / normaliser).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def max_rel_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert got.keys() == ref.keys()
    return max(float((got[k] - ref[k]).norm() / ref[k].norm()) for k in ref)


@pytest.fixture(scope="module")
def trainers(tiny_model_dir):
    """In-process single-rank trainers (one process group for the module), built on demand by ZeRO stage."""
    from learner.trainer import RankTrainer

    port, built = free_port(), {}

    def get(stage: int, **overrides) -> RankTrainer:
        key = (stage, tuple(sorted(overrides.items())))
        if key not in built:
            cfg = LearnerConfig(zero_stage=stage, grad_clip=0.0, **overrides)
            built[key] = RankTrainer(cfg, str(tiny_model_dir), master_port=port)
        return built[key]
    return get


class RecordingPool(LocalRankPool):
    """The in-process rank, keeping the micro-batches it ran."""

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        self.batches = []

    def forward_backward(self, per_rank, boundary, return_logprobs):
        self.batches.extend(per_rank)
        return super().forward_backward(per_rank, boundary, return_logprobs)


def test_exact_gradient_any_split_order_and_aggregation(trainers, tiny_model_dir):
    groups = make_groups(6, seed=1)
    trainer = trainers(0)
    worst = 0.0
    shuffled = [groups[i] for i in (3, 0, 5, 1, 4, 2)]
    for loss_agg in ("token_mean", "seq_mean", "constant"):
        cfg = LearnerConfig(prompts_per_step=6, loss_agg=loss_agg, grad_clip=0.0)
        kept = select_samples(groups, cfg.advantage, cfg.filter_threshold, cfg.filter)
        ref = reference_gradients(tiny_model_dir, kept.samples, cfg, kept.samples_in)
        longest = max(s.num_tokens for s in kept.samples)
        splits = [(longest, shuffled), (37, groups[::-1]), (10_000, groups)] if loss_agg == "token_mean" else [(29, shuffled)]
        for budget, order in splits:
            forwarded = {}
            for share in (True, False):
                pool = RecordingPool(trainer)
                batcher = StreamingBatcher(dataclasses.replace(cfg, micro_batch_tokens=budget, share_prompts=share), pool, MAX_NEW)
                worst = max(worst, max_rel_error(batcher.probe_gradients(order), ref))
                forwarded[share] = sum(mb.num_tokens for mb in pool.batches)
                assert any(mb.prompt_heads.numel() for mb in pool.batches) == share
            # each group's prompt runs once per micro-batch, not once per sample
            assert forwarded[True] < forwarded[False], (budget, forwarded)
    assert worst <= 1e-5, worst


def test_filtered_samples_cost_no_forward_pass(trainers):
    groups = make_groups(6, seed=2)
    trainer = trainers(0)
    cfg = LearnerConfig(prompts_per_step=6, micro_batch_tokens=64)
    kept = select_samples(groups, cfg.advantage, cfg.filter_threshold, cfg.filter)
    dropped = set(range(24)) - {s.uid for s in kept.samples}
    assert len(dropped) == 8 and kept.drop_reasons == {"all_correct": 4, "all_wrong": 4}
    trainer.forward_uids.clear()
    calls_before = trainer.forward_calls
    batcher = StreamingBatcher(cfg, LocalRankPool(trainer), MAX_NEW)
    batcher.begin_batch(6)
    batcher.add_groups(groups[:4])
    # streaming: full micro-batches were already backpropagated while groups 5 and 6 are still to come
    assert trainer.forward_calls > calls_before and trainer.optimizer_steps == 0
    batcher.add_groups(groups[4:])
    stats = batcher.end_batch()
    assert trainer.forward_uids == {s.uid for s in kept.samples}
    # each forward is a packed micro-batch of <= 64 tokens: at least ceil(kept tokens / 64) calls, no more than one per kept sample
    calls = trainer.forward_calls - calls_before
    assert -(-stats.tokens // 64) <= calls < len(kept.samples)
    assert stats.samples_in == 24 and stats.samples_kept == 16 and stats.refill_needed == 2 and stats.steps == 1
    assert trainer.optimizer_steps == 1


def test_lr_schedule_warmup_constant_cosine():
    from learner.trainer import LrSchedule

    cosine = LrSchedule("cosine", warmup_steps=2, total_steps=6)
    assert [round(cosine(s), 6) for s in range(7)] == [round(x, 6) for x in (1 / 3, 2 / 3, 1.0, 0.853553, 0.5, 0.146447, 0.0)]
    assert [LrSchedule("constant", 1, 6)(s) for s in range(3)] == [0.5, 1.0, 1.0]


def logprobs_under(model_dir, weights: dict[str, torch.Tensor], samples: list[Sample]) -> dict[int, torch.Tensor]:
    """Sample.uid -> (C,) completion logprobs under `weights`, plain torch, one sample at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(weights, strict=False)
    return teacher_forced_logprobs(model, samples)


def teacher_forced_logprobs(model, samples: list[Sample]) -> dict[int, torch.Tensor]:
    """Sample.uid -> (C,) completion logprobs, one unpadded sample at a time."""
    out = {}
    with torch.no_grad():
        for s in samples:
            p, c = len(s.prompt_token_ids), len(s.completion_token_ids)
            logits = model(torch.tensor([s.prompt_token_ids + s.completion_token_ids])).logits[0]
            out[s.uid] = torch.log_softmax(logits[p - 1:p - 1 + c], -1).gather(1, torch.tensor(s.completion_token_ids)[:, None])[:, 0]
    return out


def pg_loss(model_dir, weights: dict[str, torch.Tensor], samples: list[Sample]) -> float:
    """-sum_i A_i sum_t logp_t / tokens: the policy-gradient loss with FIXED advantages (the PPO
    surrogate itself is constant at rho = 1, so its value cannot show learning)."""
    logprobs = logprobs_under(model_dir, weights, samples)
    return -sum(s.advantage * float(logprobs[s.uid].sum()) for s in samples) / sum(len(s.completion_token_ids) for s in samples)


def test_multi_step_epochs_recompute_and_loss_goes_down(trainers, tiny_model_dir):
    trainer = trainers(0, lr=3e-3, prompts_per_step=2, epochs_per_batch=2, micro_batch_tokens=32)
    cfg = trainer.cfg
    groups = make_groups(4, seed=3)  # 2 steps per epoch x 2 epochs
    kept = select_samples(groups, cfg.advantage, cfg.filter_threshold, cfg.filter).samples
    slot1_uids = {s.uid for s in kept if s.uid >= 2 * 4}  # groups 2 and 3 (group size 4) form step 1
    batcher = StreamingBatcher(cfg, LocalRankPool(trainer), MAX_NEW)
    weights_before = trainer.full_weights()
    losses = [pg_loss(tiny_model_dir, weights_before, kept)]
    for _ in range(3):
        batcher.begin_batch(4)
        trainer.forward_uids.clear()
        for i, g in enumerate(groups):  # one at a time: streaming
            batcher.add_groups([g])
            if i == 2:  # the old-logprob pass of step 1's samples runs while its last group is still to come
                assert trainer.forward_uids & slot1_uids and trainer.optimizer_steps == len(losses) * 4 - 4
        stats = batcher.end_batch()
        # every sample's old logprobs (step-1 samples: no-grad pass; step-0 samples: their own
        # backprop pass) were taken with the weights from BEFORE the batch's first optimizer step
        expected = logprobs_under(tiny_model_dir, weights_before, kept)
        assert batcher.logprobs_old.keys() == expected.keys()
        assert all(torch.allclose(batcher.logprobs_old[u], expected[u], atol=2e-5) for u in expected)
        weights_before = trainer.full_weights()
        assert stats.steps == 4 and stats.skipped_nonfinite == 0
        # steps after the first are off-policy: old logprobs (pre-update no-grad pass) differ from current
        assert stats.ratio_mean != 1.0 and stats.seconds_old_logprobs > 0
        losses.append(pg_loss(tiny_model_dir, trainer.full_weights(), kept))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1, losses


def test_old_logprobs_auto_takes_exact_fresh_sampler_logprobs_and_recomputes_stale_ones(trainers, tiny_model_dir):
    trainer = trainers(0, lr=3e-3, prompts_per_step=2, micro_batch_tokens=32)  # old_logprobs="auto", the default
    cfg = trainer.cfg
    groups = make_groups(4, seed=3)  # 2 optimizer steps per batch
    kept = select_samples(groups, cfg.advantage, cfg.filter_threshold, cfg.filter).samples
    slot1 = [s for s in kept if s.uid >= 2 * 4]
    exact = StreamingBatcher(cfg, LocalRankPool(trainer), MAX_NEW, sampler_exact=True)

    # fresh groups (sampled at the learner's version) from an exact engine: no old-logprob pass, and
    # step 0 is taken as soon as its groups are in, while step 1's are still to come
    steps, calls = trainer.optimizer_steps, trainer.forward_calls
    exact.begin_batch(4, policy_version=0)
    exact.add_groups(groups[:2])
    assert trainer.optimizer_steps == steps + 1
    exact.add_groups(groups[2:])
    fresh = exact.end_batch()
    assert fresh.seconds_old_logprobs == 0 and fresh.steps == 2 and fresh.staleness == {0: 4}
    assert all(torch.equal(exact.logprobs_old[s.uid], torch.tensor(s.logprobs_sampler)) for s in slot1)

    # the same groups one version stale, with learner.off_policy="none": the ratio is to the policy
    # that sampled them, which the engine's logprobs are -> taken for every step (step 0 too), no pass
    exact.begin_batch(4, policy_version=1, staleness=1)
    exact.add_groups(groups[:2])
    assert trainer.optimizer_steps == steps + 3  # step 0 streamed
    exact.add_groups(groups[2:])
    behaviour = exact.end_batch()
    assert behaviour.seconds_old_logprobs == 0 and behaviour.staleness == {1: 4}
    assert exact.logprobs_old.keys() == {s.uid for s in kept}
    assert all(torch.equal(exact.logprobs_old[s.uid], torch.tensor(s.logprobs_sampler)) for s in kept)

    # one version stale with a proximal policy (off_policy tis/decoupled): the engine was not the
    # pre-update policy -> recomputed
    proximal = StreamingBatcher(dataclasses.replace(cfg, off_policy="tis"), LocalRankPool(trainer), MAX_NEW, sampler_exact=True)
    weights_before = trainer.full_weights()
    proximal.begin_batch(4, policy_version=1, staleness=1)
    proximal.add_groups(groups[:2])
    assert trainer.optimizer_steps == steps + 4  # step 0 now waits for the old-logprob pass
    proximal.add_groups(groups[2:])
    stale = proximal.end_batch()
    assert stale.seconds_old_logprobs > 0 and stale.staleness == {1: 4}
    expected = logprobs_under(tiny_model_dir, weights_before, slot1)
    assert all(torch.allclose(proximal.logprobs_old[u], expected[u], atol=2e-5) for u in expected)

    # two versions stale with learner.max_staleness = 1: dropped before any pass, counted
    calls = trainer.forward_calls
    exact.begin_batch(4, policy_version=2, staleness=2)
    exact.add_groups(groups)
    dropped = exact.end_batch()
    assert dropped.drop_reasons == {"stale": 16} and dropped.samples_kept == 0 and dropped.steps == 0
    assert trainer.forward_calls == calls and dropped.staleness == {2: 4}

    # a group staler than its batch was announced: its old logprobs could no longer be recomputed
    proximal.begin_batch(4, policy_version=1, staleness=0)
    with pytest.raises(ValueError, match="announced as sampled by the current weights"):
        proximal.add_groups(groups)
    proximal.abort_batch()

    # an engine that is not exact (bf16, top_p < 1): "auto" recomputes even fresh groups
    inexact = StreamingBatcher(cfg, LocalRankPool(trainer), MAX_NEW, sampler_exact=False)
    inexact.begin_batch(4, policy_version=0)
    inexact.add_groups(groups)
    assert inexact.end_batch().seconds_old_logprobs > 0


def test_stale_batch_without_off_policy_correction_is_ppo_against_the_behaviour_policy(trainers, tiny_model_dir):
    """train.overlap's stale batch with learner.off_policy="none" and old_logprobs="auto": every
    token's ratio is to the engine's logprobs (step 0 included), i.e. the gradient of
    old_logprobs="sampler", one sample at a time in plain torch; a fresh batch keeps rho = 1 at step 0."""
    trainer = trainers(0, prompts_per_step=6)
    cfg = trainer.cfg
    groups = make_groups(6, seed=12)  # random engine logprobs: the ratio to them is far from 1
    kept = select_samples(groups, cfg.advantage, cfg.filter_threshold, cfg.filter)
    batcher = StreamingBatcher(dataclasses.replace(cfg, micro_batch_tokens=37), LocalRankPool(trainer), MAX_NEW,
                               sampler_exact=True)
    as_sampler = reference_gradients(tiny_model_dir, kept.samples, dataclasses.replace(cfg, old_logprobs="sampler"),
                                     kept.samples_in)
    on_policy = reference_gradients(tiny_model_dir, kept.samples, cfg, kept.samples_in)
    assert max_rel_error(batcher.probe_gradients(groups, staleness=1), as_sampler) <= 1e-5
    assert max_rel_error(batcher.probe_gradients(groups, staleness=0), on_policy) <= 1e-5
    assert max_rel_error(as_sampler, on_policy) > 1e-2  # the two are told apart


@pytest.mark.parametrize("mode", ["tis", "decoupled"])
def test_off_policy_gradient_and_weight_statistics_match_a_reference(trainers, tiny_model_dir, mode):
    """Fast path (streamed, packed micro-batches) vs one sample at a time in plain torch: the
    off-policy weights pi_prox / pi_behav (random engine logprobs here, so many exceed the cap)."""
    trainer = trainers(0, prompts_per_step=6, off_policy=mode, is_cap=1.5)
    cfg = trainer.cfg
    rng = random.Random(11)  # engine logprobs around the tiny model's (~ -ln 250 = -5.5): weights on both sides of the cap
    groups = [dataclasses.replace(g, completions=tuple(
        dataclasses.replace(c, logprobs_sampler=tuple(rng.uniform(-6.5, -5.0) for _ in c.token_ids)) for c in g.completions))
        for g in make_groups(6, seed=11)]
    kept = select_samples(groups, cfg.advantage, cfg.filter_threshold, cfg.filter)
    probe = StreamingBatcher(dataclasses.replace(cfg, micro_batch_tokens=37), LocalRankPool(trainer), MAX_NEW)
    assert max_rel_error(probe.probe_gradients(groups),
                         reference_gradients(tiny_model_dir, kept.samples, cfg, kept.samples_in)) <= 1e-5
    prox = logprobs_under(tiny_model_dir, trainer.full_weights(), kept.samples)
    w = torch.cat([torch.exp(prox[s.uid].double() - torch.tensor(s.logprobs_sampler, dtype=torch.float64))
                   for s in kept.samples])
    applied = torch.clamp(w, max=1.5) if mode == "tis" else torch.where(w > 1.5, 0.0, w)
    batcher = StreamingBatcher(cfg, LocalRankPool(trainer), MAX_NEW)
    batcher.begin_batch(6)
    batcher.add_groups(groups)
    stats = batcher.end_batch()
    assert 0 < int((w > 1.5).sum()) < len(w)
    assert stats.is_weight_mean == pytest.approx(float(w.mean()), rel=1e-4)
    assert stats.is_weight_max == pytest.approx(float(w.max()), rel=1e-4)
    assert stats.is_capped_fraction == int((w > 1.5).sum()) / len(w)
    assert stats.effective_sample_size == pytest.approx(
        effective_sample_size(float(applied.sum()), float((applied ** 2).sum()), len(w)), rel=1e-4)


@pytest.mark.parametrize("stage", [2, 3])
def test_nonfinite_step_skipped_then_exact_then_abort(trainers, tiny_model_dir, stage):
    trainer = trainers(stage, old_logprobs="sampler", prompts_per_step=3, max_bad_steps=2)
    cfg = trainer.cfg
    batcher = StreamingBatcher(cfg, LocalRankPool(trainer), MAX_NEW)
    good = make_groups(3, seed=4)
    bad_comp = dataclasses.replace(good[1].completions[0], logprobs_sampler=(float("nan"),) * len(good[1].completions[0].token_ids))
    bad = [good[0], dataclasses.replace(good[1], completions=(bad_comp,) + good[1].completions[1:]), good[2]]
    w0 = trainer.full_weights()
    batcher.begin_batch(3)
    batcher.add_groups(bad)
    stats = batcher.end_batch()
    assert stats.skipped_nonfinite == 1 and stats.steps == 0
    assert all(torch.equal(w0[k], v) for k, v in trainer.full_weights().items())
    # the dropped gradient left nothing behind: the next gradient on the same trainer is exact
    probe = batcher.probe_gradients(good)
    kept = select_samples(good, cfg.advantage, cfg.filter_threshold, cfg.filter)
    assert max_rel_error(probe, reference_gradients(tiny_model_dir, kept.samples, cfg, kept.samples_in)) <= 1e-5
    with pytest.raises(RuntimeError, match="2 optimizer steps in a row had a non-finite loss or gradient"):
        batcher.begin_batch(3)
        batcher.add_groups(bad)  # the in-process pool steps at once; a Ray pool raises in end_batch
        batcher.end_batch()


def test_collective_backends_nccl_plus_gloo_flags_on_cuda_gloo_alone_on_cpu():
    assert collective_backends("cuda") == CollectiveBackends(default="nccl", flag_group_needed=True)
    assert collective_backends("cpu") == CollectiveBackends(default="gloo", flag_group_needed=False)
    with pytest.raises(ValueError, match="'xpu' is not supported"):
        collective_backends("xpu")


def test_cpu_flags_and_barrier_go_through_the_side_group_when_one_is_built(trainers, tiny_model_dir, tmp_path,
                                                                           monkeypatch):
    """The CUDA layout's side group, exercised on CPU: with a gloo flag group forced, the non-finite
    flag's all-reduce and export's barrier run on it (a rank that skipped the group would hang)."""
    import torch.distributed as dist

    import learner.trainer as trainer_module

    trainers(0)  # the module's process group exists first, as DeepSpeed's default group
    monkeypatch.setattr(trainer_module, "collective_backends", lambda device: CollectiveBackends("gloo", True))
    trainer = trainer_module.RankTrainer(LearnerConfig(zero_stage=2, grad_clip=0.0, old_logprobs="sampler",
                                                       prompts_per_step=3), str(tiny_model_dir))
    assert trainer.flag_group is not None and trainer.flag_group != dist.group.WORLD
    used = []  # (call, group=) of every all_reduce / barrier (DeepSpeed's own calls included)

    def spy(name, real):
        def call(*args, **kwargs):
            used.append((name, kwargs.get("group")))
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(dist, "all_reduce", spy("all_reduce", dist.all_reduce))
    monkeypatch.setattr(dist, "barrier", spy("barrier", dist.barrier))
    good = make_groups(3, seed=4)
    bad_comp = dataclasses.replace(good[1].completions[0], logprobs_sampler=(float("nan"),) * len(good[1].completions[0].token_ids))
    batcher = StreamingBatcher(trainer.cfg, LocalRankPool(trainer), MAX_NEW)
    batcher.begin_batch(3)
    batcher.add_groups([good[0], dataclasses.replace(good[1], completions=(bad_comp,) + good[1].completions[1:]), good[2]])
    assert batcher.end_batch().skipped_nonfinite == 1
    trainer.export_hf(str(tmp_path / "hf"))
    assert ("all_reduce", trainer.flag_group) in used and ("barrier", trainer.flag_group) in used
    assert (tmp_path / "hf" / "dash_export.json").exists()


def test_cpu_passes_are_bit_exact_with_two_threads(trainers):
    """Two runs of one config must agree to the bit on CPU. With two intra-op threads, the backward
    of the shared prompt heads' KV-row selection (an index with repeated rows: 64 groups of 8 rows
    over their heads) summed in thread order, so the same pass gave another gradient each time and
    runs drifted apart after their first optimizer step. The rank turns on torch's deterministic
    kernels on CPU."""
    trainer = trainers(0)
    assert torch.are_deterministic_algorithms_enabled()
    samples = select_samples(make_groups(64, seed=0, group_size=8), "grpo", 0.1, True).samples
    (rows,) = pack_samples(samples, 100_000, True)
    mb = collate([samples[i] for i in rows], "token_mean", None, True)
    assert mb.prompt_heads.shape[0] < mb.input_ids.shape[0]  # rows share heads: the index repeats
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gradients = []
        for _ in range(4):
            trainer.forward_backward(mb, True, False)
            gradients.append(trainer.full_gradients(1000.0))
            trainer.discard_gradients()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g[name], gradients[0][name]) for g in gradients[1:] for name in g)


def test_bad_input_clear_errors(trainers):
    cfg = LearnerConfig(prompts_per_step=2, micro_batch_tokens=16)
    batcher = StreamingBatcher(cfg, LocalRankPool(trainers(0)), MAX_NEW)
    with pytest.raises(ValueError, match="positive multiple of prompts_per_step=2"):
        batcher.begin_batch(0)
    groups = make_groups(2, seed=5)
    batcher.begin_batch(2)
    with pytest.raises(ValueError, match="expected group_size=4"):
        batcher.add_groups([groups[1], make_groups(1, seed=6, group_size=3)[0]])
    with pytest.raises(ValueError, match="end_batch after 1 of the 2 groups"):
        batcher.end_batch()
    batcher.abort_batch()
    batcher.begin_batch(2)
    with pytest.raises(ValueError, match="non-finite reward"):
        batcher.add_groups([dataclasses.replace(groups[1], rewards=(float("nan"), 1.0, 0.0, 1.0))])
    batcher.abort_batch()
    long = dataclasses.replace(groups[1], completions=tuple(dataclasses.replace(c, token_ids=(5,) * 20, logprobs_sampler=(-1.0,) * 20)
                                                            for c in groups[1].completions), rewards=(1.0, 0.0, 1.0, 0.0))
    batcher.begin_batch(2)
    with pytest.raises(ValueError, match=r"has \d+ tokens \(prompt \+ completion\), more than the micro-batch budget micro_batch_tokens=16"):
        batcher.add_groups([long, groups[1]])
        batcher.end_batch()


def test_reference_model_only_with_kl(trainers):
    assert trainers(0).ref_model is None
    with_kl = trainers(0, kl_coef=0.1, prompts_per_step=3, lr=1e-2)
    assert with_kl.ref_model is not None
    batcher = StreamingBatcher(with_kl.cfg, LocalRankPool(with_kl), MAX_NEW)
    kls = []
    for _ in range(2):
        batcher.begin_batch(3)
        batcher.add_groups(make_groups(3, seed=7))
        kls.append(batcher.end_batch().kl)
    assert kls[0] == 0.0 and kls[1] > 0.0  # policy == reference before the first update only


def held_rank_cls():
    """A LearnerRank whose default-group thread can be held busy (as by a queue of backprop passes)."""
    import threading

    from learner.actor import LearnerRank

    class Held(LearnerRank):
        def setup(self, *args) -> None:  # no DeepSpeed: only the thread handover is under test
            self.released = threading.Event()
            torch.set_num_threads(self.threads)

        def attention(self) -> str:  # no trainer to ask
            return "padded_sdpa"

        def hold(self, timeout_s: float) -> bool:
            return self.released.wait(timeout_s)

        def release(self) -> None:
            self.released.set()

        def threads_of_next_pass(self) -> int:
            self._take_threads()  # what forward_backward / old_logprobs / step do first
            return torch.get_num_threads()

    return Held


def test_set_threads_reaches_passes_already_queued_behind_a_busy_rank(ray_local, tiny_model_dir):
    """The overlap prefetch hands the engines' cores to the learner while its passes are queued:
    a pass submitted BEFORE set_threads, but run after it, runs with the new count."""
    from learner.actor import CONTROL, LearnerGroup

    group = LearnerGroup(LearnerConfig(cpus_per_rank=0.5), str(tiny_model_dir), MAX_NEW, timeout_s=60,
                         rank_cls=held_rank_cls())
    try:
        (rank,) = group.rank_actors
        held = rank.hold.remote(60.0)
        queued = rank.threads_of_next_pass.remote()  # behind the held call, like a queued backprop pass
        group.set_threads(2)
        rank.release.options(concurrency_group=CONTROL).remote()  # runs after set_threads (same group, in order)
        assert ray.get(held, timeout=60) is True
        assert ray.get(queued, timeout=60) == 2
        group.set_threads(1)  # not waited for: a control-group call behind it is the barrier
        ray.get(rank.release.options(concurrency_group=CONTROL).remote(), timeout=60)
        assert ray.get(rank.threads_of_next_pass.remote(), timeout=60) == 1
    finally:
        group.shutdown()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_exact_resume_export(ray_local, tiny_model_dir, tmp_path, stage):
    from transformers import AutoModelForCausalLM

    from learner.actor import LearnerGroup

    cfg = LearnerConfig(zero_stage=stage, num_ranks=2, prompts_per_step=6, micro_batch_tokens=40, lr=1e-3)
    group = LearnerGroup(cfg, str(tiny_model_dir), MAX_NEW, timeout_s=120)
    try:
        groups = make_groups(6, seed=8)[::-1]  # uids follow arrival order
        # a one-token prompt: its head is empty (padding only) in its micro-batch's head pass
        groups[1] = dataclasses.replace(groups[1], prompt_token_ids=groups[1].prompt_token_ids[:1])
        kept = select_samples(groups, cfg.advantage, cfg.filter_threshold, cfg.filter)
        ref = reference_gradients(tiny_model_dir, kept.samples, cfg, kept.samples_in)
        assert max_rel_error(group.probe_gradients(groups), ref) <= 1e-5
        assert group.forward_uids() == {s.uid for s in kept.samples}
        assert group.has_reference_model() == [False, False]
        if stage == 2:
            return
        batches = [make_groups(6, seed=s) for s in (10, 11, 12, 13)]

        def train(bs):
            for b in bs:
                group.begin_batch(6)
                b = [dataclasses.replace(g, policy_version=group.policy_version) for g in b]  # sampled on-policy
                group.add_groups(b[:3])
                group.add_groups(b[3:])
                assert group.end_batch().steps == 1
        train(batches[:2])
        group.save_checkpoint(str(tmp_path / "ckpt"))
        train(batches[2:])
        w_straight = group.full_weights()
        state = group.load_checkpoint(str(tmp_path / "ckpt"))
        assert state.optimizer_steps == 2 and state.policy_version == 2
        train(batches[2:])
        w_resumed = group.full_weights()
        assert all(torch.equal(w_straight[k], w_resumed[k]) for k in w_straight)
        group.export_hf(str(tmp_path / "hf"))
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        assert all(torch.equal(p, w_resumed[n]) for n, p in exported.named_parameters())
    finally:
        group.shutdown()


def test_stale_jit_build_lock_is_cleared_and_a_fresh_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert clear_stale_build_lock(600.0) == []  # a build in progress: left alone
    assert lock.exists()
    old = time.time() - 601.0
    os.utime(lock, (old, old))  # a killed run's lock, 10 minutes old
    assert clear_stale_build_lock(600.0) == [lock]
    assert not lock.exists()
    assert clear_stale_build_lock(600.0) == []


def test_refill_gradient_equals_a_batch_of_only_the_kept_groups(trainers):
    # make_groups drops every third group whole (0 and 3 here): with refill they take no slot, so
    # the 4 slots of one optimizer batch are filled by groups 1, 2, 4 and 5.
    groups = make_groups(6, seed=3)
    trainer = trainers(0)
    cfg = LearnerConfig(prompts_per_step=4, micro_batch_tokens=64, grad_clip=0.0)
    kept_groups = [groups[i] for i in (1, 2, 4, 5)]
    # Both probes run on the trainer's current weights (earlier tests may have stepped it).
    plain = StreamingBatcher(cfg, LocalRankPool(trainer), MAX_NEW).probe_gradients(kept_groups)
    refilled = StreamingBatcher(dataclasses.replace(cfg, refill=True), LocalRankPool(trainer), MAX_NEW).probe_gradients(groups)
    assert min(float(g.norm()) for g in plain.values()) > 0
    assert max_rel_error(refilled, plain) <= 1e-6


def test_refill_asks_for_the_dropped_groups_and_steps_once_filled(trainers):
    groups = make_groups(9, seed=4)  # groups 0, 3 and 6 are dropped whole
    trainer = trainers(0)
    cfg = LearnerConfig(prompts_per_step=4, micro_batch_tokens=64, refill=True)
    batcher = StreamingBatcher(cfg, LocalRankPool(trainer), MAX_NEW)
    steps_before = trainer.optimizer_steps
    batcher.begin_batch(4)
    batcher.add_groups(groups[:4])
    assert batcher.groups_wanted == 2 and trainer.optimizer_steps == steps_before
    batcher.add_groups(groups[4:6])  # the refill: one kept, one kept -> full
    assert batcher.groups_wanted == 0
    stats = batcher.end_batch()
    assert stats.steps == 1 and trainer.optimizer_steps == steps_before + 1
    assert stats.samples_in == 6 * 4 and stats.samples_kept == 4 * 4 and stats.refill_needed == 2
    # The driver may stop short (refill_rounds spent): the step runs on the kept groups it has.
    batcher.begin_batch(4)
    batcher.add_groups(groups[6:9])  # 6 dropped, 7 and 8 kept
    assert batcher.groups_wanted == 2
    stats = batcher.end_batch()
    assert stats.steps == 1 and stats.samples_kept == 2 * 4 and trainer.optimizer_steps == steps_before + 2
    # Without refill the same short batch is an error, not a silent partial step.
    plain = StreamingBatcher(dataclasses.replace(cfg, refill=False), LocalRankPool(trainer), MAX_NEW)
    plain.begin_batch(4)
    plain.add_groups(groups[6:9])
    assert plain.groups_wanted == 0
    with pytest.raises(ValueError, match="end_batch after 3 of the 4 groups"):
        plain.end_batch()


def test_padded_and_varlen_layouts_give_the_one_sample_logprobs(tiny_model_dir):
    # The GPU path (one padding-free row, flash varlen) cannot run here; on CPU, transformers finds
    # the same sequence boundaries from the restarting position ids and masks across them, which
    # checks the row that `varlen_inputs` builds.
    from transformers import AutoModelForCausalLM

    from learner.trainer import forward_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    groups = make_groups(4, seed=9)
    # the two kept groups' prompts: one a token longer than the other (heads of two lengths, one prefix)
    groups[2] = dataclasses.replace(groups[2], prompt_token_ids=groups[1].prompt_token_ids + (5,))
    samples = select_samples(groups, "grpo", 0.1, True).samples
    assert len({s.num_tokens for s in samples}) > 3  # rows of many lengths: real padding
    mb = collate(samples, "token_mean")
    want = teacher_forced_logprobs(model, samples)
    with torch.no_grad():
        for attention in ("padded_sdpa", "flash_varlen"):
            got, _ = forward_logprobs(model, mb, attention, torch.device("cpu"))
            torch.testing.assert_close(got, torch.cat(list(want.values())), atol=2e-6, rtol=0)  # sample order = row order
        # shared prompt heads: each bin's prompts run once and every row continues their K/V cache
        for b in pack_samples(samples, 10_000, share_prompts=True):
            part = [samples[i] for i in b]
            shared = collate(part, "token_mean", share_prompts=True)
            assert len(shared.prompt_heads) < len(part) and len(set(shared.head_lengths.tolist())) > 1
            got, _ = forward_logprobs(model, shared, "padded_sdpa", torch.device("cpu"))
            torch.testing.assert_close(got, torch.cat([want[s.uid] for s in part]), atol=2e-6, rtol=0)


def test_cpu_runs_the_padded_layout():
    from learner.trainer import attention_kind

    # flash attention needs CUDA, the flash_attn package and bf16 (it has no fp32 kernels)
    assert attention_kind(bf16=False) == "padded_sdpa"
    if not torch.cuda.is_available():
        assert attention_kind(bf16=True) == "padded_sdpa"


def test_learner_and_sampler_logprobs_match_when_weights_are_equal(trainers, tiny_model_dir):
    from rollout_workers.engines.base import SamplingParamsSpec
    from rollout_workers.engines.hf import HFEngine

    trainer = trainers(0, prompts_per_step=2)  # 4 groups = 2 steps: step 0's backprop and step 1's old-logprob pass
    batcher = StreamingBatcher(trainer.cfg, LocalRankPool(trainer), MAX_NEW)
    sampler = HFEngine(str(tiny_model_dir), seed=0)
    prompts = [Prompt(f"m{i}", f"{10 + 7 * i}+{23 + i}=", "") for i in range(4)]

    def learn_from_samples(temperature: float, version: int):
        sampler.update_weights(trainer.full_weights().items(), version)  # sampler weights = learner weights
        outs = sampler.generate(prompts, SamplingParamsSpec(n=4, temperature=temperature, max_new_tokens=MAX_NEW, seed=version))
        batcher.begin_batch(4)
        batcher.add_groups([ScoredGroup(o.prompt, o.prompt_token_ids, o.completions, (1.0, 0.0, 1.0, 0.0), o.policy_version, 0)
                            for o in outs])
        return batcher.end_batch()

    # control: a learner not told the sampling temperature (T = 1) sees another distribution
    warped = learn_from_samples(0.7, 1)
    assert warped.logprob_diff_mean > 0.01 and warped.logprob_ratio_max > 1.01
    try:  # told the temperature, it divides its logits by it and matches the sampler again
        trainer.sampling_temperature = 0.7
        tempered = learn_from_samples(0.7, 2)
    finally:
        trainer.sampling_temperature = 1.0
    assert 0.0 <= tempered.logprob_diff_mean <= 1e-4 and abs(tempered.logprob_ratio_max - 1.0) <= 1e-4
    same = learn_from_samples(1.0, 3)
    assert same.steps == 2 and same.samples_kept == 16
    assert 0.0 <= same.logprob_diff_mean <= 1e-4 and abs(same.logprob_ratio_max - 1.0) <= 1e-4
    # the learn time split (forward, backward, old-logprob pass, optimizer) is measured
    assert min(same.seconds_forward, same.seconds_backward, same.seconds_old_logprobs, same.seconds_optimizer) > 0
