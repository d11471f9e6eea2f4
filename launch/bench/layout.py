"""Micro-batch layouts of the learner, measured on the same samples and model.

- "dense_mask": the layout before length bucketing: samples concatenated into one row per
  micro-batch (first-fit-decreasing on the token sum), position ids restarting per sample, and a
  dense (1, 1, T, T) block-diagonal causal mask, so attention costs T^2 per row.
- "padded": length-bucketed, right-padded (B, L) micro-batches with plain causal attention and no
  mask (`learner.trainer.forward_logprobs`), each sample's prompt in its own row
  (learner.share_prompts=false);
- "shared": `learner.packing` today: the same rows without their prompts; each distinct prompt head
  runs once per micro-batch and its rows continue it through the K/V cache
  (learner.share_prompts=true; `pack_samples` cuts by completion length or by prompt group,
  whichever costs less).

Samples come in groups of G = 8 completions of one prompt, as a sampled RL batch does.

Each runs forward + backward of the sum-form PPO loss (rho = 1) over every micro-batch of one
optimizer batch, fp32 on CPU, a Qwen2 model shaped like the embedded default's (hidden 128,
4 layers). Repeats are interleaved and the minimum is kept; CPU seconds (this process) are
reported next to wall seconds because on a shared machine wall time mostly measures the others.

    python -m launch.bench layout --json runs/bench/layout.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from launch.bench.output import write_json
from learner.filtering import Sample
from learner.losses import ppo_clip_loss_sum, token_weights
from learner.packing import collate, pack_samples
from learner.trainer import forward_logprobs

GROUP_SIZE = 8
REGIMES = {
    # name: (samples, prompt tokens range, completion tokens range)
    "default": (512, (6, 14), (2, 16)),  # the embedded default: 64 prompts x G = 8, <= 16 new tokens
    "reasoning": (64, (40, 80), (48, 256)),  # worked solutions of 48+ tokens
}


def make_samples(num: int, prompt_range: tuple[int, int], completion_range: tuple[int, int], vocab: int,
                 seed: int) -> list[Sample]:
    """`num` samples, GROUP_SIZE per random prompt."""
    rng = random.Random(seed)
    out = []
    for uid in range(num):
        if uid % GROUP_SIZE == 0:
            prompt = tuple(rng.randrange(vocab) for _ in range(rng.randint(*prompt_range)))
        c = rng.randint(*completion_range)
        out.append(Sample(uid, prompt, tuple(rng.randrange(vocab) for _ in range(c)), tuple([-1.0] * c),
                          rng.choice((-1.0, 1.0))))
    return out


def dense_mask_logprobs(model: torch.nn.Module, samples: list[Sample]) -> torch.Tensor:
    """(K,) completion logprobs of `samples` run as one row with a dense block-diagonal causal mask."""
    ids, pos, seg, pred, targets = [], [], [], [], []
    for k, s in enumerate(samples):
        start, p, c = len(ids), len(s.prompt_token_ids), len(s.completion_token_ids)
        ids.extend(s.prompt_token_ids + s.completion_token_ids)
        pos.extend(range(p + c))
        seg.extend([k] * (p + c))
        pred.extend(range(start + p - 1, start + p - 1 + c))
        targets.extend(s.completion_token_ids)
    segment = torch.tensor(seg)
    t = len(ids)
    mask = (torch.ones(t, t, dtype=torch.bool).tril_() & (segment[:, None] == segment[None, :]))[None, None]
    logits = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), attention_mask=mask,
                   use_cache=False).logits
    return torch.log_softmax(logits[0, pred].float(), -1).gather(1, torch.tensor(targets)[:, None])[:, 0]


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = next((b for b, room in enumerate(free) if lengths[i] <= room), None)
        if b is None:
            bins.append([])
            free.append(budget)
            b = len(bins) - 1
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def run_layout(model: torch.nn.Module, samples: list[Sample], layout: str, budget: int) -> tuple[float, float, int]:
    """Forward + backward over one optimizer batch; returns (wall s, CPU s, micro-batches)."""
    lengths = [s.num_tokens for s in samples]
    share = layout == "shared"
    bins = first_fit_decreasing(lengths, budget) if layout == "dense_mask" else pack_samples(samples, budget, share)
    model.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    for b in bins:
        part = [samples[i] for i in b]
        if layout == "dense_mask":
            logprobs = dense_mask_logprobs(model, part)
        else:
            logprobs, _ = forward_logprobs(model, collate(part, "token_mean", None, share), "padded_sdpa", torch.device("cpu"))
        seq_lens = torch.tensor([len(s.completion_token_ids) for s in part])
        advantages = torch.repeat_interleave(torch.tensor([s.advantage for s in part]), seq_lens)
        ppo_clip_loss_sum(logprobs, logprobs.detach(), advantages, token_weights(seq_lens, "token_mean"),
                          0.2, 0.2).loss_sum.backward()
    return time.perf_counter() - wall, time.process_time() - cpu, len(bins)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m launch.bench layout")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", default="512,2048", help="micro_batch_tokens values, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = 512
    config = Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    results = []
    for regime, (num, prompt_range, completion_range) in REGIMES.items():
        samples = make_samples(num, prompt_range, completion_range, vocab, seed=0)
        for budget in (int(x) for x in args.budgets.split(",")):
            best: dict[str, tuple[float, float, int]] = {}
            for _ in range(args.repeats):
                for layout in ("dense_mask", "padded", "shared"):
                    got = run_layout(model, samples, layout, budget)
                    best[layout] = min(best.get(layout, got), got, key=lambda r: r[1])
            for layout, (wall, cpu, micro_batches) in best.items():
                row = {"regime": regime, "micro_batch_tokens": budget, "layout": layout, "micro_batches": micro_batches,
                       "tokens": sum(s.num_tokens for s in samples), "wall_seconds": wall, "cpu_seconds": cpu}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    out = {"threads": args.threads, "repeats": args.repeats, "results": results}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
