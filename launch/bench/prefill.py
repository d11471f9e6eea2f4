"""Benchmark: completion tokens/s of the transformers engine on a real model, with the prompt KV
cache shared by a group's G samples (`HFEngine(shared_prefill=True)`, the default) against each
prompt prefilled G times (`shared_prefill=False`, what `model.generate(num_return_sequences=G)` does). Prompts are the smollm2-135m preset's:
2-digit additions in SmolLM2's chat template, at the preset's batch and completion length.

    python -m launch.bench prefill --model runs/models/smollm2-135m --json runs/bench_prefill.json
    python -m launch.bench prefill --model DIR --prompts 16 --group-size 8 --max-new-tokens 32 --repeats 2

Both modes sample with the same seed, so they generate nearly the same tokens (the cached and
uncached prompt logits differ only by float rounding). The modes alternate, `--repeats` times each;
the JSON keeps every timing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from launch.bench.output import write_json
from launch.data.model_prompts import prompts_for_model
from launch.data.synthetic import synthetic_problems
from rollout_workers.engines.base import SamplingParamsSpec
from rollout_workers.engines.hf import HFEngine


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory (e.g. the converted SmolLM2)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per engine call (the preset's batch)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--answer-format", default="last_number")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = prompts_for_model(synthetic_problems(["add"], 2, args.prompts, 0, "train"), args.model, "auto",
                                args.answer_format)
    params = SamplingParamsSpec(n=args.group_size, max_new_tokens=args.max_new_tokens, seed=0)
    # Built directly, not through the engine registry: `shared_prefill` is the engine's internal
    # switch under test here, not a setting of the rollout section.
    engines = {mode: HFEngine(args.model, shared_prefill=mode == "shared_prefill")
               for mode in ("shared_prefill", "prefill_per_sample")}
    runs: dict[str, list[dict]] = {mode: [] for mode in engines}
    for _ in range(args.repeats):
        for mode, engine in engines.items():
            start = time.perf_counter()
            tokens = sum(len(c.token_ids) for g in engine.generate(prompts, params) for c in g.completions)
            seconds = time.perf_counter() - start
            runs[mode].append({"completion_tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds})
    prompt_tokens = [len(p.token_ids) for p in prompts]  # tokenized once, by prompts_for_model
    result = {"model": args.model, "prompts": args.prompts, "group_size": args.group_size,
              "max_new_tokens": args.max_new_tokens, "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
              "threads": args.threads, "runs": runs,
              **{f"{mode}_tokens_per_second": max(r["tokens_per_second"] for r in rs) for mode, rs in runs.items()}}
    result["speedup"] = result["shared_prefill_tokens_per_second"] / result["prefill_per_sample_tokens_per_second"]
    print(json.dumps(result))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
