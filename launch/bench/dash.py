"""DASH against standard GRPO, TRL's GRPOTrainer, SFT and two ablations, on one machine in one run,
each contender with several seeds, in two regimes.

    python -m launch.bench dash --quick --regime reasoning --seeds 3 \\
        --contenders dash,standard_grpo,trl_grpo --json runs/bench/reasoning.json   # the bars' command
    python -m launch.bench dash --quick --regime tiny --seeds 3 --json runs/bench/tiny.json
    python -m launch.bench.dash --json /tmp/d.json --prompts 32 --seeds 1 \\
        --contenders standard_grpo,dash --set model.sft_steps=20                    # a smoke run

Every contender starts from the same SFT-warmed tiny model (built once, `prepare_model`, into
<--starts-dir>/<regime>-<hash of its settings>/sft_model and reused by later runs with the same
settings, then passed as `model.path=`), on the same synthetic task, the same held-out
eval set (greedy pass@1, `eval.size` problems), the same G, lengths, learning rate and prompts per
optimizer step:

| contender          | what runs                                                                     |
|--------------------|-------------------------------------------------------------------------------|
| dash               | `launch.train` with train.mode=dash (preemptive sampling + gradient filter), synchronous (train.overlap=false) |
| standard_grpo      | train.mode=standard_grpo learner.filter=false (one micro-batch per engine call), train.stream_learn=true (its faster mode here) |
| dash_no_filter     | dash with learner.filter=false                                                |
| dash_no_preemptive | dash with rollout.prompts_per_generation = learner.prompts_per_step           |
| dash_recompute     | dash with learner.old_logprobs=recompute (old-logprob pass even when exact)   |
| dash_no_handover   | dash with train.thread_handover=false (each actor keeps its reserved cores)   |
| dash_unshared      | dash with learner.share_prompts=false (each sample's prompt forwarded in its own row) |
| standard_grpo_no_handover | standard_grpo with train.thread_handover=false                         |
| dash_stream        | dash with train.stream_learn=true (the learner backprops during sampling, each side on its own core) |
| standard_grpo_no_stream | standard_grpo with train.stream_learn=false                              |
| dash_async         | dash with train.overlap=true (PPO's ratio to the engine that sampled, one version stale; no old-logprob pass) |
| dash_async_decoupled | dash_async with learner.off_policy=decoupled (decoupled PPO: ratio to the recomputed batch-start weights, times their weight over the sampler's, masked above is_cap) |
| dash_async_tis     | dash_async with learner.off_policy=tis (the same, the weight truncated at is_cap) |
| dash_half          | dash with half the preemptive batch (rollout.prompts_per_generation / 2), synchronous |
| dash_async_half    | dash_async with half the preemptive batch (rollout.prompts_per_generation / 2): a sample lags 2-3 optimizer steps when learned, not 4-7 |
| dash_async_half_bf16 | dash_async_half with a bfloat16 engine (rollout.dtype=bfloat16: AMX/AVX512-BF16 matmuls where the CPU has them; the learner stays fp32, and the stale batch's PPO ratio is to the bf16 sampler's logprobs) |
| dash_async_step    | dash_async with one optimizer step's prompts per engine call (rollout.prompts_per_generation = learner.prompts_per_step): every sample lags exactly 1 step |
| trl_grpo           | TRL 1.16 GRPOTrainer, its own transformers generation (launch.bench.peers)    |
| sft                | continued supervised fine-tuning (launch.sft), same start (finding 1)         |

Regimes (`--regime`):
- tiny: the embedded default's 2-digit addition (8-token answers `\\boxed{57}`), as the tiny-cpu
  preset runs it;
- reasoning: the synthetic "chain" task (launch/data/synthetic.py): 4-6 step additions and
  subtractions whose completions are worked solutions of 51-89 tokens ending in `\\boxed{}`, with
  difficulty mixed so that many groups are all right or all wrong after the warm start (the JSON's
  `start_groups` measures it), as on MATH with small models.
The warm-up stops once greedy accuracy on training problems reaches model.sft_stop_accuracy.

Seeds. `--seeds N` runs every contender with seeds 0..N-1 (train/rollout/learner seeds for ours,
TRL's seed), round-robin: seed 0 of every contender, then seed 1 of every contender, ..., so slow
phases of a shared machine hit every contender alike. The data, the eval set and the start are
the same for every seed.

Budget. `launch.train` has no wall-clock cap, so our contenders get the same number of training
*prompts* (`--prompts`), hence the same number of optimizer steps: an iteration takes
rollout.prompts_per_generation prompts in dash mode and learner.prompts_per_step prompts otherwise,
so iterations = prompts / that. They evaluate every `--eval-every-prompts` prompts. The two peers
have no such knob in common with us, so they get a time budget: the longest training time of our
contenders in the same seed round (capped by --budget-s). TRL evaluates every `--eval-every-prompts`
prompts as ours do (until 2026-12-07 it evaluated at `n` evenly spaced times of its budget, so with
a long budget its first evaluation fell far past its crossing); SFT, which samples no prompts,
evaluates at the same number of evenly spaced times as ours.

Target and ratios (launch/bench/stats.py): target = start + 0.5 x (lowest median best accuracy of
dash / standard_grpo / trl_grpo - start); seconds_to_target = training seconds (evaluation
excluded) at a run's first evaluation at or above it. Per contender the JSON gives median, min and
max over seeds of seconds to target and final accuracy, and the medians of samples_per_second
(generated samples per training second) and tokens_per_second; `ratio_dash_vs_standard_grpo` and
`ratio_dash_vs_trl` are ratios of median seconds to target (lower is better; null when a median is
missing). The `interpolated_` ones take the seconds where the line between the evaluations on either
side of the target crosses it, so they do not depend on where the evaluations fall (re-score an old
JSON with `python -m launch.bench.rescore runs/bench/tiny6.json`). Phases: per seed, seconds per
`time/*` key of metrics.jsonl summed over iterations; the JSON gives their medians. Orchestration
overhead = time/other / time/total.

Writes the JSON, a plot next to it (same name, .png: accuracy against training seconds and against samples
generated, a line per contender and seed) and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

from launch.bench.output import fmt, fmt_spread, write_json
from launch.bench.peers import PeerCurve
from launch.bench.stats import aggregate

PRESET = "tiny-cpu"
"""Every contender starts from the embedded default's config (then the plan's shared overrides),
synchronous unless its name says async (train.overlap=false is set explicitly all the same)."""
OURS = ("standard_grpo", "dash", "dash_no_filter", "dash_no_preemptive", "dash_recompute", "dash_no_handover",
        "dash_unshared", "standard_grpo_no_handover", "dash_stream", "standard_grpo_no_stream", "dash_async", "dash_async_decoupled",
        "dash_async_tis", "dash_half", "dash_async_half", "dash_async_half_bf16", "dash_async_step")
PEERS = ("trl_grpo", "sft")
CONTENDERS = OURS + PEERS
REGIMES = ("tiny", "reasoning")


class Plan(NamedTuple):
    """The shared budget and settings of one bench run."""

    prompts: int
    """Training prompts per RL contender (same optimizer steps for each)."""
    eval_every_prompts: int
    """Evaluate every this many training prompts."""
    group_size: int
    """G."""
    prompts_per_step: int
    """Prompts (groups) per optimizer step."""
    prompts_per_generation: int
    """DASH preemptive batch (a multiple of prompts_per_step)."""
    max_new_tokens: int
    """Completion length, training and eval."""
    lr: float
    """Learning rate of every RL contender (TRL included)."""
    eval_size: int
    """Held-out problems."""
    task: str
    """Synthetic task (data.synthetic_tasks): "add" (tiny) or "chain" (reasoning)."""
    digits: int
    """Synthetic operand digits."""
    train_size: int
    """Distinct synthetic training problems."""
    max_prompt_tokens: int
    """rollout.max_prompt_tokens (the longest prompt of the task fits)."""
    micro_batch_tokens: int
    """learner.micro_batch_tokens: standard GRPO's "one micro-batch per engine call" must hold at
    least one group of the longest prompt + completion."""
    sft_steps: int
    """model.sft_steps: most warm-up steps of the shared start."""
    sft_stop_accuracy: float
    """model.sft_stop_accuracy: the warm-up stops at this greedy accuracy on training problems."""
    sft_probe_size: int
    """model.sft_probe_size: training problems the warm-up's probe reads."""
    sft_probe_every: int
    """model.sft_probe_every: warm-up steps between probes."""
    sft_batch_size: int
    """model.sft_batch_size of the warm-up."""


TINY = Plan(prompts=2048, eval_every_prompts=128, group_size=8, prompts_per_step=16, prompts_per_generation=64,
            max_new_tokens=16, lr=1e-4, eval_size=400, task="add", digits=2, train_size=6000, max_prompt_tokens=64,
            micro_batch_tokens=2048, sft_steps=1500, sft_stop_accuracy=0.5, sft_batch_size=64, sft_probe_size=256,
            sft_probe_every=5)
TINY_QUICK = TINY._replace(prompts=512)
REASONING = Plan(prompts=1024, eval_every_prompts=128, group_size=8, prompts_per_step=16, prompts_per_generation=64,
                 max_new_tokens=96, lr=1e-4, eval_size=100, task="chain", digits=2, train_size=6000,
                 max_prompt_tokens=48, micro_batch_tokens=2048, sft_steps=2000, sft_stop_accuracy=0.5, sft_batch_size=32,
                 sft_probe_size=64, sft_probe_every=10)
REASONING_QUICK = REASONING._replace(prompts=512)
PLANS = {("tiny", False): TINY, ("tiny", True): TINY_QUICK, ("reasoning", False): REASONING,
         ("reasoning", True): REASONING_QUICK}
"""(regime, quick) -> plan. The reasoning warm-up runs until greedy accuracy on 64 training
problems reaches 0.5, probed every 10 steps (1,000 steps, 404 s on a quiet 2-core machine: 0.49
held out, 16% of groups all-wrong at the start); REASONING_QUICK shares that start and cuts the RL
budget to 512 prompts per contender (4 evaluations), so that the warm-up and 3 seeds of dash,
standard_grpo and trl_grpo fit in 35 minutes here."""


def shared_overrides(plan: Plan) -> list[str]:
    """The overrides every contender (and the shared start) runs with."""
    return [f"rollout.group_size={plan.group_size}", f"rollout.max_new_tokens={plan.max_new_tokens}",
            f"eval.max_new_tokens={plan.max_new_tokens}", f"learner.prompts_per_step={plan.prompts_per_step}",
            f"rollout.prompts_per_generation={plan.prompts_per_generation}", f"learner.lr={plan.lr}",
            f"eval.size={plan.eval_size}", f"data.eval_size={plan.eval_size}", f"data.synthetic_tasks=[{plan.task}]",
            f"data.synthetic_digits={plan.digits}", f"data.synthetic_train_size={plan.train_size}",
            f"rollout.max_prompt_tokens={plan.max_prompt_tokens}",
            f"learner.micro_batch_tokens={plan.micro_batch_tokens}", f"model.sft_steps={plan.sft_steps}",
            f"model.sft_stop_accuracy={plan.sft_stop_accuracy}", f"model.sft_batch_size={plan.sft_batch_size}",
            f"model.sft_probe_size={plan.sft_probe_size}", f"model.sft_probe_every={plan.sft_probe_every}",
            "run.progress=false"]


def contender_overrides(name: str, plan: Plan, seed: int = 0) -> list[str]:
    """What makes each of our contenders what it is, its seeds, iteration count and eval cadence."""
    half = plan.prompts_per_generation // 2
    variant = {
        "dash": [],
        "standard_grpo": ["train.mode=standard_grpo", "learner.filter=false", "train.stream_learn=true"],
        "dash_no_filter": ["learner.filter=false"],
        "dash_no_preemptive": [f"rollout.prompts_per_generation={plan.prompts_per_step}"],
        "dash_recompute": ["learner.old_logprobs=recompute"],
        "dash_no_handover": ["train.thread_handover=false"],
        "dash_unshared": ["learner.share_prompts=false"],
        "standard_grpo_no_handover": ["train.mode=standard_grpo", "learner.filter=false", "train.stream_learn=true",
                                      "train.thread_handover=false"],
        "dash_stream": ["train.stream_learn=true"],
        "standard_grpo_no_stream": ["train.mode=standard_grpo", "learner.filter=false", "train.stream_learn=false"],
        "dash_async": ["train.overlap=true"],
        "dash_async_decoupled": ["train.overlap=true", "learner.off_policy=decoupled"],
        "dash_async_tis": ["train.overlap=true", "learner.off_policy=tis"],
        "dash_half": [f"rollout.prompts_per_generation={half}"],
        "dash_async_half": ["train.overlap=true", f"rollout.prompts_per_generation={half}"],
        "dash_async_half_bf16": ["train.overlap=true", f"rollout.prompts_per_generation={half}", "rollout.dtype=bfloat16"],
        "dash_async_step": ["train.overlap=true", f"rollout.prompts_per_generation={plan.prompts_per_step}"],
    }[name]
    one_step = ("standard_grpo", "standard_grpo_no_handover", "standard_grpo_no_stream", "dash_no_preemptive",
                "dash_async_step")
    per_iteration = {**dict.fromkeys(one_step, plan.prompts_per_step),
                     **dict.fromkeys(("dash_half", "dash_async_half", "dash_async_half_bf16"), half)
                     }.get(name, plan.prompts_per_generation)
    iterations = max(1, plan.prompts // per_iteration)
    every = max(1, plan.eval_every_prompts // per_iteration)
    # every contender but dash_async* is synchronous (the paper's algorithm), whatever the preset says
    return ["train.overlap=false", *variant, f"train.iterations={iterations}", f"eval.every={every}",
            f"train.seed={seed}", f"rollout.seed={seed}", f"learner.seed={seed}"]


def phase_totals(records: Sequence[dict]) -> dict[str, float]:
    """Seconds per `time/*` key summed over a run's metrics.jsonl records (score runs inside
    generate), e.g. {"generate", "score", "learn", "sync", "other", "total", ...}."""
    keys = sorted({k for r in records for k in r if k.startswith("time/")})
    return {k.removeprefix("time/"): sum(r.get(k, 0.0) for r in records) for k in keys}


def overhead(phases: dict[str, float | None]) -> float | None:
    """Orchestration overhead: the fraction of the wall not in generation, scoring, backprop or sync."""
    if phases.get("other") is None or not phases.get("total"):
        return None
    return phases["other"] / phases["total"]


# ----------------------------------------------------------------------------- running


def run_ours(name: str, seed: int, plan: Plan, model_dir: Path, bench_dir: Path, extra: list[str]) -> dict:
    import random

    import torch

    from launch.config import load_config
    from launch.metrics import read_metrics
    from launch.train import prepare_run_dir, train

    run_dir = bench_dir / f"{name}-seed{seed}"
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists: give a fresh --dir (a bench run never resumes or mixes runs)")
    overrides = shared_overrides(plan) + extra + contender_overrides(name, plan, seed) + [
        f"model.path={model_dir}", f"run.dir={run_dir}", f"run.name=bench-{name}-seed{seed}"]
    cfg = load_config(PRESET, overrides)
    prepare_run_dir(cfg)
    random.seed(cfg.train.seed)  # as `python -m launch.train` does: every contender starts from the same RNG
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    summary = train(cfg, run_dir)
    records = read_metrics(run_dir)
    curve = [{k: e[k] for k in ("train_seconds", "samples_generated", "accuracy")} for e in summary["evals"]]
    generated = sum(r["samples_generated"] for r in records)
    return {"seed": seed, "curve": curve, "phases": phase_totals(records), "overrides": overrides,
            "iterations": summary["iterations"], "train_seconds": summary["train_seconds"],
            "wall_seconds": time.perf_counter() - t0, "samples_generated": summary["samples_generated"],
            "tokens_generated": sum(r["tokens_generated"] for r in records), "samples_kept": summary["samples_kept"],
            "kept_fraction": sum(r["samples_kept"] for r in records) / max(1, generated)}


def run_peer(name: str, seed: int, plan: Plan, model_dir: Path, cfg, budget_s: float, n_evals: int) -> dict:
    from launch.bench.peers import sft_curve, trl_grpo_curve
    from launch.data.sources import load_prompts

    train_prompts = load_prompts(cfg.data, "train").prompts
    eval_prompts = load_prompts(cfg.data, "eval").prompts[:cfg.eval.size]
    t0 = time.perf_counter()
    if name == "trl_grpo":
        result: PeerCurve = trl_grpo_curve(model_dir, train_prompts, eval_prompts, plan.group_size, plan.max_new_tokens,
                                           plan.lr, plan.prompts_per_step, budget_s, plan.eval_every_prompts, seed,
                                           eval_max_new_tokens=cfg.eval.max_new_tokens,
                                           temperature=cfg.rollout.temperature)
    else:
        result = sft_curve(model_dir, train_prompts, eval_prompts, budget_s, budget_s / max(1, n_evals), cfg.model.sft_lr,
                           cfg.model.sft_batch_size, seed, max_new_tokens=cfg.eval.max_new_tokens)
    return {"seed": seed, "curve": result.points, "phases": result.phases, "time_budget_s": budget_s,
            "train_seconds": result.points[-1]["train_seconds"], "wall_seconds": time.perf_counter() - t0,
            "samples_generated": result.points[-1]["samples_generated"], "tokens_generated": result.tokens_generated}


def start_groups(model_dir: Path, cfg, plan: Plan, n_prompts: int = 64) -> dict:
    """The warm start's group mix on `n_prompts` training problems (G samples each, the RL
    contenders' temperature): the share of all-right and all-wrong groups."""
    from launch.bench.peers import group_mix
    from launch.data.sources import load_prompts

    t0 = time.perf_counter()
    prompts = load_prompts(cfg.data, "train").prompts[:n_prompts]
    mix = group_mix(model_dir, prompts, plan.group_size, plan.max_new_tokens, cfg.rollout.temperature, cfg.train.seed)
    return {**mix._asdict(), "uniform": mix.all_right + mix.all_wrong, "prompts": len(prompts),
            "seconds": time.perf_counter() - t0}


START_LOCK_TIMEOUT_S = 7200.0
"""How long a bench waits for another one that is building the same warm start."""


@contextlib.contextmanager
def _exclusive(path: Path, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive flock on `path`; TimeoutError naming it after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with open(path, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: another bench held the warm start for over {timeout_s:.0f} s") from None
                time.sleep(1.0)  # polling a lock held by another process: there is nothing to wait on
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def start_key(regime: str, overrides: Sequence[str]) -> str:
    """Name of the shared start's directory: the regime and a hash of every override it is built with."""
    return f"{regime}-{hashlib.sha256(chr(10).join(overrides).encode()).hexdigest()[:12]}"


def run_bench(plan: Plan, regime: str, seeds: int, bench_dir: Path, starts_dir: Path, contenders: Sequence[str],
              extra: list[str], budget_cap_s: float | None, quick: bool,
              on_progress: Callable[[dict], None] = lambda partial: None) -> dict:
    """Build (or reuse) the shared start, then every contender's seeds round-robin. After each run
    `on_progress` gets the summary of the runs so far (a bench cut short still leaves its numbers)."""
    from launch.config import load_config
    from launch.data.sources import load_prompts

    # The warm start depends only on these overrides (not on the budget or the seeds), so a bench
    # run reuses the one an earlier run built with the same ones (prepare_model resumes from it).
    start_overrides = shared_overrides(plan) + extra
    start_dir = starts_dir / start_key(regime, start_overrides)
    start_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(PRESET, start_overrides + [f"run.dir={start_dir}"])
    if cfg.model.path:
        model_dir, sft_info = Path(cfg.model.path), {}
    else:
        from launch.train import prepare_model

        t0 = time.perf_counter()
        with _exclusive(start_dir / ".lock", START_LOCK_TIMEOUT_S):  # another bench may be building this start
            model_dir, sft_info = prepare_model(cfg, start_dir, load_prompts(cfg.data, "train").prompts)
        sft_info = {**sft_info, "wall_seconds": time.perf_counter() - t0, "dir": str(start_dir)}
    print(f"shared start: {model_dir} {sft_info}", flush=True)
    groups = start_groups(model_dir, cfg, plan)
    print(f"start groups: {groups}", flush=True)

    runs: dict[str, list[dict]] = {n: [] for n in CONTENDERS if n in contenders}

    def so_far() -> dict:
        done = {n: rs for n, rs in runs.items() if rs}
        if not done:
            return {"regime": regime, "seeds": seeds, "quick": quick, "plan": plan._asdict(), "start_model": str(model_dir),
                    "start_sft": sft_info, "start_groups": groups, "contenders": {}}
        return summarize(done, plan, regime, seeds, quick, str(model_dir), sft_info, groups)

    def progress() -> None:
        on_progress(so_far())

    progress()
    n_evals = max(1, plan.prompts // plan.eval_every_prompts)
    for seed in range(seeds):
        ours = [n for n in OURS if n in contenders]
        if ours:
            import ray

            started_ray = not ray.is_initialized()
            for name in ours:
                print(f"\n=== {name} seed {seed}", flush=True)
                runs[name].append(run_ours(name, seed, plan, model_dir, bench_dir, extra))
                progress()
            if started_ray and ray.is_initialized():
                ray.shutdown()  # the peers run in this process; free the cluster's memory first
        budget = max((runs[n][-1]["train_seconds"] for n in ours), default=budget_cap_s or 60.0)
        if budget_cap_s:
            budget = min(budget, budget_cap_s)
        for name in PEERS:
            if name in contenders:
                print(f"\n=== {name} seed {seed} ({budget:.0f} s budget)", flush=True)
                runs[name].append(run_peer(name, seed, plan, model_dir, cfg, budget, n_evals))
                progress()
    return so_far()


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: dict[str, list[dict]], plan: Plan, regime: str, seeds: int, quick: bool, model_dir: str,
              sft_info: dict, groups: dict) -> dict:
    """The bench JSON: target, per-contender spreads over seeds, rates, median phases, ratios, runs."""
    agg = aggregate({n: [r["curve"] for r in rs] for n, rs in runs.items()})
    out = {"regime": regime, "seeds": seeds, "quick": quick, "plan": plan._asdict(), "start_model": model_dir,
           "start_sft": sft_info, "start_groups": groups, "start_accuracy": agg.start_accuracy,
           "target_rule": "start + 0.5 x (lowest median best accuracy of dash / standard_grpo / trl_grpo - start)",
           "target_accuracy": agg.target_accuracy,
           "ratio_dash_vs_standard_grpo": agg.ratio_dash_vs_standard_grpo, "ratio_dash_vs_trl": agg.ratio_dash_vs_trl,
           "interpolated_ratio_dash_vs_standard_grpo": agg.interpolated_ratio_dash_vs_standard_grpo,
           "interpolated_ratio_dash_vs_trl": agg.interpolated_ratio_dash_vs_trl,
           "phase_note": "seconds summed over a run, median over seeds; score runs inside generate for our "
                         "contenders (streamed scoring, summed worker-seconds); TRL's learn includes its own "
                         "bookkeeping (other=null: not separable)",
           "contenders": {}}
    for name, rs in runs.items():
        for r, to_target in zip(rs, agg.per_seed_seconds_to_target[name]):
            r["seconds_to_target"] = to_target
            r["orchestration_overhead"] = overhead(r["phases"])
        phase_keys = sorted({k for r in rs for k in r["phases"]})
        out["contenders"][name] = {
            "seconds_to_target": agg.seconds_to_target[name]._asdict(),
            "interpolated_seconds_to_target": agg.interpolated_seconds_to_target[name]._asdict(),
            "final_accuracy": agg.final_accuracy[name]._asdict(),
            "best_accuracy": agg.best_accuracy[name]._asdict(),
            "samples_per_second": _median([r["samples_generated"] / r["train_seconds"] if r["train_seconds"] else None
                                           for r in rs]),
            "tokens_per_second": _median([r["tokens_generated"] / r["train_seconds"] if r["train_seconds"] else None
                                          for r in rs]),
            "train_seconds": _median([r["train_seconds"] for r in rs]),
            "phases": {k: _median([r["phases"].get(k) for r in rs]) for k in phase_keys},
            "kept_fraction": _median([r.get("kept_fraction") for r in rs]),
            "runs": rs,
        }
    return out


# ----------------------------------------------------------------------------- output


def write_plot(result: dict, path: Path) -> Path:
    """The plot: accuracy against training seconds (left) and samples generated (right), a line
    per contender and seed (one colour per contender)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_samples) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, (name, c) in enumerate(result["contenders"].items()):
        for j, run in enumerate(c["runs"]):
            ys = [p["accuracy"] for p in run["curve"]]
            style = dict(color=f"C{k}", marker="o", markersize=3, linewidth=1, label=name if j == 0 else None)
            by_time.plot([p["train_seconds"] for p in run["curve"]], ys, **style)
            if name != "sft":  # SFT generates nothing
                by_samples.plot([p["samples_generated"] for p in run["curve"]], ys, **style)
    for ax, label in ((by_time, "training seconds (eval excluded)"), (by_samples, "samples generated")):
        if result["target_accuracy"] is not None:
            ax.axhline(result["target_accuracy"], color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out greedy accuracy")
        ax.legend(fontsize=8)
    fig.suptitle(f"DASH bench, {result['regime']} regime, {result['seeds']} seeds" + (" (--quick)" if result["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def table(result: dict) -> str:
    """Markdown: per contender medians (min-max) over seeds, rates, and median phase seconds."""
    head = ("| contender | s to target | final acc | samples/s | tokens/s | train s | generate | score | learn | sync "
            "| other | kept |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for name, c in result["contenders"].items():
        p = c["phases"]
        rows.append(f"| {name} | {fmt_spread(c['seconds_to_target'])} | {fmt_spread(c['final_accuracy'], '.3f')} "
                    f"| {fmt(c['samples_per_second'], '.0f')} | {fmt(c['tokens_per_second'], '.0f')} "
                    f"| {fmt(c['train_seconds'])} | {fmt(p.get('generate'))} | {fmt(p.get('score'))} | {fmt(p.get('learn'))} "
                    f"| {fmt(p.get('sync'))} | {fmt(p.get('other'))} | {fmt(c.get('kept_fraction'), '.2f')} |")
    g = result["start_groups"]
    tail = (f"\nregime {result['regime']}, {result['seeds']} seeds; start accuracy {fmt(result['start_accuracy'], '.3f')}; "
            f"start groups all-right {g['all_right']:.2f} / all-wrong {g['all_wrong']:.2f}; "
            f"target {fmt(result['target_accuracy'], '.3f')} ({result['target_rule']}); "
            f"dash/standard_grpo {fmt(result['ratio_dash_vs_standard_grpo'], '.2f')}; "
            f"dash/trl {fmt(result['ratio_dash_vs_trl'], '.2f')} (ratios of medians); interpolated between "
            f"evaluations: dash/standard_grpo {fmt(result['interpolated_ratio_dash_vs_standard_grpo'], '.2f')}; "
            f"dash/trl {fmt(result['interpolated_ratio_dash_vs_trl'], '.2f')}\n")
    return head + "\n".join(rows) + "\n" + tail


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.bench dash", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="where to write the result (the plot goes next to it, same name, .png)")
    p.add_argument("--regime", choices=REGIMES, default="tiny",
                   help="tiny: 2-digit addition, 8-token answers; reasoning: worked multi-step solutions of 51-89 tokens")
    p.add_argument("--quick", action="store_true",
                   help=f"smaller budget: {TINY_QUICK.prompts} (tiny) / {REASONING_QUICK.prompts} (reasoning) prompts per contender")
    p.add_argument("--seeds", type=int, default=1, help="seeds per contender, run round-robin (medians are reported)")
    p.add_argument("--dir", default="", help="run directories (default: <json dir>/dash-<regime>-<time>)")
    p.add_argument("--starts-dir", default="runs/bench/starts",
                   help="where shared warm starts are kept, one per regime and settings (reused by later runs)")
    p.add_argument("--start-only", action="store_true",
                   help="build (or reuse) the shared warm start, measure its group mix, and stop")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated contenders (default: all)")
    p.add_argument("--prompts", type=int, default=0, help="training prompts per RL contender (overrides the plan)")
    p.add_argument("--eval-every-prompts", type=int, default=0, help="evaluation cadence in prompts (overrides the plan)")
    p.add_argument("--budget-s", type=float, default=0.0, help="cap on the peers' time budget (0 = none)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config override for every contender and the shared start (repeatable)")
    args = p.parse_args(list(argv))
    names = args.contenders.split(",")
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"--contenders: unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = PLANS[(args.regime, args.quick)]
    if args.prompts:
        plan = plan._replace(prompts=args.prompts)
    if args.eval_every_prompts:
        plan = plan._replace(eval_every_prompts=args.eval_every_prompts)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    bench_dir = Path(args.dir or out.parent / f"dash-{args.regime}-{time.strftime('%Y%m%d-%H%M%S')}")
    # The DeepSpeed shm op compiles once per machine when this cache is shared between runs.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dash_rl_torch_extensions"))
    t0 = time.perf_counter()
    partial_path = out.with_suffix(".partial.json")

    def write_partial(partial: dict) -> None:
        write_json(partial_path, {**partial, "partial": True, "wall_seconds": time.perf_counter() - t0})

    result = run_bench(plan, args.regime, args.seeds, bench_dir, Path(args.starts_dir),
                       [] if args.start_only else args.contenders.split(","), list(args.set), args.budget_s or None,
                       args.quick, write_partial)
    result["wall_seconds"] = time.perf_counter() - t0
    result["runs_dir"] = str(bench_dir)
    if result["contenders"]:
        result["plot"] = str(write_plot(result, out.with_suffix(".png")))
        print("\n" + table(result), flush=True)
    write_json(out, result)
    print(f"wrote {out} ({result['wall_seconds']:.0f} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
