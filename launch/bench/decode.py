"""Benchmark: completion tokens/s of the transformers engine's decode on a model directory, for
chunk budgets (`rollout.gen_batch_tokens`) and with ended rows leaving the batch
(`HFEngine(compact_at=1/8)`, the default) or kept to the end (`compact_at` > 1, what
`model.generate` does), and with the KV cache reserved for the whole decode (`--cache reserved`,
the default) or grown by `torch.cat` at every token (`dynamic`, what `model.generate` does). The
prompts are the bench regime's synthetic task in its plain template.

    python -m launch.bench decode --model runs/bench/starts/<reasoning start>/sft_model --task chain \\
        --max-new-tokens 96 --threads 2 --json runs/bench/decode.json
    python -m launch.bench decode --model DIR --budgets 16384 131072 --compact-at 0.125 2 --repeats 3
    python -m launch.bench decode --model DIR --budgets 131072 --compact-at 0.125 --cache reserved dynamic --repeats 3
    python -m launch.bench decode --model DIR --budgets 131072 --compact-at 0.125 --dtype float32 bfloat16 --repeats 3

Every mode samples the same prompts with the same seed; the modes alternate, `--repeats` times
each, and the table shows each mode's fastest repeat (the JSON keeps every timing).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from launch.bench.output import write_json
from launch.data.synthetic import synthetic_problems
from rollout_workers.engines.base import SamplingParamsSpec
from rollout_workers.engines.hf import HFEngine


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory (a bench start's sft_model)")
    ap.add_argument("--task", default="chain", help="synthetic task of the prompts (data.synthetic_tasks)")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per engine call (the preemptive batch)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--budgets", type=int, nargs="+", default=[16384, 131072], help="gen_batch_tokens values")
    ap.add_argument("--compact-at", type=float, nargs="+", default=[0.125, 2.0],
                    help="HFEngine compact_at values (> 1: ended rows stay to the end)")
    ap.add_argument("--cache", nargs="+", choices=("reserved", "dynamic"), default=["reserved"],
                    help="KV cache: reserved for the whole decode (the engine's) or grown by torch.cat per token")
    ap.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16"), default=["float32"],
                    help="engine weight dtype (rollout.dtype); bfloat16 uses AMX/AVX512-BF16 matmuls where the CPU has them")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = synthetic_problems([args.task], 2, args.prompts, 0, "train")
    params = SamplingParamsSpec(n=args.group_size, max_new_tokens=args.max_new_tokens, seed=0)
    # Built directly, not through the engine registry: compact_at and the cache are the engine's
    # internal switches under test here, not settings of the rollout section.
    engines = {f"budget={b} compact_at={c} cache={k} dtype={d}": HFEngine(args.model, dtype=d, gen_batch_tokens=b,
                                                                            compact_at=c, reserve_cache=k == "reserved")
               for b in args.budgets for c in args.compact_at for k in args.cache for d in args.dtype}
    runs: dict[str, list[dict]] = {mode: [] for mode in engines}
    for engine in engines.values():  # warm-up: first calls pay allocation and kernel selection
        list(engine.generate(prompts[:2], params))
    for _ in range(args.repeats):
        for mode, engine in engines.items():
            start = time.perf_counter()
            completions = [c for g in engine.generate(prompts, params) for c in g.completions]
            seconds = time.perf_counter() - start
            tokens = sum(len(c.token_ids) for c in completions)
            runs[mode].append({"samples": len(completions), "completion_tokens": tokens, "seconds": seconds,
                               "tokens_per_second": tokens / seconds, "ms_per_sample": 1000 * seconds / len(completions)})
    result = {"model": args.model, "task": args.task, "prompts": args.prompts, "group_size": args.group_size,
              "max_new_tokens": args.max_new_tokens, "threads": args.threads, "runs": runs}
    print(f"\n| mode | seconds | ms/sample | tokens/s |\n|---|---|---|---|")
    for mode, rs in runs.items():
        best = min(rs, key=lambda r: r["seconds"])
        print(f"| {mode} | {best['seconds']:.2f} | {best['ms_per_sample']:.1f} | {best['tokens_per_second']:.0f} |")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
