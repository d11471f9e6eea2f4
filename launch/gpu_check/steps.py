"""The GPU check's measurements, one step per process (the driver, `python -m launch.gpu_check`,
runs each under its own time cap so that a crash or a hang costs one step, not the device time;
it passes a scratch directory outside its result folder):

    python -m launch.gpu_check.steps learner --profile gpu --json SCRATCH/learner.json
    python -m launch.gpu_check.steps engine  --profile cpu-rehearsal --json SCRATCH/engine.json
    python -m launch.gpu_check.steps sync|e2e --profile ... --json SCRATCH/STEP.json

- learner: the project's learner rank, `learner.trainer.RankTrainer` (DeepSpeed ZeRO-2 with the
  learner's own config; bf16 on the GPU, fp32 on the CPU rehearsal) driven by
  `learner.batcher.StreamingBatcher` exactly as a run drives it: groups of a prompt and
  completions of varying lengths, the real loss on completion tokens only, length-bucketed
  right-padded micro-batches (`learner.packing`; shared prompt heads on the padded path), one
  optimizer step per timed batch. The timed window is forward_backward of every micro-batch + the
  step. Reported per micro-batch budget: tokens/s (the samples' prompt + completion tokens), the
  tokens actually forwarded (a shared prompt once per micro-batch) and their padding share, and
  MFU (the FLOPs forwarded, `micro_batch_flops`) against both the card's
  datasheet dense bf16 peak and a measured matmul ceiling (`matmul_ceiling`: a timed large
  torch.matmul in the learner's dtype on the same device), with the peak memory next to
  `learner.memory`'s estimate. The model is Qwen2.5-0.5B-shaped (random init from its config: no
  hub) on the GPU, a tiny Qwen2 on the CPU rehearsal.
- engine: the transformers engine (the registry's, `rollout_workers.engines.base.make_engine`) tokens/s against batch
  size on the same shape, each batch size repeated (median, min, max); vLLM's too when
  `import vllm` works on the machine.
- sync: moving the 0.5B shape's bf16 weights learner -> engine on one device, against a device
  memcpy of the same bytes: in-process (colocated engine in the learner's process: a copy per
  tensor) and across processes through CUDA IPC (torch.multiprocessing shares one device buffer;
  the sender packs into it, the receiver copies out: the mechanism of a colocated IPC sync; on
  CPU the same code goes through shared memory). Every version is checked bit-exact after its
  timed window (`bit_checksum`), never inside it.
- e2e: the embedded default through `python -m launch.train` (placement and iterations from the
  profile; on the GPU a colocated bf16 ZeRO-1 learner on CUDA beside the transformers engine):
  held-out accuracy before/after RL and wall time, from the run's summary.json. Its run directory
  is in the scratch directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import statistics
import tempfile
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple, Sequence

import torch

from launch.bench.output import write_json

if TYPE_CHECKING:
    from learner.packing import MicroBatch

QWEN25_05B_SHAPE = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
"""Qwen/Qwen2.5-0.5B's config.json (Hugging Face model card), minus the hub: weights are random."""
TINY_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, max_position_embeddings=512, rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
"""The CPU rehearsal's model: the same architecture, small enough for 2 cores."""

BF16_DENSE_PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    # (substring of torch.cuda.get_device_name, dense bf16 tensor TFLOPS, source). NVIDIA quotes
    # "with sparsity" figures; dense is half of them. Checked most specific first.
    ("H200 NVL", 835.0, "NVIDIA H200 datasheet: H200 NVL BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    ("H200", 989.0, "NVIDIA H200 datasheet: H200 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    ("H100 NVL", 835.0, "NVIDIA H100 datasheet: H100 NVL BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    ("H100 PCIe", 756.0, "NVIDIA H100 datasheet: H100 PCIe BF16 Tensor Core 1,513 TFLOPS with sparsity"),
    ("H100", 989.0, "NVIDIA H100 datasheet: H100 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    ("A100", 312.0, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
)


class Peak(NamedTuple):
    tflops: float
    source: str


def bf16_peak(card_name: str) -> Peak | None:
    """The card's dense bf16 peak from BF16_DENSE_PEAK_TFLOPS, or None for a card not in it (MFU
    is then not computed rather than guessed)."""
    for key, tflops, source in BF16_DENSE_PEAK_TFLOPS:
        if key.lower() in card_name.lower():
            return Peak(tflops, source)
    return None


def train_flops_per_token(n_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Model FLOPs per trained token, forward + backward: 6 N + 12 L H T (Chowdhery et al. 2022,
    PaLM, Appendix B: the matmul FLOPs of the weights plus those of attention scores and values;
    no recomputation counted). N counts every parameter that multiplies activations: with tied
    embeddings the (vocab x hidden) matrix is counted once, as the LM head."""
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len


def train_flops(n_params: int, layers: int, hidden: int, lengths: Sequence[int]) -> float:
    """Model FLOPs of one training pass over sequences of these lengths: each sequence's tokens at
    `train_flops_per_token` with T = its own length. Padding is not counted (MFU counts useful work)."""
    return sum(n * train_flops_per_token(n_params, layers, hidden, n) for n in lengths)


def micro_batch_flops(n_params: int, layers: int, hidden: int, mb: MicroBatch) -> float:
    """Model FLOPs the learner performs on one micro-batch: with
    shared prompts, each prompt head once at T = its length, and each row's tokens at T = its head
    plus itself (they attend over the cached head); without, each row whole. Padding not counted."""
    heads = [int(h) for h in mb.head_lengths]
    rows = [int(n) for n in mb.lengths]
    context = [heads[int(i)] for i in mb.row_head] if heads else [0] * len(rows)
    return (train_flops(n_params, layers, hidden, heads)
            + sum(n * train_flops_per_token(n_params, layers, hidden, h + n) for n, h in zip(rows, context)))


@dataclass(frozen=True)
class Profile:
    """Shapes and sizes of one run of the check ("gpu" on the lent machine, "cpu-rehearsal" here)."""

    name: str
    """"gpu" or "cpu-rehearsal"."""
    device: str
    """torch device every step runs on ("cuda" or "cpu")."""
    model_shape: Mapping[str, object]
    """Qwen2Config keyword arguments of the measured model."""
    learner_budgets: tuple[int, ...]
    """Micro-batch token budgets measured (learner.micro_batch_tokens), smallest first."""
    learner_prompt_lens: tuple[int, int]
    """Prompt tokens of a learner sample, drawn uniformly in [low, high]."""
    learner_completion_lens: tuple[int, int]
    """Completion tokens of a learner sample, drawn uniformly in [low, high] (high = max_new_tokens)."""
    learner_group_size: int
    """Completions per prompt (G)."""
    learner_micro_per_step: int
    """An optimizer step holds about this many budgets of tokens (DASH's small backprop increments)."""
    learner_steps: int
    """Timed optimizer steps per budget, after one untimed warm-up step."""
    matmul_size: int
    """Side of the square matmul that measures the device's achievable TFLOPS."""
    matmul_repeats: int
    """Timed repeats of the matmul measurement (median, min, max reported)."""
    engine_batch_sizes: tuple[int, ...]
    """Prompts per engine call (G = 1), smallest first."""
    engine_max_new_tokens: int
    """Tokens generated per prompt."""
    engine_repeats: int
    """Timed engine calls per batch size (after one warm-up call): median, min and max reported."""
    sync_repeats: int
    """Timed weight syncs (after one untimed)."""
    e2e_overrides: tuple[str, ...]
    """`python -m launch.train` overrides of the end-to-end run (run.dir is added)."""
    caps_s: Mapping[str, float]
    """Time cap of each step in seconds (the driver kills a step at its cap and goes on)."""

    @property
    def learner_dtype(self) -> torch.dtype:
        """bf16 on the GPU (what a GPU run trains in); fp32 on CPU (bf16 there is emulated, slow)."""
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    def __post_init__(self) -> None:
        longest = self.learner_prompt_lens[1] + self.learner_completion_lens[1]
        if longest > min(self.learner_budgets):
            raise ValueError(f"profile {self.name}: a {longest}-token learner sample exceeds the budget "
                             f"{min(self.learner_budgets)}")


GPU = Profile(
    name="gpu", device="cuda", model_shape=QWEN25_05B_SHAPE,
    # Math RL shapes: prompts of a few hundred tokens, completions up to 1,024 new tokens.
    learner_budgets=(4096, 16384), learner_prompt_lens=(64, 384), learner_completion_lens=(16, 1024),
    learner_group_size=8, learner_micro_per_step=4, learner_steps=3, matmul_size=8192, matmul_repeats=5,
    engine_batch_sizes=(1, 4, 16, 64, 256, 1024), engine_max_new_tokens=64, engine_repeats=3, sync_repeats=5,
    # One GPU: the engine and the learner share it (colocated, half a GPU each in Ray's books);
    # the learner is on CUDA in bf16 (ZeRO >= 1 is what bf16 needs), beside the transformers engine
    # with the gloo sync: what runs without vLLM.
    e2e_overrides=("train.placement=colocated", "train.num_gpus=1", "learner.gpus_per_rank=0.5",
                   "learner.bf16=true", "learner.zero_stage=1", "train.iterations=10", "eval.every=0",
                   "train.actor_timeout_s=150"),
    caps_s={"learner": 150, "engine": 150, "sync": 90, "e2e": 240},
)
CPU_REHEARSAL = Profile(
    name="cpu-rehearsal", device="cpu", model_shape=TINY_SHAPE,
    learner_budgets=(256, 512), learner_prompt_lens=(4, 24), learner_completion_lens=(2, 40), learner_group_size=4,
    learner_micro_per_step=2, learner_steps=2, matmul_size=1024, matmul_repeats=3,
    engine_batch_sizes=(1, 4, 16), engine_max_new_tokens=8, engine_repeats=3, sync_repeats=3,
    # No SFT warm-up (on a shared 2-core machine it alone passed 10 minutes), so every reward is 0:
    # the filter is off so that the learner still backprops the batch.
    e2e_overrides=("train.placement=cpu", "train.iterations=1", "eval.every=0", "eval.size=16", "data.eval_size=16",
                   "model.sft_steps=0", "rollout.prompts_per_generation=16", "learner.prompts_per_step=16",
                   "learner.filter=false", "train.actor_timeout_s=300"),
    caps_s={"learner": 400, "engine": 200, "sync": 200, "e2e": 600},
)
PROFILES = {p.name: p for p in (GPU, CPU_REHEARSAL)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _tokenizer():
    from launch.tiny_model import train_tokenizer

    return train_tokenizer([f"Q: {a} + {3 * a + 7} = ?\nA: \\boxed{{{4 * a + 7}}}" for a in range(400)])


def build_model(p: Profile, eos_id: int, pad_id: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Qwen2 causal LM of the profile's shape, built on the profile's device."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**p.model_shape, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(p.device):
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    return model.to(dtype)


def _params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters, a tied one once (Qwen2.5-0.5B ties the LM head to the embedding):
    `nn.Module.parameters()` removes duplicates."""
    return list(model.parameters())


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


class Spread(NamedTuple):
    """Median, min and max of repeated measurements."""

    median: float
    min: float
    max: float


def spread(values: Sequence[float]) -> Spread:
    return Spread(statistics.median(values), min(values), max(values))


class MatmulCeiling(NamedTuple):
    """Achievable dense matmul throughput of the device, measured (`matmul_ceiling`)."""

    tflops: Spread
    size: int
    dtype: str
    repeats: int


def matmul_ceiling(device: str, dtype: torch.dtype, size: int, repeats: int, inner: int = 8) -> MatmulCeiling:
    """TFLOPS of `inner` back-to-back (size x size) @ (size x size) products in `dtype` on `device`,
    timed `repeats` times after a warm-up. A datasheet peak assumes boost clocks no real GEMM
    holds under power limits, so MFU against this ceiling says how far the learner is from what
    the card really does, and against the datasheet how far from what it is sold as."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    c = torch.empty_like(a)
    torch.matmul(a, b, out=c)  # warm-up: kernel selection, allocator
    rates = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=c)
        _sync(device)
        rates.append(2.0 * size**3 * inner / (time.perf_counter() - t0) / 1e12)
    del a, b, c
    return MatmulCeiling(spread(rates), size, str(dtype).removeprefix("torch."), repeats)


def learner_groups(p: Profile, vocab: int, budget: int, seed: int) -> list:
    """Scored groups as the engines deliver them: a prompt and G completions of lengths drawn from
    the profile's ranges, random tokens, sampler logprobs, and rewards half 1 half 0 (every
    completion has |advantage| = 1, so the gradient filter keeps all of them). Enough groups that
    the step holds about learner_micro_per_step budgets of tokens."""
    from rollout_workers.types import Completion, Prompt, ScoredGroup

    rng = random.Random(seed)
    groups, tokens = [], 0
    while tokens < p.learner_micro_per_step * budget:
        prompt = tuple(rng.randrange(2, vocab) for _ in range(rng.randint(*p.learner_prompt_lens)))
        completions = []
        for _ in range(p.learner_group_size):
            n = rng.randint(*p.learner_completion_lens)
            completions.append(Completion(tuple(rng.randrange(2, vocab) for _ in range(n)),
                                          tuple(-3.0 * rng.random() for _ in range(n)), "length", ""))
            tokens += len(prompt) + n
        rewards = tuple(float(k % 2) for k in range(p.learner_group_size))
        groups.append(ScoredGroup(Prompt(f"learner-{seed}-{len(groups)}", "", ""), prompt, tuple(completions),
                                  rewards, 0, 0))
    return groups


def measure_learner(p: Profile, scratch: Path) -> dict:
    """Optimizer steps of the project's RankTrainer + StreamingBatcher at each token budget, timed
    from the first forward_backward to the end of the step; MFU against the datasheet peak and
    the measured matmul ceiling."""
    cuda = p.device == "cuda"
    os.environ["DS_ACCELERATOR"] = "cuda" if cuda else "cpu"
    from learner.batcher import LocalRankPool, StreamingBatcher
    from learner.config import LearnerConfig
    from learner.memory import learner_memory
    from learner.trainer import RankTrainer
    from weight_sync.endpoint import free_port

    class CountingPool(LocalRankPool):
        """The in-process pool, counting the tokens (forwarded and padded) and model FLOPs of the
        micro-batches it runs (a model of `n_params` parameters, `layers` x `hidden`)."""

        def __init__(self, trainer: RankTrainer, n_params: int, layers: int, hidden: int) -> None:
            super().__init__(trainer)
            self.flops_of = functools.partial(micro_batch_flops, n_params, layers, hidden)
            self.reset()

        def reset(self) -> None:
            self.forwarded_tokens = self.padded_tokens = self.micro_batches = 0
            self.flops = 0.0

        def forward_backward(self, per_rank, boundary, return_logprobs):
            for mb in per_rank:
                if mb.target_ids.numel():  # not the boundary's one-token dummy
                    self.forwarded_tokens += mb.num_tokens
                    self.padded_tokens += mb.input_ids.numel() + mb.prompt_heads.numel()
                    self.flops += self.flops_of(mb)
                    self.micro_batches += 1
            return super().forward_backward(per_rank, boundary, return_logprobs)

    shape = p.model_shape
    layers, hidden, vocab = int(shape["num_hidden_layers"]), int(shape["hidden_size"]), int(shape["vocab_size"])
    # measured first, before the model holds any memory
    ceiling = matmul_ceiling(p.device, p.learner_dtype, p.matmul_size, p.matmul_repeats)
    name = device_name(p.device)
    peak = bf16_peak(name) if cuda else None
    print(f"matmul ceiling ({ceiling.dtype}, {ceiling.size}^3): {ceiling.tflops.median:.4g} TFLOPS "
          f"(min {ceiling.tflops.min:.4g}, max {ceiling.tflops.max:.4g})", flush=True)
    cfg = LearnerConfig(zero_stage=2, bf16=cuda, micro_batch_tokens=max(p.learner_budgets), lr=1e-6)
    with tempfile.TemporaryDirectory(dir=scratch) as model_dir:
        model = build_model(p, eos_id=1, pad_id=0, dtype=p.learner_dtype)
        n_params = sum(t.numel() for t in _params(model))
        model.save_pretrained(model_dir)  # RankTrainer loads a model directory, as in a run
        del model
        if cuda:
            torch.cuda.empty_cache()
        trainer = RankTrainer(cfg, model_dir, master_port=free_port(), timeout_s=p.caps_s["learner"])
    out = {"device_name": name, "trainer": "learner.trainer.RankTrainer + learner.batcher.StreamingBatcher",
           "model_params": n_params, "zero_stage": cfg.zero_stage, "dtype": str(p.learner_dtype).removeprefix("torch."),
           "attention": trainer.attention, "prompt_lens": list(p.learner_prompt_lens),
           "completion_lens": list(p.learner_completion_lens), "group_size": p.learner_group_size,
           "peak_tflops": peak.tflops if peak else None,
           "peak_source": peak.source if peak else "no bf16 peak known for this device: MFU vs datasheet not computed",
           "matmul_ceiling_tflops": ceiling.tflops._asdict(), "matmul_ceiling_size": ceiling.size,
           "matmul_ceiling_dtype": ceiling.dtype, "budgets": {}}
    for budget in p.learner_budgets:
        groups = learner_groups(p, vocab, budget, seed=budget)
        lengths = [len(g.prompt_token_ids) + len(c.token_ids) for g in groups for c in g.completions]
        pool = CountingPool(trainer, n_params, layers, hidden)
        batcher = StreamingBatcher(dataclasses.replace(cfg, micro_batch_tokens=budget, prompts_per_step=len(groups)),
                                   pool, max_new_tokens=p.learner_completion_lens[1])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, stats = [], None
        try:
            for step in range(1 + p.learner_steps):  # step 0 warms up kernels and the allocator
                pool.reset()
                _sync(p.device)
                t0 = time.perf_counter()
                batcher.begin_batch(len(groups))
                batcher.add_groups(groups)
                stats = batcher.end_batch()
                _sync(p.device)
                if stats.steps != 1:  # a skipped (non-finite) step would time a different path
                    raise RuntimeError(f"budget {budget}: the batch took {stats.steps} optimizer steps, expected 1 "
                                       f"({stats.skipped_nonfinite} skipped as non-finite)")
                if step:
                    seconds.append(time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError as e:  # recorded; the smaller budgets' figures stay
            out["budgets"][str(budget)] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            print(f"learner budget {budget}: out of memory", flush=True)
            break
        t = spread(seconds)
        tokens, flops = sum(lengths), pool.flops
        tflops = flops / t.median / 1e12
        predicted = learner_memory(n_params, layers, hidden, vocab, budget, cfg.zero_stage, 1, cfg.bf16,
                                   reference_model=False)
        entry = {"groups": len(groups), "samples": len(lengths), "tokens_per_step": tokens,
                 "completion_tokens_per_step": stats.completion_tokens, "shared_prompts": batcher.share_prompts,
                 "forwarded_tokens_per_step": pool.forwarded_tokens, "padded_tokens_per_step": pool.padded_tokens,
                 "padding_share": 1.0 - pool.forwarded_tokens / pool.padded_tokens,
                 "micro_batches_per_step": pool.micro_batches,
                 "step_seconds": t._asdict(), "tokens_per_second": tokens / t.median, "model_flops_per_step": flops,
                 "model_tflops": tflops, "mfu_vs_datasheet": tflops / peak.tflops if peak else None,
                 "mfu_vs_measured_matmul": tflops / ceiling.tflops.median,
                 # rank-side split of the last step; on CUDA unsynchronised (a backward's kernels
                 # finish inside the next forward), so indicative only
                 "last_step_split_seconds": {"forward": stats.seconds_forward, "backward": stats.seconds_backward,
                                             "optimizer": stats.seconds_optimizer},
                 "predicted_memory_gib": (predicted.total) / 2**30}
        if cuda:
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["budgets"][str(budget)] = entry
        print(f"learner budget {budget}: {entry['tokens_per_second']:,.0f} tok/s, {pool.micro_batches} micro-batches, "
              f"padding {entry['padding_share']:.1%}, MFU {entry['mfu_vs_measured_matmul']:.1%} of the measured matmul"
              + (f", {entry['mfu_vs_datasheet']:.1%} of the datasheet peak" if peak else ""), flush=True)
    return out


def _engine_prompts(n: int) -> list:
    from rollout_workers.types import Prompt

    return [Prompt(f"b-{i}", f"Q: {i} + {3 * i + 7} = ?\nA:", "") for i in range(n)]


def _rate_curve(batch_sizes: tuple[int, ...], max_new_tokens: int, repeats: int, run: Callable[[int], int],
                deadline: float) -> dict:
    """tokens/s of `run(batch)` (it returns the tokens generated), `repeats` calls per batch size:
    median, min and max. A batch size predicted (from the last median: throughput only grows with
    batch) to end past `deadline` is skipped."""
    sizes, rates, lows, highs, skipped = [], [], [], [], []
    for b in batch_sizes:
        predicted = repeats * b * max_new_tokens / rates[-1] if rates else 0.0
        if time.monotonic() + predicted > deadline:
            skipped.append(b)
            continue
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tokens = run(b)
            runs.append(tokens / (time.perf_counter() - t0))
        r = spread(runs)
        sizes.append(b)
        rates.append(r.median)
        lows.append(r.min)
        highs.append(r.max)
        print(f"  batch {b:5d}: {tokens:7d} tokens, {r.median:10,.0f} tok/s (min {r.min:,.0f}, max {r.max:,.0f})", flush=True)
    return {"batch_sizes": sizes, "repeats": repeats, "tokens_per_second": rates, "tokens_per_second_min": lows,
            "tokens_per_second_max": highs, "skipped_batch_sizes": skipped}


def measure_engine(p: Profile, cap_s: float, scratch: Path) -> dict:
    """Generation tokens/s against batch size: the transformers engine, then vLLM if importable."""
    from rollout_workers.config import RolloutConfig
    from rollout_workers.engines.base import EngineOptions, SamplingParamsSpec, make_engine

    started = time.monotonic()
    dtype = "bfloat16" if p.device == "cuda" else "float32"
    tokenizer = _tokenizer()
    out: dict = {"device_name": device_name(p.device), "dtype": dtype, "max_new_tokens": p.engine_max_new_tokens}
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        model = build_model(p, tokenizer.eos_token_id, tokenizer.pad_token_id, torch.bfloat16 if p.device == "cuda" else torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        # The registry's transformers engine, as a worker builds it; one generate() per call.
        engine = make_engine(RolloutConfig(engine="transformers", dtype=dtype, gen_batch_tokens=10**9), tmp,
                             EngineOptions(device=p.device))
        out["model_params"] = sum(t.numel() for _, t in engine.named_weights())

        def hf_run(batch: int) -> int:
            params = SamplingParamsSpec(n=1, max_new_tokens=p.engine_max_new_tokens, seed=0)
            return sum(len(c.token_ids) for g in engine.generate(_engine_prompts(batch), params) for c in g.completions)

        hf_run(2)  # warm-up
        # vLLM gets the last third of the cap (when it is importable at all)
        out["transformers"] = _rate_curve(p.engine_batch_sizes, p.engine_max_new_tokens, p.engine_repeats, hf_run,
                                          started + 0.6 * cap_s)
        del engine
        if p.device == "cuda":
            torch.cuda.empty_cache()
        try:
            import vllm
        except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
            out["vllm"] = {"available": False, "reason": f"import vllm failed: {type(e).__name__}: {e}"}
            return out
        if p.device != "cuda":
            out["vllm"] = {"available": False, "reason": f"vllm {vllm.__version__} is importable but this profile runs on CPU"}
            return out
        try:  # never run anywhere yet: its failure must not cost the transformers figures above
            # eager mode: CUDA-graph capture would eat the step's cap before the first token
            llm = vllm.LLM(model=tmp, dtype="bfloat16", gpu_memory_utilization=0.5, enforce_eager=True, seed=0)
            sampling = vllm.SamplingParams(max_tokens=p.engine_max_new_tokens, ignore_eos=True, temperature=1.0)

            def vllm_run(batch: int) -> int:
                texts = [q.text for q in _engine_prompts(batch)]
                return sum(len(o.outputs[0].token_ids) for o in llm.generate(texts, sampling, use_tqdm=False))

            vllm_run(2)
            out["vllm"] = {"available": True, "version": vllm.__version__, "enforce_eager": True,
                           **_rate_curve(p.engine_batch_sizes, p.engine_max_new_tokens, p.engine_repeats, vllm_run,
                                         started + cap_s - 10)}
        except Exception as e:  # noqa: BLE001 - recorded in the table, with the type and message
            out["vllm"] = {"available": False, "reason": f"vllm {vllm.__version__} failed: {type(e).__name__}: {e}"}
    return out


def bit_checksum(t: torch.Tensor) -> int:
    """An exact fingerprint of a tensor's bits: sum_i bits_i * (i mod 65521 + 1) in int64 (wrapping).
    Integer arithmetic, so the reduction order cannot change it (a float sum could differ between
    two processes holding equal bits), and a weight per position, so a permutation changes it."""
    bits = {2: torch.int16, 4: torch.int32}[t.element_size()]
    flat = t.detach().reshape(-1).view(bits).to(torch.int64)
    return int((flat * (torch.arange(flat.numel(), device=flat.device) % 65521 + 1)).sum())


def _pack(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for t in params:
        flat[offset:offset + t.numel()].copy_(t.reshape(-1))
        offset += t.numel()


def _unpack(flat: torch.Tensor, params: list[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for t in params:
            t.view(-1).copy_(flat[offset:offset + t.numel()])
            offset += t.numel()


CHECKSUM = "checksum"
"""What the sender asks the IPC receiver after a timed round: the bit checksums of its weights."""


def _ipc_receiver(p: Profile, to_receiver, to_sender) -> None:
    """The engine side of the IPC sync (a spawned process): map the shared buffer once, then for
    every version copy it into its own model and report the seconds; asked for CHECKSUM, report
    its weights' `bit_checksum`s (outside the sender's timed window)."""
    flat = to_receiver.get(timeout=120)  # opened through CUDA IPC (or shared memory on CPU)
    model = build_model(p, eos_id=1, pad_id=0, dtype=torch.bfloat16, seed=1)
    params = [t.detach() for t in _params(model)]
    to_sender.put("ready")
    while (msg := to_receiver.get(timeout=120)) is not None:
        if msg == CHECKSUM:
            to_sender.put([bit_checksum(t) for t in params])
            continue
        t0 = time.perf_counter()
        _unpack(flat, params)
        _sync(p.device)
        to_sender.put((msg, time.perf_counter() - t0))


def _median_seconds(fn: Callable[[], None], device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_sync(p: Profile) -> dict:
    """Learner -> engine weight copy on one device (in-process and through IPC) vs a memcpy; every
    version checked bit-exact after its timed window."""
    import torch.multiprocessing as mp

    learner_model = build_model(p, eos_id=1, pad_id=0, dtype=torch.bfloat16, seed=0)
    learner_params = [t.detach() for t in _params(learner_model)]
    nbytes = sum(t.numel() * t.element_size() for t in learner_params)
    numel = sum(t.numel() for t in learner_params)
    src = torch.empty(nbytes, dtype=torch.uint8, device=p.device)
    dst = torch.empty_like(src)
    memcpy_s = _median_seconds(lambda: dst.copy_(src), p.device, p.sync_repeats)
    del src, dst
    engine_params = [t.detach() for t in _params(build_model(p, eos_id=1, pad_id=0, dtype=torch.bfloat16, seed=1))]

    def copy_in_process() -> None:
        for e, l in zip(engine_params, learner_params):
            e.copy_(l)

    in_process_s = _median_seconds(copy_in_process, p.device, p.sync_repeats)
    in_process_mismatched = sum(not torch.equal(e, l) for e, l in zip(engine_params, learner_params))
    del engine_params

    ctx = mp.get_context("spawn")
    to_receiver, to_sender = ctx.Queue(), ctx.Queue()
    flat = torch.empty(numel, dtype=torch.bfloat16, device=p.device)
    if p.device == "cpu":
        flat.share_memory_()
    receiver = ctx.Process(target=_ipc_receiver, args=(p, to_receiver, to_sender), daemon=True)
    receiver.start()
    ipc_mismatched, checked = 0, 0
    try:
        to_receiver.put(flat)
        if to_sender.get(timeout=120) != "ready":
            raise RuntimeError("IPC receiver did not start")
        rounds, receive_s = [], []
        for version in range(1 + p.sync_repeats):
            with torch.no_grad():  # a new version: the learner's weights change between syncs
                learner_params[version % len(learner_params)].add_(1.0)
            _sync(p.device)
            t0 = time.perf_counter()
            _pack(learner_params, flat)
            _sync(p.device)
            to_receiver.put(version)
            got_version, seconds = to_sender.get(timeout=120)
            elapsed = time.perf_counter() - t0  # the timed window ends here: the checks below are not in it
            if got_version != version:
                raise RuntimeError(f"IPC receiver answered version {got_version}, expected {version}")
            if version:
                rounds.append(elapsed)
                receive_s.append(seconds)
            to_receiver.put(CHECKSUM)
            sums = to_sender.get(timeout=120)
            ipc_mismatched += sum(a != bit_checksum(t) for a, t in zip(sums, learner_params))
            checked += 1
        to_receiver.put(None)
        receiver.join(timeout=60)
    finally:
        if receiver.is_alive():
            receiver.terminate()
    ipc_s = statistics.median(rounds)
    out = {"device_name": device_name(p.device), "bytes": nbytes, "tensors": len(learner_params), "dtype": "bfloat16",
           "memcpy_seconds": memcpy_s, "memcpy_gb_per_s": nbytes / memcpy_s / 1e9,
           "in_process_seconds": in_process_s, "in_process_vs_memcpy": in_process_s / memcpy_s,
           "in_process_mismatched_tensors": in_process_mismatched,
           "ipc_seconds": ipc_s, "ipc_receiver_copy_seconds": statistics.median(receive_s),
           "ipc_vs_memcpy": ipc_s / memcpy_s, "ipc_mismatched_tensors": ipc_mismatched, "ipc_versions_checked": checked,
           "ipc_mechanism": "CUDA IPC (torch.multiprocessing)" if p.device == "cuda" else "shared memory (CPU rehearsal)"}
    print(f"sync {nbytes / 1e6:.2f} MB: memcpy {memcpy_s * 1e3:.2f} ms, in-process {in_process_s * 1e3:.2f} ms, "
          f"IPC {ipc_s * 1e3:.2f} ms; bit-exact: in-process {in_process_mismatched == 0}, IPC {ipc_mismatched == 0} "
          f"over {checked} versions", flush=True)
    return out


def e2e_command(p: Profile, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "launch.train", *p.e2e_overrides, f"run.dir={run_dir}"]


def measure_e2e(p: Profile, cap_s: float, run_dir: Path) -> dict:
    """The embedded default through `python -m launch.train`; figures from its summary.json.
    A run that wrote its summary and then failed (e.g. no matplotlib for the plots on a bare GPU
    machine) still gives its figures, with the exit status and last line recorded. The run
    directory and its log (`run_dir`.parent / e2e-train.log) are scratch: the log is copied into
    this step's log."""
    cmd = e2e_command(p, run_dir)
    train_log = run_dir.parent / "e2e-train.log"
    t0 = time.perf_counter()
    with train_log.open("w") as f:
        # explicit, as launch/single_node.sh does: the profile's learner device (the config's
        # launch.placement.ds_accelerator; launch.train refuses an environment that contradicts it)
        env = {**os.environ, "DS_ACCELERATOR": p.device}
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=max(1.0, cap_s - 40))
        except subprocess.TimeoutExpired:
            proc.terminate()  # launch.train's SIGTERM handler stops what the run started (Ray actors, pools)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()  # Ray's own processes die with it (they fate-share with their parent)
                proc.wait(timeout=30)
            rc = None
    wall = time.perf_counter() - t0
    output = train_log.read_text(errors="replace")
    print(output, flush=True)  # into this step's log
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
    summary_path = run_dir / "summary.json"
    if rc is None:
        raise RuntimeError(f"launch.train stopped at the step's cap ({cap_s:.0f} s); last line: {last}")
    if not summary_path.exists():
        raise RuntimeError(f"launch.train exited {rc} without a summary.json: {last}")
    summary = json.loads(summary_path.read_text())
    return {"command": " ".join(["python", "-m", "launch.train", *p.e2e_overrides]),
            "accuracy_before_rl": summary["eval_accuracy_before_rl"], "accuracy_after_rl": summary["eval_accuracy_after_rl"],
            "iterations": summary["iterations"], "run_wall_seconds": summary["wall_seconds"], "command_wall_seconds": wall,
            "exit_code": rc, "exit_note": last if rc else ""}


STEPS = ("learner", "engine", "sync", "e2e")


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m launch.gpu_check.steps", description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=STEPS)
    ap.add_argument("--profile", choices=list(PROFILES), required=True)
    ap.add_argument("--json", required=True,
                    help="write the step's figures here; its directory is the step's scratch (model files, the e2e run)")
    ap.add_argument("--cap-s", type=float, default=0.0, help="the step's time cap (0 = the profile's)")
    args = ap.parse_args(argv)
    p = PROFILES[args.profile]
    cap = args.cap_s or p.caps_s[args.step]
    if p.device == "cpu":
        # The sync step's copies run single-threaded (as launch.bench's sync does): a 2-thread
        # OpenMP copy on a shared 2-core machine mostly measures thread wake-ups.
        torch.set_num_threads(1 if args.step == "sync" else min(2, os.cpu_count() or 1))
    elif not torch.cuda.is_available():
        raise SystemExit(f"profile {p.name} needs CUDA, and torch {torch.__version__} sees no GPU")
    out_path = Path(args.json)
    scratch = out_path.parent
    scratch.mkdir(parents=True, exist_ok=True)
    if args.step == "learner":
        result = measure_learner(p, scratch)
    elif args.step == "engine":
        result = measure_engine(p, cap, scratch)
    elif args.step == "sync":
        result = measure_sync(p)
    else:
        result = measure_e2e(p, cap, scratch / "e2e-run")
    write_json(out_path, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
