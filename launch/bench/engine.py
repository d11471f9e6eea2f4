"""Benchmark: the transformers engine's generation throughput (tokens/s) against batch size, on
the tiny default model and on a ~30M-param model. The curve is why DASH samples one big batch:
tokens/s grows many-fold from batch 1 to batch 256 (arXiv 2505.17218 Sec. 4).

    python -m launch.bench.engine --json runs/bench_engine.json
    python -m launch.bench.engine --batch-sizes 1 16 --max-new-tokens 16 --models tiny
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from launch.tiny_model import _default_texts, write_tiny_model_dir
from rollout_workers.engines.base import SamplingParamsSpec
from rollout_workers.engines.hf import HFEngine
from rollout_workers.types import Prompt

MODELS = {
    "tiny": dict(hidden_size=64, layers=2, heads=4),  # launch.tiny_model defaults
    "30m": dict(hidden_size=512, layers=8, heads=8),
}


def measure(engine: HFEngine, batch_size: int, max_new_tokens: int, seed: int = 0) -> tuple[int, float]:
    """(generated tokens, seconds) for one engine call on `batch_size` distinct prompts, G=1."""
    prompts = [Prompt(f"b-{i}", f"Q: {i} + {3 * i + 7} = ?\nA:", "") for i in range(batch_size)]
    params = SamplingParamsSpec(n=1, max_new_tokens=max_new_tokens, seed=seed)
    start = time.perf_counter()
    tokens = sum(len(c.token_ids) for g in engine.generate(prompts, params) for c in g.completions)
    return tokens, time.perf_counter() - start


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the CPU machines have 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget-s", type=float, default=110.0,
                    help="skip a batch size (listed under skipped_batch_sizes) predicted to end past this many seconds")
    ap.add_argument("--json", default="", help="write the result here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict = {"max_new_tokens": args.max_new_tokens, "device": args.device, "threads": args.threads,
                    "models": {}}
    texts = _default_texts()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = write_tiny_model_dir(Path(tmp) / name, texts, **MODELS[name])
            # The budget holds the largest batch in one generate() call: one call, one batch size.
            engine = HFEngine(str(path), device=args.device, gen_batch_tokens=10 ** 9)
            n_params = sum(p.numel() for _, p in engine.named_weights())
            measure(engine, 2, 4)  # warm-up (allocator, kernels)
            sizes, rates, skipped = [], [], []
            for b in args.batch_sizes:
                # Predict this batch's time from the last rate (throughput only grows with batch size).
                predicted = b * args.max_new_tokens / rates[-1] if rates and rates[-1] else 0.0
                if time.perf_counter() - started + predicted > args.budget_s:
                    print(f"{name}: batch {b} skipped, past the {args.budget_s:.0f} s budget", flush=True)
                    skipped.append(b)
                    continue
                tokens, seconds = measure(engine, b, args.max_new_tokens)
                sizes.append(b)
                rates.append(round(tokens / seconds, 1))
                print(f"{name:5s} ({n_params / 1e6:.1f}M params) batch {b:4d}: {tokens:6d} tokens in "
                      f"{seconds:6.2f} s = {tokens / seconds:8.1f} tok/s", flush=True)
            result["models"][name] = {"params": n_params, "batch_sizes": sizes, "tokens_per_second": rates,
                                      "skipped_batch_sizes": skipped}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
