"""The DASH training driver, a Ray job entrypoint.

    python -m launch.train                                      # the embedded CPU default (tiny-cpu)
    python -m launch.train --config qwen2.5-1.5b-math learner.filter_threshold=0.1 run.dir=/tmp/x
    python -m launch.train --resume runs/tiny-cpu-20261126-070000
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m launch.train --config ...

One iteration (`train_iteration`) reads top to bottom: sample -> score -> filter -> learn -> sync
-> log. Sampling and scoring happen in the rollout workers and stream scored groups back; the
learner filters and backprops each group as it arrives, so in DASH mode "learn" overlaps
"generate" and only the tail of the backprop is on the clock after the last group. With
train.overlap=true the next batch is also sampled while this one is learned (one version stale).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence, TypeVar

import ray
import torch
from tqdm import tqdm

from launch import checkpoints
from launch.config import Config, ConfigError, dump_yaml, help_text, list_presets, load_config, resolved_placement, to_dict
from launch.eval import held_out_set
from launch.metrics import MetricsLogger, PhaseTimer, console_line, write_plots
from launch.placement import Placement, ds_accelerator, make_placement, preflight
from launch.sft import StopProbe, greedy_probe, rows_within_limits, sft_train
from launch.tiny_model import write_tiny_model_dir
from launch.actors import SyncedLearnerRank, SyncedRolloutWorker
from launch.sync_group import SyncGroup
from learner.actor import LearnerGroup
from learner.advantages import group_advantages
from learner.batcher import LearnStats
from rollout_workers.dispatch import BatchReport, Dispatcher
from rollout_workers.engines.base import GroupOutput, SamplingParamsSpec
from rollout_workers.engines.registry import get_engine
from launch.data.cursor import PromptCursor
from launch.data.model_prompts import drop_long_prompts, prompts_for_model
from launch.data.sources import LoadResult, load_prompts
from launch.data.templates import sft_target
from rollout_workers.seeding import derive_seed
from rollout_workers.types import Prompt, ScoredGroup
from rollout_workers.worker import make_rollout_workers
from weight_sync.endpoint import SyncError
from weight_sync.transports import get_transport


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: checkpoint, shut the actors down, exit."""


class Sampled(NamedTuple):
    """A sampled batch: its scored groups, and what the dispatcher refused or left unsampled."""

    groups: list[ScoredGroup]
    report: BatchReport


class Prefetched(NamedTuple):
    """A batch whose sampling started during the previous iteration (train.overlap)."""

    num_prompts: int
    version: int
    """Weight version of the engines that sample it (one behind the learner once this iteration syncs)."""
    cursor_before: dict
    """Data cursor before this batch was drawn: a checkpoint taken while it is pending rewinds to it."""
    sampled: Future  # -> Sampled


class IterationResult(NamedTuple):
    record: dict
    """The metrics.jsonl record of the iteration."""
    sync_error: SyncError | None
    """Set when the engines could not be brought to the new weights (the run then stops)."""


@dataclass
class Run:
    """Everything one training run holds. Built by `setup`, torn down by `shutdown`."""

    cfg: Config
    run_dir: Path
    placement: Placement
    dispatcher: Dispatcher
    learner: LearnerGroup
    sync: SyncGroup
    cursor: PromptCursor
    eval_prompts: list[Prompt]
    logger: MetricsLogger
    prefetcher: ThreadPoolExecutor
    prefetched: Prefetched | None = None
    """Batch t+1, sampling in the background (train.overlap); None when the pipeline is drained."""
    version: int = 0
    iteration: int = 0
    samples_generated: int = 0
    samples_kept: int = 0
    train_seconds: float = 0.0
    prompts_refused: Counter = field(default_factory=Counter)
    """Reason -> training prompts the rollout workers refused, whole run."""


# ----------------------------------------------------------------------------- one iteration

def train_iteration(run: Run, prefetch_next: bool) -> IterationResult:
    """sample -> score -> filter -> learn -> sync -> log, each phase timed. With `prefetch_next`
    (train.overlap) the engines sample batch t+1 with the current weights while the learner
    trains on batch t; batch t+1 is then one policy version stale, which the record logs."""
    cfg, timer = run.cfg, PhaseTimer()
    report = BatchReport()
    with timer.phase("generate"):
        run.learner.set_threads(thread_budget(cfg, "sample").learner)  # the engines' share rides on their requests
        refill_prompts = 0
        if run.prefetched is None:
            # sample + score (workers) -> filter + learn (learner), streamed group by group, so the
            # backprop of early groups overlaps the sampling of later ones.
            num_prompts, groups = batch_prompts(cfg), []
            run.learner.begin_batch(num_prompts, sampled_version=run.version)
            prompts = run.cursor.next_batch(num_prompts)
        else:  # sampled during the previous iteration's learn phase; only the rest of the wait is on the clock
            num_prompts, (groups, report) = run.prefetched.num_prompts, run.prefetched.sampled.result(cfg.train.actor_timeout_s)
            run.learner.begin_batch(num_prompts, sampled_version=run.prefetched.version)
            run.prefetched = None
            run.learner.add_groups(groups)
            prompts, report.unsampled = report.unsampled, []  # every worker died during the prefetch
        groups += learn_as_sampled(run, sample(run, prompts, run.iteration, report), prompts)
        # A prompt a worker refused (too long for the engine) never sends a group: its slot is
        # dropped, or left empty for the refill below (learner.refill).
        run.learner.drop_slots(sum(report.refused.values()))
        # DAPO-style refill (learner.refill): a group the filter dropped whole left its slot
        # empty; sample that many more prompts, at most learner.refill_rounds times.
        for refill in range(1, cfg.learner.refill_rounds + 1):
            wanted = run.learner.groups_wanted
            if wanted == 0:
                break
            refill_prompts += wanted
            run.learner.set_threads(thread_budget(cfg, "refill").learner)
            refill_batch = run.cursor.next_batch(wanted)
            groups += learn_as_sampled(run, sample(run, refill_batch, run.iteration, report, refill), refill_batch)
    # the engines are idle (or sample the next batch): the learn tail gets the cores (or shares them)
    run.learner.set_threads(thread_budget(cfg, "learn").learner)
    if prefetch_next:  # after the learner's share is set: the prefetch hands it more once it is done
        run.prefetched = start_prefetch(run, num_prompts)
    if cfg.rollout.enable_sleep_mode:  # colocated: free the GPUs for the learner until the sync
        with timer.phase("sync"):
            ray.get([w.sleep.remote() for w in run.dispatcher.workers], timeout=cfg.train.actor_timeout_s)
    with timer.phase("learn"):
        stats = run.learner.end_batch()
    with timer.phase("generate"):  # the engines must be idle before their weights change
        if run.prefetched is not None:
            run.prefetched.sampled.result(cfg.train.actor_timeout_s)
    with timer.phase("sync"):
        # Between iterations, on the driver's thread: a restart loads the learner's weights, so it
        # must never run on the prefetch thread while the learner is inside end_batch.
        restart_dead_workers(run)
        sync_error = sync_engines(run)
    timer.seconds["score"] = sum(g.score_seconds for g in groups)  # inside "generate", in the workers
    record = iteration_record(run, groups, stats, timer.finish(), refill_prompts)
    record["prompts_refused"] = dict(report.refused)
    run.prompts_refused.update(report.refused)
    run.samples_generated += record["samples_generated"]
    run.samples_kept += stats.samples_kept
    run.logger.log_samples(sample_records(run, groups))
    return IterationResult(record, sync_error)


def sample_records(run: Run, groups: list[ScoredGroup]) -> list[dict]:
    """samples.jsonl lines of this iteration: the first completion of the first `run.log_samples`
    groups (arrival order), with its reward and its group-relative advantage (learner.advantage)."""
    out = []
    for g in groups[:run.cfg.run.log_samples]:
        advantages = group_advantages(torch.tensor([g.rewards], dtype=torch.float64), run.cfg.learner.advantage)  # (1, G)
        out.append({"iteration": run.iteration, "policy_version": g.policy_version, "uid": g.prompt.uid,
                    "prompt": g.prompt.text, "completion": g.completions[0].text, "gold": g.prompt.gold,
                    "reward": g.rewards[0], "advantage": float(advantages[0, 0])})
    return out


def sync_engines(run: Run) -> SyncError | None:
    """Bring the engines to the learner's weights. A failed sync is returned, not raised: the
    learner's step is done, so the iteration is logged and checkpointed before the run stops."""
    if run.cfg.rollout.enable_sleep_mode:  # asleep since sampling (a restarted worker starts awake)
        ray.get([w.wake_up.remote() for w in run.dispatcher.workers], timeout=run.cfg.train.actor_timeout_s)
    if run.sync.workers != run.dispatcher.workers:  # a worker was restarted: rebuild the side group
        run.sync.set_workers(run.dispatcher.workers, run.dispatcher.names)
    if run.learner.policy_version == run.version:  # no optimizer step (all filtered) = nothing to send
        return None
    run.version = run.learner.policy_version
    try:
        run.sync.sync(run.version)
    except SyncError as e:
        return e
    return None


def learn_as_sampled(run: Run, groups: Iterable[ScoredGroup], prompts: Sequence[Prompt]) -> list[ScoredGroup]:
    """Hand the groups sampled for `prompts` to the learner: each as it arrives (train.stream_learn),
    or all of them once the sampling ends, so that the engines had the cores to themselves
    (`thread_budget`), in `prompts`' order (`in_prompt_order`)."""
    got = []
    for group in groups:
        got.append(group)
        if run.cfg.train.stream_learn:
            run.learner.add_groups([group])
    if not run.cfg.train.stream_learn:
        got = in_prompt_order(got, prompts)
        run.learner.add_groups(got)
    return got


GroupT = TypeVar("GroupT", ScoredGroup, GroupOutput)
"""A group as the engines return it or as the workers score it: both name their prompt."""


def in_prompt_order(groups: Sequence[GroupT], prompts: Sequence[Prompt]) -> list[GroupT]:
    """`groups` in the order of the `prompts` that asked for them (the data cursor's shuffled order),
    not in the order they finished. The learner fills its optimizer steps in the order groups are
    handed over (DASH Sec. 3.1: the preemptive batch's first prompts_per_step groups are step 0's),
    and an engine finishes groups by length: vLLM hands back the shortest first, so by arrival the
    batch's first step would learn only its shortest groups and its last step the longest, and
    with several workers which groups share a step would depend on timing. A prompt drawn twice
    keeps its first position (its groups stay in arrival order between themselves). Scored or not
    (`launch.bench arrival` orders an engine's raw groups)."""
    position: dict[str, int] = {}
    for i, p in enumerate(prompts):
        position.setdefault(p.uid, i)
    return sorted(groups, key=lambda g: position[g.prompt.uid])


def sample(run: Run, prompts: list[Prompt], iteration: int, report: BatchReport, refill: int = 0,
           on_driver_thread: bool = True) -> Iterator[ScoredGroup]:
    """Scored groups of one sampled batch as they arrive; refused prompts are counted in `report`.
    DASH samples the whole preemptive batch in one engine call; standard GRPO one micro-batch of
    prompts per call (the paper's Sec. 3.1 baseline). `refill` > 0: the k-th refill call of the
    iteration (its own sampling seed). If every worker dies, the driver's thread restarts them and
    samples the rest; another thread (the prefetch) leaves the rest in `report.unsampled`."""
    params = sampling_params(run.cfg, iteration, refill)
    for call in sampling_calls(run.cfg, prompts):
        yield from dispatch(run, call, iteration, params, report, on_driver_thread, "refill" if refill else "sample")


RESTARTS_PER_CALL = 3
"""A batch whose fresh workers all die again this many times stops the run (a crash loop, not bad luck)."""


def dispatch(run: Run, prompts: list[Prompt], batch_id: int, params: SamplingParamsSpec, report: BatchReport,
             on_driver_thread: bool = True, phase: str = "sample") -> Iterator[ScoredGroup]:
    """One dispatcher call; on the driver's thread, prompts left unsampled because every worker
    died are sampled again once `restart_dead_workers` has replaced them. `phase` ("sample",
    "refill" or "eval") sets the engines' thread share (`thread_budget`)."""
    threads = thread_budget(run.cfg, phase).engine
    yield from run.dispatcher.run(prompts, batch_id=batch_id, params=params, report=report, engine_threads=threads)
    restarts = 0
    while on_driver_thread and report.unsampled:
        if restarts == RESTARTS_PER_CALL:
            raise RuntimeError(f"batch {batch_id}: every rollout worker died again after {restarts} restarts; "
                               f"{len(report.unsampled)} prompts unsampled")
        restart_dead_workers(run)
        left, report.unsampled, restarts = report.unsampled, [], restarts + 1
        again = replace(params, seed=derive_seed(params.seed, "after_restart", restarts))  # not the first call's streams
        yield from run.dispatcher.run(left, batch_id=batch_id, params=again, report=report, engine_threads=threads)


def restart_dead_workers(run: Run) -> None:
    """Replace the dead rollout workers (train.on_worker_death=restart). Driver thread only: the
    ranks then get the weight gathers in the same order as every other learner call."""
    run.dispatcher.restart_dead()


def start_prefetch(run: Run, num_prompts: int) -> Prefetched:
    """Start sampling the next batch in a driver thread (the engines run in their actors; the
    thread only waits on them). The cursor position before it is kept so that a checkpoint taken
    while it is pending rewinds to it and --resume samples that batch again."""
    cursor_before = run.cursor.state()
    prompts = run.cursor.next_batch(num_prompts)
    return Prefetched(num_prompts, run.version, cursor_before,
                      run.prefetcher.submit(sample_all, run, prompts, run.iteration + 1))


def sample_all(run: Run, prompts: list[Prompt], iteration: int) -> Sampled:
    """The prefetch thread's job: never restarts a worker (see `restart_dead_workers`). Once the
    engines are done, their cores go to the learner for the rest of its batch (`thread_budget`)."""
    report = BatchReport()
    sampled = Sampled(in_prompt_order(list(sample(run, prompts, iteration, report, on_driver_thread=False)), prompts),
                      report)
    run.learner.set_threads(thread_budget(run.cfg, "prefetched").learner)
    return sampled


def batch_prompts(cfg: Config) -> int:
    """Prompts sampled per iteration: the preemptive batch (DASH) or one optimizer batch (standard GRPO)."""
    return cfg.rollout.prompts_per_generation if cfg.train.mode == "dash" else cfg.learner.prompts_per_step


def sampling_calls(cfg: Config, prompts: list[Prompt]) -> list[list[Prompt]]:
    """The engine calls of one batch: all prompts at once (DASH), or micro-batch sized chunks."""
    if cfg.train.mode == "dash":
        return [prompts]
    per_call = standard_grpo_prompts_per_call(cfg)
    return [prompts[i:i + per_call] for i in range(0, len(prompts), per_call)]


def standard_grpo_prompts_per_call(cfg: Config) -> int:
    """Standard GRPO samples one backprop micro-batch at a time: as many prompts as G samples of
    the longest length fit in learner.micro_batch_tokens."""
    longest = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    return max(1, cfg.learner.micro_batch_tokens // (cfg.rollout.group_size * longest))


def sampling_params(cfg: Config, iteration: int, refill: int = 0) -> SamplingParamsSpec:
    """Sampling of iteration `iteration`'s batch (`refill` > 0: its k-th refill call), each with its own seed."""
    r = cfg.rollout
    return SamplingParamsSpec(n=r.group_size, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                              seed=derive_seed(r.seed, "iteration", iteration, "refill", refill))


def iteration_record(run: Run, groups: list[ScoredGroup], stats: LearnStats, times: dict[str, float],
                     refill_prompts: int) -> dict:
    rewards = [x for g in groups for x in g.rewards]
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    tokens = sum(lengths)
    staleness = stats.staleness  # versions behind -> groups: {0: n} on-policy, {1: n} with train.overlap
    num_groups = sum(staleness.values())
    return {
        "iteration": run.iteration,
        "policy_version": run.version,
        "reward_mean": sum(rewards) / max(1, len(rewards)),
        "accuracy": sum(r >= 1.0 for r in rewards) / max(1, len(rewards)),
        "kept_fraction": stats.samples_kept / max(1, stats.samples_in),
        "drop_reasons": dict(stats.drop_reasons),
        "response_length_mean": tokens / max(1, len(lengths)),
        "tokens_generated": tokens,
        "samples_generated": len(rewards),
        "samples_kept": stats.samples_kept,
        "refill_prompts": refill_prompts,
        "tokens_per_second": tokens / max(1e-9, times["time/total"]),
        "staleness": {str(lag): n for lag, n in staleness.items()},
        "staleness_mean": sum(lag * n for lag, n in staleness.items()) / max(1, num_groups),
        "staleness_max": max(staleness, default=0),
        "optimizer_steps": stats.steps,
        "lr": stats.lr,
        "loss": stats.loss,
        "grad_norm": stats.grad_norm,
        "clip_fraction": stats.clip_frac,
        **({"kl": stats.kl} if run.cfg.learner.kl_coef > 0 else {}),
        "skipped_nonfinite_steps": stats.skipped_nonfinite,
        "empty_steps": stats.empty_steps,
        "ratio_mean": stats.ratio_mean,
        # engine/learner drift: learner (pre-update weights) vs sampler logprobs on the same tokens
        "logprob_diff_mean": stats.logprob_diff_mean,
        "logprob_ratio_max": stats.logprob_ratio_max,
        # off-policy weights pi_prox / pi_behav (learner.off_policy applies them; logged in every mode)
        "is_weight_mean": stats.is_weight_mean,
        "is_weight_max": stats.is_weight_max,
        "is_capped_fraction": stats.is_capped_fraction,
        "effective_sample_size": stats.effective_sample_size,
        # the learn phase split; rank-side seconds summed over learner ranks
        "time/learn_forward": stats.seconds_forward,
        "time/learn_backward": stats.seconds_backward,
        "time/learn_old_logprobs": stats.seconds_old_logprobs,
        "time/learn_optimizer": stats.seconds_optimizer,
        **times,
    }


# ----------------------------------------------------------------------------- evaluation

def evaluate(run: Run, train_seconds: float) -> dict:
    """Greedy pass@1 on the held-out prompts, through the same workers and reward function.
    Returns one point of the accuracy curve (against training wall seconds and samples)."""
    params = SamplingParamsSpec(n=1, greedy=True, max_new_tokens=run.cfg.eval.max_new_tokens, seed=0)
    rewards, report = [], BatchReport()
    for group in dispatch(run, run.eval_prompts, -1 - run.iteration, params, report, phase="eval"):
        rewards.append(group.rewards[0])
    # A refused eval prompt counts as wrong (the load-time filter makes this 0 in a normal run).
    return {"iteration": run.iteration, "train_seconds": train_seconds, "samples_generated": run.samples_generated,
            "accuracy": sum(r >= 1.0 for r in rewards) / len(run.eval_prompts),
            "reward_mean": sum(rewards) / len(run.eval_prompts), "prompts_refused": dict(report.refused)}


# ----------------------------------------------------------------------------- set-up

def sampler_logprobs_exact(cfg: Config) -> bool:
    """The engines' logprobs are their weights' own policy up to float rounding (fp32 weights, no
    nucleus truncation; the temperature is modelled by the learner), so learner.old_logprobs=auto
    may take them as the old logprobs of a group sampled at the learner's current version."""
    return cfg.rollout.dtype == "float32" and cfg.rollout.top_p == 1.0


def prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.run.dir or f"runs/{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "config.yaml")
    return run_dir


def prepare_model(cfg: Config, run_dir: Path, train_prompts: list[Prompt]) -> tuple[Path, dict]:
    """The policy's starting point. With model.path that directory; else the embedded tiny model:
    an offline-trained tokenizer and a Qwen2-style model, SFT-warmed on the training prompts."""
    if cfg.model.path:
        return Path(cfg.model.path), {}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_dir / "sft_model"
    if (out / "config.json").exists():  # resume: the warm-up is part of the run, not redone
        return out, json.loads((run_dir / "sft.json").read_text())
    texts = [p.text + sft_target(p) for p in train_prompts[:4000]]
    base = write_tiny_model_dir(run_dir / "base_model", texts, cfg.model.tiny_hidden_size, cfg.model.tiny_layers,
                                cfg.model.tiny_heads, seed=cfg.train.seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    r = cfg.rollout
    rows = rows_within_limits(tokenizer, [p.text for p in train_prompts], [sft_target(p) for p in train_prompts],
                              r.max_prompt_tokens, r.max_new_tokens)
    if not rows.kept and cfg.model.sft_steps:
        raise ConfigError(f"no training row fits the SFT warm-up: each needs a prompt within rollout.max_prompt_tokens="
                          f"{r.max_prompt_tokens} and a target within rollout.max_new_tokens={r.max_new_tokens} "
                          f"(skipped: {dict(rows.skipped)}); raise them or set model.sft_steps=0")
    sft_prompts = [train_prompts[i] for i in rows.kept]
    probe_set = sft_prompts[-cfg.model.sft_probe_size:]  # training problems: the held-out set stays unseen until eval
    accuracy = lambda: greedy_probe(model, tokenizer, [p.text for p in probe_set], [p.gold for p in probe_set],
                                    r.max_new_tokens)
    probe = StopProbe(accuracy, cfg.model.sft_probe_every, cfg.model.sft_stop_accuracy) if cfg.model.sft_stop_accuracy > 0 else None
    stats = sft_train(model, tokenizer, [p.text for p in sft_prompts], [sft_target(p) for p in sft_prompts],
                      cfg.model.sft_steps, cfg.model.sft_lr, cfg.model.sft_batch_size, cfg.train.seed,
                      probe=probe)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {"sft_steps": stats.steps, "sft_final_loss": stats.final_loss, "sft_seconds": stats.seconds,
            "sft_probe_accuracy": stats.probe_accuracy, "sft_rows": len(rows.kept), "sft_rows_skipped": dict(rows.skipped)}
    print(f"SFT warm-up: {stats.steps} steps in {stats.seconds:.0f}s, loss {stats.final_loss:.3f}, probe accuracy "
          f"{stats.probe_accuracy:.2f}, on {len(rows.kept)} rows (left out: {dict(rows.skipped) or 'none'})", flush=True)
    (run_dir / "sft.json").write_text(json.dumps(info))
    return out, info


def connect_ray(cfg: Config) -> None:
    """Join the cluster this job runs in (RAY_ADDRESS under `ray job submit`), or start a local one."""
    if ray.is_initialized():
        return
    env = {"DS_ACCELERATOR": ds_accelerator(cfg), "TOKENIZERS_PARALLELISM": "false"}
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    address = cfg.train.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # A local cluster: the repo must be importable in the workers too.
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(include_dashboard=False, log_to_driver=False, num_cpus=max(os.cpu_count() or 1, needed_cpus(cfg)),
                 runtime_env={"env_vars": {k: v for k, v in env.items() if v}})
    else:
        # Under `ray job submit` the job's runtime env already reaches every actor, and Ray refuses
        # to merge a ray.init env that sets the same keys: add only what the job did not set.
        extra = {k: v for k, v in env.items() if v and k not in os.environ}
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": extra} if extra else None)




class ThreadBudget(NamedTuple):
    """Intra-op torch threads of one phase (train.thread_handover)."""

    engine: int
    """Per rollout engine."""
    learner: int
    """Per learner rank."""


PHASES = ("sample", "refill", "learn", "prefetched", "eval")


def thread_budget(cfg: Config, phase: str) -> ThreadBudget:
    """Threads for `phase`: on CPU, a phase in which only one side works gets the job's reserved
    cores; where both work, each keeps its own reservation, since more threads than cores cost
    more than they give (measured: README, "Async, off-policy correction and threads").
      sample: the engines sample while the learner streams the passes of the groups already in;
              with train.stream_learn=false the learner waits instead: the engines get the
              cores, and the learner its learn share for when the groups are handed over
              (not with train.overlap, whose engines sample while the learner learns);
      refill: learner.refill's extra calls: the learner learns the groups it has meanwhile;
      learn:  the backprop tail after the last group: the engines idle (unless train.overlap
              samples the next batch meanwhile);
      prefetched: train.overlap's next batch is sampled while the learner still learns: the
              engines idle again, so the learner takes the cores for the rest of its batch;
      eval:   the engines sample the held-out set; the learner idles.
    With the handover off or the engines on GPUs every actor keeps its own reservation."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {list(PHASES)}, got {phase!r}")
    r, l = cfg.rollout, cfg.learner
    cores = min(needed_cpus(cfg), os.cpu_count() or 1)  # what the job reserved, on this node
    own = ThreadBudget(max(1, int(r.cpus_per_worker)), l.rank_threads)
    if not cfg.train.thread_handover or resolved_placement(cfg) != "cpu":
        return own
    learn_share = max(1, cores // l.num_ranks)
    engine_share = max(1, cores // r.num_workers) if get_engine(r.engine).threads_per_call else own.engine
    if phase == "sample" and not cfg.train.stream_learn and not cfg.train.overlap:
        return ThreadBudget(engine_share, learn_share)
    if (phase == "learn" and not cfg.train.overlap) or phase == "prefetched":
        return own._replace(learner=learn_share)
    if phase == "eval":  # an engine that binds its threads at start (threads_per_call false) keeps them
        return own._replace(engine=engine_share)
    return own


def needed_cpus(cfg: Config) -> int:
    return math.ceil(cfg.rollout.num_workers * cfg.rollout.cpus_per_worker + cfg.learner.num_ranks * cfg.learner.cpus_per_rank)


def restart_worker(new_workers: Callable[[list[int]], list], sync: SyncGroup, learner: LearnerGroup, index: int):
    """A fresh worker for a dead one, brought to the learner's current weights through the sync
    group (every transport, nccl included) before it samples. Called through
    `Dispatcher.restart_dead` from `restart_dead_workers` (the driver's thread, between
    iterations or when every worker is dead: never while the learner is inside a batch)."""
    (worker,) = new_workers([index])
    sync.replace_worker(index, worker, learner.policy_version)
    return worker


def setup(cfg: Config, run_dir: Path) -> tuple[Run, dict]:
    train = load_prompts(cfg.data, "train")
    # The tiny model's tokenizer is trained on the training prompts, so the length filter runs
    # once the model exists (the SFT warm-up is not bound by the engine's prompt limit). Over-long
    # prompts are dropped here and counted as skipped rows, so no worker has to refuse them.
    model_path, sft_info = prepare_model(cfg, run_dir, train.prompts)
    # Prompts as the model sees them (its chat template, data.chat_template), tokenized once: the ids travel with them.
    to_model = lambda prompts: prompts_for_model(prompts, str(model_path), cfg.data.chat_template, cfg.rollout.answer_format)
    train = drop_long_prompts(LoadResult(to_model(train.prompts), train.skipped), cfg.rollout.max_prompt_tokens)
    evals = held_out_set(cfg.data, to_model, cfg.rollout.max_prompt_tokens, cfg.eval.size)  # = launch.eval's
    if not train.prompts or not evals.prompts:
        raise ConfigError(f"no prompt of the {'train' if not train.prompts else 'eval'} split fits in "
                          f"rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens} "
                          f"(skipped rows: {dict(train.skipped + evals.skipped)})")
    if len(train.prompts) < batch_prompts(cfg):  # a batch never holds a prompt twice (PromptCursor.next_batch)
        key = "rollout.prompts_per_generation" if cfg.train.mode == "dash" else "learner.prompts_per_step"
        raise ConfigError(f"{key}={batch_prompts(cfg)} is more than the {len(train.prompts)} training prompts that fit "
                          f"rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens} (skipped rows: {dict(train.skipped)})")
    data_info = {"train_prompts": len(train.prompts), "eval_prompts": len(evals.prompts),
                 "skipped_rows": dict(train.skipped + evals.skipped)}
    connect_ray(cfg)
    placement = make_placement(cfg)
    timeout = cfg.train.actor_timeout_s
    learner = LearnerGroup(cfg.learner, str(model_path), cfg.rollout.max_new_tokens, timeout,
                           placement_group=placement.pg, bundle_offset=placement.learner_bundle_offset,
                           rank_cls=SyncedLearnerRank, gpu_fraction=placement.gpu_fraction,
                           sampling_temperature=cfg.rollout.temperature, sampler_exact=sampler_logprobs_exact(cfg))

    def new_workers(indices: list[int] | None = None) -> list:
        return make_rollout_workers(cfg.rollout, str(model_path), placement.pg, first_bundle=placement.worker_bundles[0][0],
                                    num_gpus_per_worker=placement.gpu_fraction * cfg.rollout.tensor_parallel_size,
                                    worker_cls=SyncedRolloutWorker, indices=indices,
                                    weight_transfer_backend=get_transport(cfg.sync.transport).vllm_backend)

    dispatcher = Dispatcher(new_workers(), timeout_s=timeout, on_worker_death=cfg.train.on_worker_death,
                            worker_factory=lambda index: restart_worker(new_workers, sync, learner, index))
    sync = SyncGroup(cfg.sync, learner.rank_actors, dispatcher.workers, dispatcher.names, cfg.rollout.dtype, timeout)
    cursor = PromptCursor(train.prompts, seed=cfg.data.seed)
    logger = MetricsLogger(run_dir, cfg.run.wandb, cfg.run.name, to_dict(cfg))
    run = Run(cfg, run_dir, placement, dispatcher, learner, sync, cursor, evals.prompts, logger,
              ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch"))
    return run, {**data_info, **sft_info}


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(run: Run, extra: dict) -> Path:
    """Checkpoint `run` now; `extra` (evals, stopped_by) is stored with the driver state."""
    # A batch prefetched but not yet learned (train.overlap, interrupted) is not in the
    # checkpoint: the cursor is saved from before it, so --resume samples it again.
    cursor = run.prefetched.cursor_before if run.prefetched else run.cursor.state()
    state = checkpoints.RunState(run.iteration, run.version, cursor, run.samples_generated, run.samples_kept,
                                 run.train_seconds, dict(run.prompts_refused), extra)
    return checkpoints.save(run.run_dir, run.learner, state, run.cfg.train.keep_checkpoints)


def restore_checkpoint(run: Run) -> dict:
    """Continue `run` from its newest complete checkpoint; returns the stored `extra` keys."""
    state = checkpoints.restore_latest(run.run_dir, run.learner)
    run.cursor.load_state(state.cursor)
    run.iteration, run.version = state.iteration, state.version
    run.samples_generated, run.samples_kept = state.samples_generated, state.samples_kept
    run.prompts_refused = Counter(state.prompts_refused)
    run.train_seconds = state.train_seconds
    run.logger.truncate_after(run.iteration)
    return state.extra


# ----------------------------------------------------------------------------- the loop

def train(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """Run (or resume) training; returns the summary also written to run_dir/summary.json.
    summary["evals"] is the accuracy curve: one point per evaluation, against `train_seconds`
    (wall seconds inside training iterations, evaluation and checkpoints excluded) and samples.

    SIGINT/SIGTERM: the current iteration finishes, a checkpoint is written at that consistent
    point (no prompt half-consumed), the actors are shut down and Interrupted is raised; a second
    signal stops at once. A weight-sync failure also leaves a resumable checkpoint behind."""
    start = time.perf_counter()
    run, info = setup(cfg, run_dir)
    stop: list[str] = []

    def on_signal(signum, _frame):
        stop.append(signal.Signals(signum).name)
        if len(stop) > 1:
            raise Interrupted(f"{stop[-1]} (second signal)")
        print(f"\n{stop[0]}: finishing iteration {run.iteration}, then checkpointing", flush=True)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    evals: list[dict] = []
    try:
        if resume:
            evals = restore_checkpoint(run)["evals"]
            run.sync.sync(run.version)
        if not evals:
            evals.append(evaluate(run, run.train_seconds))
            print(f"eval before RL: accuracy {evals[0]['accuracy']:.3f} on {len(run.eval_prompts)} held-out problems", flush=True)
        bar = tqdm(total=cfg.train.iterations, initial=run.iteration, desc=f"{cfg.train.mode} iterations", unit="it",
                   disable=not cfg.run.progress, dynamic_ncols=True)
        while run.iteration < cfg.train.iterations and not stop:
            run.iteration += 1
            t0 = time.perf_counter()
            # Overlap, but drain the pipeline before a checkpoint (and at the end), so a checkpoint
            # never holds a half-consumed batch and --resume replays exactly.
            checkpoint_due = bool(cfg.train.checkpoint_every) and run.iteration % cfg.train.checkpoint_every == 0
            prefetch_next = cfg.train.overlap and run.iteration < cfg.train.iterations and not stop and not checkpoint_due
            record, sync_error = train_iteration(run, prefetch_next)
            run.train_seconds += time.perf_counter() - t0
            if sync_error is not None:  # stop with a resumable checkpoint; --resume re-syncs fresh engines
                run.logger.log(record)
                path = save_checkpoint(run, {"evals": evals, "stopped_by": "weight sync failure"})
                print(f"{sync_error}\ncheckpoint {path}; continue with --resume {run_dir}", file=sys.stderr, flush=True)
                raise sync_error
            if cfg.eval.every and run.iteration % cfg.eval.every == 0 and run.iteration < cfg.train.iterations:
                evals.append(evaluate(run, run.train_seconds))
                record["eval_accuracy"] = evals[-1]["accuracy"]
            run.logger.log(record)
            bar.update(1)
            tqdm.write(console_line(record))
            if checkpoint_due:
                save_checkpoint(run, {"evals": evals})
        bar.close()
        if stop:
            path = save_checkpoint(run, {"evals": evals, "stopped_by": stop[0]})
            print(f"{stop[0]}: checkpoint {path}; continue with --resume {run_dir}", flush=True)
            raise Interrupted(stop[0])
        if evals[-1]["iteration"] != run.iteration:
            evals.append(evaluate(run, run.train_seconds))
        save_checkpoint(run, {"evals": evals})
        summary = {
            "eval_accuracy_before_rl": evals[0]["accuracy"], "eval_accuracy_after_rl": evals[-1]["accuracy"],
            "evals": evals, "iterations": run.iteration, "wall_seconds": time.perf_counter() - start,
            "train_seconds": run.train_seconds, "samples_generated": run.samples_generated,
            "samples_kept": run.samples_kept, "policy_version": run.version,
            "prompts_refused": dict(run.prompts_refused), **info,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        write_plots(run_dir, [(e["iteration"], e["accuracy"]) for e in evals])
        print_table(summary, cfg.train.mode)
        return summary
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        shutdown(run)


def shutdown(run: Run) -> None:
    """Stop everything this run started (reward pools, actors, placement group); bounded waits."""
    run.prefetcher.shutdown(wait=False, cancel_futures=True)
    run.logger.close()
    run.sync.close()
    run.learner.shutdown()
    closing = [w.close.remote() for w in run.dispatcher.workers]
    ray.wait(closing, num_returns=len(closing), timeout=30)
    for w in run.dispatcher.workers:
        ray.kill(w)
    run.placement.remove()


def print_table(summary: dict, mode: str) -> None:
    print("\n| phase | greedy accuracy (held-out) |\n|---|---|")
    print(f"| before RL | {summary['eval_accuracy_before_rl']:.3f} |")
    print(f"| after {summary['iterations']} {mode} iterations | {summary['eval_accuracy_after_rl']:.3f} |")
    print(f"\nwall {summary['wall_seconds']:.0f}s, {summary['samples_generated']} samples generated, "
          f"{summary['samples_kept']} kept for backprop", flush=True)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.train",
        description="DASH RL training (Ray + DeepSpeed + vLLM/transformers). Overrides are section.key=value.",
        epilog="presets: " + ", ".join(list_presets()) + "\n\nconfig reference:" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny-cpu", help="YAML file or preset name (default: tiny-cpu, the embedded default)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest complete checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.filter_threshold=0.1")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.yaml").exists():
                raise ConfigError(f"--resume {run_dir}: no config.yaml there")
            cfg = load_config(str(run_dir / "config.yaml"), args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        preflight(cfg, joins_cluster=bool(cfg.train.ray_address or os.environ.get("RAY_ADDRESS")))
        if not args.resume:
            run_dir = prepare_run_dir(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    print(f"run dir: {run_dir}", flush=True)
    try:
        train(cfg, run_dir, resume=bool(args.resume))
    except Interrupted:
        return 130
    except ConfigError as e:  # found once the model is known (e.g. no prompt fits rollout.max_prompt_tokens)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
