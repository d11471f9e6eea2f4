"""DASH against standard GRPO, TRL's GRPOTrainer, SFT and two ablations, on one machine in one run.

    python -m launch.bench dash --quick --json runs/bench/dash.json        # ~15 min on 2 CPU cores
    python -m launch.bench.dash --json runs/bench/dash.json                # the full budget
    python -m launch.bench.dash --json /tmp/d.json --prompts 32 --only standard_grpo,dash \\
        --set model.sft_steps=20                                           # a smoke run

Every contender starts from the same SFT-warmed tiny model (built once, `prepare_model`, into
<dir>/start/sft_model, then passed as `model.path=`), on the same synthetic task, the same held-out
eval set (greedy pass@1, `eval.size` problems), the same G, lengths, learning rate and prompts per
optimizer step:

| contender          | what runs                                                                     |
|--------------------|-------------------------------------------------------------------------------|
| dash               | `launch.train` with train.mode=dash (preemptive sampling + gradient filter)   |
| standard_grpo      | train.mode=standard_grpo learner.filter=false (one micro-batch per engine call)|
| dash_no_filter     | dash with learner.filter=false                                                |
| dash_no_preemptive | dash with rollout.prompts_per_generation = learner.prompts_per_step           |
| trl_grpo           | TRL 1.16 GRPOTrainer, its own transformers generation (launch.bench.peers)    |
| sft                | continued supervised fine-tuning (launch.sft), same start (finding 1)         |

Task: the embedded default's 2-digit addition (the tiny-cpu preset, whose settings every contender
starts from); the shared start is its SFT warm-up, which stops once greedy accuracy on training
problems reaches model.sft_stop_accuracy (tiny models learn carries abruptly, so a fixed step
count gives an unreliable start).

Budget. `launch.train` has no wall-clock cap, so our four contenders get the same number of
training *prompts* (`--prompts`), hence the same number of optimizer steps: an iteration takes
rollout.prompts_per_generation prompts in dash mode and learner.prompts_per_step prompts otherwise,
so iterations = prompts / that. They evaluate every `--eval-every-prompts` prompts. The two peers
have no such knob in common with us, so they get a time budget: the longest training time of our
contenders (capped by --budget-s), evaluating at the same number of points.

Target = the best accuracy standard_grpo reaches in its budget; seconds_to_target = training
seconds (evaluation excluded) at a contender's first evaluation at or above it. Ratios are
dash's seconds to target over standard_grpo's and over TRL's (lower is better; null when either is
missing or the denominator is 0, e.g. when standard_grpo never beats the start).
Orchestration overhead = time/other / time/total over all iterations (wall minus generation with
scoring and streamed learning, the learner's tail, and sync), from each run's metrics.jsonl.

Writes the JSON, bench.png next to it (accuracy against training seconds and against samples
generated, a line per contender) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

from launch.bench.peers import PHASES, PeerCurve, compare_curves, ratio

PRESET = "tiny-cpu"
"""Every contender starts from the embedded default's config (then the plan's shared overrides)."""
OURS = ("standard_grpo", "dash", "dash_no_filter", "dash_no_preemptive")
PEERS = ("trl_grpo", "sft")
CONTENDERS = OURS + PEERS


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
    digits: int
    """Synthetic addition operand digits (the task)."""
    train_size: int
    """Distinct synthetic training problems."""


FULL = Plan(prompts=2048, eval_every_prompts=128, group_size=8, prompts_per_step=16, prompts_per_generation=64,
            max_new_tokens=16, lr=1e-4, eval_size=400, digits=2, train_size=6000)
QUICK = FULL._replace(prompts=512)


def shared_overrides(plan: Plan) -> list[str]:
    """The overrides every contender (and the shared start) runs with."""
    return [f"rollout.group_size={plan.group_size}", f"rollout.max_new_tokens={plan.max_new_tokens}",
            f"eval.max_new_tokens={plan.max_new_tokens}", f"learner.prompts_per_step={plan.prompts_per_step}",
            f"rollout.prompts_per_generation={plan.prompts_per_generation}", f"learner.lr={plan.lr}",
            f"eval.size={plan.eval_size}", f"data.eval_size={plan.eval_size}", "data.synthetic_tasks=add",
            f"data.synthetic_digits={plan.digits}", f"data.synthetic_train_size={plan.train_size}", "run.progress=false"]


def contender_overrides(name: str, plan: Plan) -> list[str]:
    """What makes each of our contenders what it is, plus its iteration count and eval cadence."""
    variant = {
        "dash": [],
        "standard_grpo": ["train.mode=standard_grpo", "learner.filter=false"],
        "dash_no_filter": ["learner.filter=false"],
        "dash_no_preemptive": [f"rollout.prompts_per_generation={plan.prompts_per_step}"],
    }[name]
    per_iteration = {"dash": plan.prompts_per_generation, "dash_no_filter": plan.prompts_per_generation}.get(
        name, plan.prompts_per_step)
    iterations = max(1, plan.prompts // per_iteration)
    every = max(1, plan.eval_every_prompts // per_iteration)
    return variant + [f"train.iterations={iterations}", f"eval.every={every}"]


def phase_totals(records: Sequence[dict]) -> dict[str, float]:
    """Seconds per phase summed over a run's metrics.jsonl records (score runs inside generate)."""
    return {k: sum(r.get(f"time/{k}", 0.0) for r in records) for k in (*PHASES, "total")}


def overhead(phases: dict[str, float | None]) -> float | None:
    """Orchestration overhead: the fraction of the wall not in generation, scoring, backprop or sync."""
    if phases.get("other") is None or not phases.get("total"):
        return None
    return phases["other"] / phases["total"]


# ----------------------------------------------------------------------------- running


def run_ours(name: str, plan: Plan, model_dir: Path, bench_dir: Path, extra: list[str]) -> dict:
    import random

    import torch

    from launch.config import load_config
    from launch.metrics import read_metrics
    from launch.train import prepare_run_dir, train

    run_dir = bench_dir / name
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists: give a fresh --dir (a bench run never resumes or mixes runs)")
    overrides = shared_overrides(plan) + extra + contender_overrides(name, plan) + [
        f"model.path={model_dir}", f"run.dir={run_dir}", f"run.name=bench-{name}"]
    cfg = load_config(PRESET, overrides)
    prepare_run_dir(cfg)
    random.seed(cfg.train.seed)  # as `python -m launch.train` does: every contender starts from the same RNG
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    summary = train(cfg, run_dir)
    phases = phase_totals(read_metrics(run_dir))
    curve = [{k: e[k] for k in ("train_seconds", "samples_generated", "accuracy")} for e in summary["evals"]]
    return {"curve": curve, "phases": phases, "overrides": overrides, "iterations": summary["iterations"],
            "train_seconds": summary["train_seconds"], "wall_seconds": time.perf_counter() - t0,
            "samples_generated": summary["samples_generated"], "samples_kept": summary["samples_kept"]}


def run_peer(name: str, plan: Plan, model_dir: Path, cfg, budget_s: float, n_evals: int) -> dict:
    from launch.bench.peers import sft_curve, trl_grpo_curve
    from rollout_workers.prompts import load_prompts

    train_prompts = load_prompts(cfg.data, "train").prompts
    eval_prompts = load_prompts(cfg.data, "eval").prompts[:cfg.eval.size]
    every = budget_s / max(1, n_evals)
    t0 = time.perf_counter()
    if name == "trl_grpo":
        result: PeerCurve = trl_grpo_curve(model_dir, train_prompts, eval_prompts, plan.group_size, plan.max_new_tokens,
                                           plan.lr, plan.prompts_per_step, budget_s, every, cfg.train.seed,
                                           eval_max_new_tokens=cfg.eval.max_new_tokens,
                                           temperature=cfg.rollout.temperature)
    else:
        result = sft_curve(model_dir, train_prompts, eval_prompts, budget_s, every, cfg.model.sft_lr,
                           cfg.model.sft_batch_size, cfg.train.seed, max_new_tokens=cfg.eval.max_new_tokens)
    return {"curve": result.points, "phases": result.phases, "time_budget_s": budget_s,
            "train_seconds": result.points[-1]["train_seconds"], "wall_seconds": time.perf_counter() - t0,
            "samples_generated": result.points[-1]["samples_generated"]}


def run_bench(plan: Plan, bench_dir: Path, only: Sequence[str], extra: list[str], budget_cap_s: float | None,
              quick: bool) -> dict:
    from launch.config import load_config
    from rollout_workers.prompts import load_prompts

    start_dir = bench_dir / "start"
    start_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(PRESET, shared_overrides(plan) + extra + [f"run.dir={start_dir}"])
    if cfg.model.path:
        model_dir, sft_info = Path(cfg.model.path), {}
    else:
        from launch.train import prepare_model

        t0 = time.perf_counter()
        model_dir, sft_info = prepare_model(cfg, start_dir, load_prompts(cfg.data, "train").prompts)
        sft_info = {**sft_info, "wall_seconds": time.perf_counter() - t0}
    print(f"shared start: {model_dir} {sft_info}", flush=True)

    results: dict[str, dict] = {}
    if any(name in only for name in OURS):
        import ray

        started_ray = not ray.is_initialized()
        for name in OURS:
            if name in only:
                print(f"\n=== {name}", flush=True)
                results[name] = run_ours(name, plan, model_dir, bench_dir, extra)
        if started_ray and ray.is_initialized():
            ray.shutdown()  # the peers run in this process; free the cluster's memory first
    n_evals = max(1, plan.prompts // plan.eval_every_prompts)
    budget = max((r["train_seconds"] for r in results.values()), default=budget_cap_s or 60.0)
    if budget_cap_s:
        budget = min(budget, budget_cap_s)
    for name in PEERS:
        if name in only:
            print(f"\n=== {name} ({budget:.0f} s budget)", flush=True)
            results[name] = run_peer(name, plan, model_dir, cfg, budget, n_evals)
    return summarize(results, plan, quick, str(model_dir), sft_info)


def summarize(results: dict[str, dict], plan: Plan, quick: bool, model_dir: str, sft_info: dict) -> dict:
    """The bench JSON: target, per-contender seconds/samples to target, ratios, phases, curves."""
    curves = {n: r["curve"] for n, r in results.items()}
    out = {"quick": quick, "plan": plan._asdict(), "start_model": model_dir, "start_sft": sft_info,
           "target_accuracy": None, "ratio_dash_vs_standard_grpo": None, "ratio_dash_vs_trl": None,
           "phase_note": "score runs inside generate for our contenders (streamed scoring); TRL's learn "
                         "includes its own bookkeeping (other=null: not separable)",
           "contenders": {}}
    cmp = compare_curves(curves) if "standard_grpo" in curves else None
    for name, r in results.items():
        out["contenders"][name] = {
            "seconds_to_target": cmp.seconds_to_target[name] if cmp else None,
            "samples_to_target": cmp.samples_to_target[name] if cmp else None,
            "final_accuracy": r["curve"][-1]["accuracy"],
            "orchestration_overhead": overhead(r["phases"]),
            **r,
        }
    if cmp:
        out["target_accuracy"] = cmp.target_accuracy
        dash = cmp.seconds_to_target.get("dash")
        out["ratio_dash_vs_standard_grpo"] = ratio(dash, cmp.seconds_to_target.get("standard_grpo"))
        out["ratio_dash_vs_trl"] = ratio(dash, cmp.seconds_to_target.get("trl_grpo"))
    return out


# ----------------------------------------------------------------------------- output


def write_plot(result: dict, path: Path) -> Path:
    """bench.png: accuracy against training seconds (left) and samples generated (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_samples) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, c in result["contenders"].items():
        xs = [p["train_seconds"] for p in c["curve"]]
        ys = [p["accuracy"] for p in c["curve"]]
        by_time.plot(xs, ys, marker="o", label=name)
        if name != "sft":  # SFT generates nothing
            by_samples.plot([p["samples_generated"] for p in c["curve"]], ys, marker="o", label=name)
    for ax, label in ((by_time, "training seconds (eval excluded)"), (by_samples, "samples generated")):
        if result["target_accuracy"] is not None:
            ax.axhline(result["target_accuracy"], color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out greedy accuracy")
        ax.legend(fontsize=8)
    fig.suptitle("DASH bench" + (" (--quick)" if result["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(result: dict) -> str:
    head = ("| contender | final acc | s to target | samples to target | train s | generate | score | learn | sync "
            "| other | overhead |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for name, c in result["contenders"].items():
        p = c["phases"]
        rows.append(f"| {name} | {c['final_accuracy']:.3f} | {fmt(c['seconds_to_target'])} | {fmt(c['samples_to_target'], 'd')} "
                    f"| {c['train_seconds']:.1f} | {fmt(p['generate'])} | {fmt(p['score'])} | {fmt(p['learn'])} "
                    f"| {fmt(p['sync'])} | {fmt(p['other'])} | {fmt(c['orchestration_overhead'], '.1%')} |")
    tail = (f"\ntarget accuracy (best of standard_grpo) {fmt(result['target_accuracy'], '.3f')}; "
            f"dash/standard_grpo seconds to target {fmt(result['ratio_dash_vs_standard_grpo'], '.2f')}; "
            f"dash/trl {fmt(result['ratio_dash_vs_trl'], '.2f')}\n")
    return head + "\n".join(rows) + "\n" + tail


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.bench dash", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="where to write the result (bench.png goes next to it)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK.prompts} prompts per contender (~15 min on 2 cores)")
    p.add_argument("--dir", default="", help="run directories (default: <json dir>/dash-<time>)")
    p.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders (standard_grpo defines the target)")
    p.add_argument("--prompts", type=int, default=0, help="training prompts per RL contender (overrides the plan)")
    p.add_argument("--eval-every-prompts", type=int, default=0, help="evaluation cadence in prompts (overrides the plan)")
    p.add_argument("--budget-s", type=float, default=0.0, help="cap on the peers' time budget (0 = none)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config override for every contender and the shared start (repeatable)")
    args = p.parse_args(list(argv))
    unknown = [n for n in args.only.split(",") if n not in CONTENDERS]
    if unknown:
        p.error(f"--only: unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = QUICK if args.quick else FULL
    if args.prompts:
        plan = plan._replace(prompts=args.prompts)
    if args.eval_every_prompts:
        plan = plan._replace(eval_every_prompts=args.eval_every_prompts)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    bench_dir = Path(args.dir or out.parent / f"dash-{time.strftime('%Y%m%d-%H%M%S')}")
    # The DeepSpeed shm op compiles once per machine when this cache is shared (the shared cache keeps one compiled copy).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dash_rl_torch_extensions"))
    t0 = time.perf_counter()
    result = run_bench(plan, bench_dir, args.only.split(","), list(args.set), args.budget_s or None, args.quick)
    result["wall_seconds"] = time.perf_counter() - t0
    result["runs_dir"] = str(bench_dir)
    result["plot"] = str(write_plot(result, out.parent / "bench.png"))
    out.write_text(json.dumps(result, indent=2))
    print("\n" + table(result), flush=True)
    print(f"wrote {out} and {result['plot']} ({result['wall_seconds']:.0f} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
