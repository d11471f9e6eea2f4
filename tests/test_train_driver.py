"""The driver's pure pieces, without Ray: seeds, the sampling parameters and engine calls of an
iteration (DASH and standard GRPO), and the mode rules of the config.

    PYTHONPATH=$PWD python -m pytest -q tests/test_train_driver.py
"""
from __future__ import annotations

import pytest
import yaml

from launch.config import ConfigError, dump_yaml, load_config
from launch.train import batch_prompts, sampling_calls, sampling_params, standard_grpo_prompts_per_call
from rollout_workers.seeding import SEED_BITS, derive_seed
from rollout_workers.types import Prompt


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(f"p-{i}", f"Q: {i} + 1 = ?\nA:", str(i + 1)) for i in range(n)]


def test_derive_seed_is_deterministic_in_range_and_separates_key_paths():
    assert derive_seed(3, "iteration", 7) == derive_seed(3, "iteration", 7)
    seeds = {derive_seed(base, "iteration", it, "refill", refill)
             for base in range(4) for it in range(50) for refill in range(3)}
    assert len(seeds) == 4 * 50 * 3  # no two streams share a seed
    assert all(0 <= s < 2 ** SEED_BITS for s in seeds)
    # The formula it replaces, base * 1_000_003 + iteration, gave base 0 / iteration 1_000_003
    # and base 1 / iteration 0 the same stream.
    assert derive_seed(0, "iteration", 1_000_003) != derive_seed(1, "iteration", 0)
    assert derive_seed(0, "a", 1) != derive_seed(0, "a1")  # keys are separated, not concatenated


def test_sampling_params_follow_the_rollout_section_with_one_seed_per_call():
    cfg = load_config(None, ["rollout.group_size=5", "rollout.temperature=0.7", "rollout.top_p=0.9",
                             "rollout.max_new_tokens=11", "rollout.seed=2"])
    p = sampling_params(cfg, iteration=3)
    assert (p.n, p.temperature, p.top_p, p.max_new_tokens, p.greedy) == (5, 0.7, 0.9, 11, False)
    assert p.seed == derive_seed(2, "iteration", 3, "refill", 0)
    assert sampling_params(cfg, 3) == p  # a resumed run samples the same batch again
    seeds = {sampling_params(cfg, it, refill).seed for it in range(1, 20) for refill in range(4)}
    assert len(seeds) == 19 * 4
    other = load_config(None, ["rollout.seed=3"])
    assert sampling_params(other, 3).seed != sampling_params(load_config(None, ["rollout.seed=2"]), 3).seed


def test_dash_samples_the_whole_preemptive_batch_in_one_call():
    cfg = load_config(None, ["rollout.prompts_per_generation=64", "learner.prompts_per_step=16"])
    assert batch_prompts(cfg) == 64
    prompts = _prompts(64)
    assert sampling_calls(cfg, prompts) == [prompts]


def test_standard_grpo_samples_one_micro_batch_of_prompts_per_call():
    # 64 prompt + 16 new tokens, G=4: 320 tokens per prompt; 1024 tokens per micro-batch -> 3 prompts a call.
    cfg = load_config(None, ["train.mode=standard_grpo", "learner.prompts_per_step=8", "rollout.group_size=4",
                             "learner.micro_batch_tokens=1024"])
    assert batch_prompts(cfg) == 8  # one optimizer batch per iteration, not the preemptive batch
    assert standard_grpo_prompts_per_call(cfg) == 3
    prompts = _prompts(8)
    calls = sampling_calls(cfg, prompts)
    assert [len(c) for c in calls] == [3, 3, 2]
    assert [p for c in calls for p in c] == prompts  # every prompt once, in order


def test_standard_grpo_resolves_the_filter_off_and_the_saved_config_says_so(tmp_path):
    cfg = load_config(None, ["train.mode=standard_grpo"])
    assert cfg.learner.filter is False
    dump_yaml(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["learner"]["filter"] is False
    assert load_config(str(tmp_path / "config.yaml")) == cfg  # --resume reads back what ran
    assert load_config(None, ["train.mode=standard_grpo", "learner.filter=false"]) == cfg
    assert load_config(None, []).learner.filter is True  # dash keeps the default


def test_a_filter_contradicting_the_mode_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"learner\.filter=True contradicts train\.mode=standard_grpo"):
        load_config(None, ["train.mode=standard_grpo", "learner.filter=true"])


def test_log_samples_must_not_be_negative():
    assert load_config(None, []).run.log_samples == 4
    with pytest.raises(ConfigError, match=r"run\.log_samples must be >= 0"):
        load_config(None, ["run.log_samples=-1"])


class _RecordingLearner:
    """Stands in for LearnerGroup's add_groups: records what it was handed, and when."""

    def __init__(self, events: list) -> None:
        self.events = events

    def add_groups(self, groups) -> None:
        self.events.append(("learner", tuple(groups)))


@pytest.mark.parametrize("stream", [True, False])
def test_groups_reach_the_learner_as_sampled_or_once_the_sampling_ends_in_prompt_order(stream):
    """train.stream_learn: streamed, each group is handed over before the next is sampled (its
    backprop overlaps the sampling); not streamed, nothing reaches the learner until the engines
    are done, so they had every core (thread_budget's "sample" phase), and then in the order of
    the prompts, not the order the engine finished them (the learner fills step 0 first)."""
    from types import SimpleNamespace

    from launch.train import learn_as_sampled

    prompts = _prompts(3)
    g0, g1, g2 = (SimpleNamespace(prompt=p) for p in prompts)
    events: list = []

    def sampled():
        for g in (g2, g0, g1):  # as an engine finishes them: shortest first
            events.append(("engine", g))
            yield g

    cfg = load_config(None, [f"train.stream_learn={str(stream).lower()}"])
    run = SimpleNamespace(cfg=cfg, learner=_RecordingLearner(events))
    got = learn_as_sampled(run, sampled(), prompts)
    if stream:
        assert got == [g2, g0, g1]
        assert events == [("engine", g2), ("learner", (g2,)), ("engine", g0), ("learner", (g0,)),
                          ("engine", g1), ("learner", (g1,))]
    else:
        assert got == [g0, g1, g2]
        assert events == [("engine", g2), ("engine", g0), ("engine", g1), ("learner", (g0, g1, g2))]


def test_in_prompt_order_follows_the_batch_and_keeps_a_repeated_prompts_groups_in_arrival_order():
    """A batch that crosses the cursor's epoch boundary can hold a prompt twice: both its groups
    take its first position, in the order they arrived; a group for no prompt of the batch is a bug."""
    from types import SimpleNamespace

    from launch.train import in_prompt_order

    a, b, c = _prompts(3)
    batch = [b, a, c, b]
    first_b, second_b, ga, gc = (SimpleNamespace(prompt=p, n=n) for n, p in enumerate((b, b, a, c)))
    assert in_prompt_order([gc, second_b, ga, first_b], batch) == [second_b, first_b, ga, gc]
    assert in_prompt_order([], batch) == []
    with pytest.raises(KeyError):
        in_prompt_order([SimpleNamespace(prompt=Prompt("x", "Q", "1"))], batch)


def test_console_line_shows_the_staleness_and_its_drift_only_on_stale_batches():
    from launch.metrics import console_line

    times = {"time/generate": 0.5, "time/learn": 1.0, "time/sync": 0.01}
    record = {"iteration": 2, "reward_mean": 0.5, "accuracy": 0.5, "kept_fraction": 0.8, "response_length_mean": 7.5,
              "loss": 0.01, "tokens_per_second": 3000.0, "policy_version": 2, **times,
              "staleness_mean": 1.0, "staleness_max": 1, "logprob_diff_mean": 0.0712, "effective_sample_size": 1.0}
    assert console_line(record).endswith("| v2 | stale 1.0 drift 0.071 ess 1.00")
    fresh = {**record, "staleness_mean": 0.0, "staleness_max": 0}
    assert console_line(fresh).endswith("| v2")
