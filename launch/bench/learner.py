"""Learner benchmark: DASH backprop throughput through the DeepSpeed learner vs a bare PyTorch loop
doing the same work, plus the exactness error and the forward passes spent on filtered samples.

    python -m launch.bench.learner --json /tmp/bench_learner.json [--repeats 3]
    python -m launch.bench learner --json runs/bench/learner.json

Model: the ~5M-param Qwen2 of `launch.tiny_model.build_tiny_model(hidden_size=256, layers=4, heads=4)`
(random init, saved to a temp dir). Batch: a fixed synthetic sampled batch (seeded) of 8 groups of
8 completions, prompts 24-40 tokens, completions 16-96 tokens, one all-correct and one all-wrong
group (filtered before any pass). One optimizer step per batch, fp32, ZeRO 0, one rank in-process.

JSON keys: `tokens_per_second` (learner: kept prompt + completion tokens per second of
begin_batch -> end_batch, best of the repeats: the least disturbed by other processes),
`bare_torch_tokens_per_second` (the SAME packed micro-batches the learner ran, the same sum-form
loss and normalisation, torch AdamW, grad-norm clipping; same run, learner and bare rounds
interleaved), `*_median` (medians, for comparison), `ratio` (learner / bare, best-of; goal >= 0.9), `grad_rel_error` (worst relative
error of the learner's accumulated gradient vs a one-pass-per-sample plain-torch gradient over
the token budgets tried), `filtered_forward_calls` (forward passes that saw a filtered sample;
must be 0), and the batch sizes. Numbers from a shared 2-core machine are indicative only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

from launch.bench.output import write_json
BUDGETS_FOR_ERROR = (256, 1024)
MAX_NEW = 96


def synthetic_groups(seed: int = 0, num_groups: int = 8, group_size: int = 8, vocab: int = 250) -> list:
    from rollout_workers.types import Completion, Prompt, ScoredGroup

    rng = random.Random(seed)
    groups = []
    for i in range(num_groups):
        comps = []
        for _ in range(group_size):
            n = rng.randint(16, MAX_NEW)
            comps.append(Completion(tuple(rng.randrange(vocab) for _ in range(n)),
                                    tuple(-3 * rng.random() for _ in range(n)), "stop", ""))
        rewards = ([1.0] * group_size if i == 0 else [0.0] * group_size if i == 1
                   else [float(rng.random() < 0.5) for _ in range(group_size - 2)] + [1.0, 0.0])
        groups.append(ScoredGroup(Prompt(f"bench-{i}", "", ""), tuple(rng.randrange(vocab) for _ in range(rng.randint(24, 40))),
                                  tuple(comps), tuple(rewards), 0, 0))
    return groups


def reference_gradients(model_dir: str, samples: list, normaliser: float, clip: tuple[float, float]) -> dict[str, torch.Tensor]:
    """Plain torch, one unpacked sample at a time: grad of the token-mean loss of the whole batch (rho = 1)."""
    from transformers import AutoModelForCausalLM

    from learner.losses import ppo_clip_loss_sum

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for s in samples:
        p, c = len(s.prompt_token_ids), len(s.completion_token_ids)
        logits = model(torch.tensor([s.prompt_token_ids + s.completion_token_ids])).logits[0]
        logprobs = torch.log_softmax(logits[p - 1:p - 1 + c], -1).gather(1, torch.tensor(s.completion_token_ids)[:, None])[:, 0]
        (ppo_clip_loss_sum(logprobs, logprobs.detach(), torch.full((c,), s.advantage), torch.ones(c), *clip).loss_sum
         / normaliser).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def bare_torch_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list, normaliser: float,
                    clip: tuple[float, float], grad_clip: float) -> None:
    """What the learner does for one step, in plain PyTorch (the baseline)."""
    from learner.losses import ppo_clip_loss_sum
    from learner.trainer import forward_logprobs

    for mb in batches:
        logprobs, _ = forward_logprobs(model, mb, "padded_sdpa", torch.device("cpu"))
        ppo_clip_loss_sum(logprobs, logprobs.detach(), mb.advantages, mb.weights, *clip).loss_sum.backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(1.0 / normaliser)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.learner")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--micro-batch-tokens", type=int, default=1024)
    args = parser.parse_args(argv)

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    t_start = time.perf_counter()

    def progress(what: str) -> None:
        print(f"[bench_learner {time.perf_counter() - t_start:6.1f}s] {what}", file=sys.stderr, flush=True)
    from transformers import AutoModelForCausalLM

    from launch.tiny_model import _default_texts, build_tiny_model, train_tokenizer
    from learner.config import LearnerConfig
    from learner.batcher import LocalRankPool, StreamingBatcher
    from learner.trainer import RankTrainer
    from learner.filtering import select_samples
    from learner.losses import step_normaliser
    from weight_sync.endpoint import free_port

    class RecordingPool(LocalRankPool):
        """Keeps the micro-batches the learner ran, so the bare loop runs exactly the same ones."""

        def __init__(self, engine: RankTrainer) -> None:
            super().__init__(engine)
            self.batches: list = []

        def forward_backward(self, per_rank, boundary, return_logprobs):
            self.batches.append(per_rank[0])
            return super().forward_backward(per_rank, boundary, return_logprobs)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(_default_texts())
        model = build_tiny_model(tokenizer, hidden_size=256, layers=4, heads=4)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        groups = synthetic_groups(vocab=len(tokenizer))
        cfg = LearnerConfig(prompts_per_step=len(groups), micro_batch_tokens=args.micro_batch_tokens, lr=1e-5)
        kept = select_samples(groups, cfg.advantage, cfg.filter_threshold, cfg.filter)
        tokens = sum(s.num_tokens for s in kept.samples)
        normaliser = step_normaliser("token_mean", sum(len(s.completion_token_ids) for s in kept.samples), len(kept.samples), 0)
        clip = (cfg.clip_eps_low, cfg.clip_eps_high)

        engine = RankTrainer(cfg, tmp, master_port=free_port())
        progress(f"engine ready; {len(kept.samples)} kept samples, {tokens} tokens")
        # exactness first, on the initial weights (probe takes no step)
        ref = reference_gradients(tmp, kept.samples, normaliser, clip)
        worst = 0.0
        for budget in BUDGETS_FOR_ERROR:
            got = StreamingBatcher(dataclasses.replace(cfg, micro_batch_tokens=budget), LocalRankPool(engine),
                                   MAX_NEW).probe_gradients(groups)
            worst = max(worst, max(float((got[k] - ref[k]).norm() / ref[k].norm()) for k in ref))
        progress(f"exactness done: worst rel error {worst:.2e}")
        filtered = set(range(len(groups) * len(groups[0].completions))) - {s.uid for s in kept.samples}
        engine.forward_uids.clear()

        pool = RecordingPool(engine)
        batcher = StreamingBatcher(cfg, pool, MAX_NEW)
        bare = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
        optimizer = torch.optim.AdamW(bare.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        learner_s, bare_s = [], []
        for rep in range(args.repeats + 1):  # the first round warms both up and is not timed
            pool.batches = []
            t0 = time.perf_counter()
            batcher.begin_batch(len(groups))
            batcher.add_groups(groups)
            stats = batcher.end_batch()
            t1 = time.perf_counter()
            bare_torch_step(bare, optimizer, pool.batches, normaliser, clip, cfg.grad_clip)
            t2 = time.perf_counter()
            progress(f"round {rep}: learner {t1 - t0:.2f}s, bare {t2 - t1:.2f}s")
            if rep:
                learner_s.append(t1 - t0)
                bare_s.append(t2 - t1)
        result = {
            "model_params": params,
            "groups": len(groups), "samples_in": stats.samples_in, "samples_kept": stats.samples_kept,
            "tokens_per_batch": tokens, "micro_batches_per_step": len(pool.batches),
            "micro_batch_tokens": cfg.micro_batch_tokens,
            "tokens_per_second": tokens / min(learner_s),
            "bare_torch_tokens_per_second": tokens / min(bare_s),
            "tokens_per_second_median": tokens / statistics.median(learner_s),
            "bare_torch_tokens_per_second_median": tokens / statistics.median(bare_s),
            "grad_rel_error": worst,
            "filtered_forward_calls": len(engine.forward_uids & filtered),
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
        }
        result["ratio"] = result["tokens_per_second"] / result["bare_torch_tokens_per_second"]
    write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
