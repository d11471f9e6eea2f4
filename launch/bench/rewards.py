"""Benchmark: scoring time per sample on the tiny task's completions, math-verify against the exact
plain-number fast path of `rollout_workers.rewards.score_math` (issue: rewards cost ~18% of the
DASH bench's wall time on plain integers).

    python -m launch.bench rewards --samples 2000 --json runs/bench_rewards.json

Both columns score the same completions in this process (no pool): "math_verify" is what
`score_math` did before the fast path (parse both sides with math-verify's LaTeX parser, then
`verify`), "fast_path" is `score_math` today. Through a `RewardPool` the per-sample cost adds
one inter-process round trip to each.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

from launch.bench.output import write_json
from rollout_workers.rewards import parse_latex, extract_final_answer, score_math


def tiny_task_samples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(completion, gold) pairs as the tiny preset writes them: " \\boxed{579}", half of them right."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        pairs.append((f" \\boxed{{{a + b + rng.randrange(2)}}}", str(a + b)))
    return pairs


def score_with_math_verify(completion: str, gold: str) -> float:
    """The pre-fast-path scorer: math-verify on both sides, whatever they are."""
    from math_verify import verify

    answer = extract_final_answer(completion)
    gold_parsed, answer_parsed = parse_latex(gold), parse_latex(answer)
    return 1.0 if gold_parsed and answer_parsed and verify(gold_parsed, answer_parsed, timeout_seconds=None) else 0.0


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--json", default="", help="also write the result here")
    args = ap.parse_args(argv)
    pairs = tiny_task_samples(args.samples)
    score_with_math_verify(*pairs[0])  # import math-verify/sympy outside the timing
    result = {"samples": len(pairs)}
    for name, fn in (("math_verify", score_with_math_verify), ("fast_path", score_math)):
        start = time.perf_counter()
        rewards = [fn(c, g) for c, g in pairs]
        result[f"{name}_ms_per_sample"] = 1000 * (time.perf_counter() - start) / len(pairs)
        result[f"{name}_accuracy"] = sum(rewards) / len(rewards)
    if result["math_verify_accuracy"] != result["fast_path_accuracy"]:
        raise AssertionError(f"the two scorers disagree: {result}")
    result["speedup"] = result["math_verify_ms_per_sample"] / result["fast_path_ms_per_sample"]
    print(json.dumps(result))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
