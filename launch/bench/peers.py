"""The bench's non-DASH contenders, each an accuracy curve from the same SFT-warmed start:

- `trl_grpo_curve`: the peer, Hugging Face TRL's `GRPOTrainer` (trl 1.16), with its own
  transformers generation on CPU, the same model, tokenizer, reward (score_math), G, lengths,
  learning rate and prompts per optimizer step as our runs;
- `sft_curve`: continued supervised fine-tuning (launch.sft) for the same wall time, the paper's
  finding 1 (on-policy RL beats SFT on the same data).

Both pause their clock while evaluating, as `launch.train` does, so `train_seconds` excludes
evaluation; both evaluate with `greedy_accuracy` (prompt text -> greedy decode up to
max_new_tokens -> score_math(text, gold) >= 1, scored in a RewardPool with a timeout), the same
decode and reward as our driver's `evaluate`.

Used by `python -m launch.bench dash`; test: `PYTHONPATH=$PWD python -m pytest -q tests/test_bench_peers.py`
"""
from __future__ import annotations

import dataclasses

import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from launch.data.templates import sft_target
from rollout_workers.reward_pool import RewardPool
from rollout_workers.types import Prompt


PHASES = ("generate", "score", "learn", "sync", "other")


class PeerCurve(NamedTuple):
    """A peer contender's accuracy curve and where its training seconds went."""

    points: list[dict]
    """Curve points {"train_seconds", "samples_generated", "accuracy"}, in time order (first = start)."""
    phases: dict[str, float | None]
    """Seconds per phase (PHASES keys plus "total"); None where the peer's loop does not separate it."""
    tokens_generated: int
    """Completion tokens sampled during training (0 for SFT)."""


def curve_point(train_seconds: float, samples_generated: int, accuracy: float) -> dict:
    """One point of an accuracy curve, in the shape `launch.train` writes its `evals`."""
    return {"train_seconds": train_seconds, "samples_generated": samples_generated, "accuracy": accuracy}


@torch.no_grad()
def decode(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], max_new_tokens: int,
           batch_size: int = 64, samples: int = 1, temperature: float | None = None) -> list[str]:
    """Completion texts, prompt-major (`samples` per prompt): greedy when `temperature` is None,
    else sampled at that temperature (top_p 1, no top-k, as the bench's RL contenders sample)."""
    was_training = model.training
    model.eval()
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({*([eos] if isinstance(eos, int) else list(eos or [])), tokenizer.eos_token_id} - {None})
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right end
    texts = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer([p.text for p in prompts[i:i + batch_size]], return_tensors="pt", padding=True)
            width = batch["input_ids"].shape[1]
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=temperature is not None,
                                 temperature=temperature, top_p=1.0 if temperature else None, top_k=0 if temperature else None,
                                 num_return_sequences=samples, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)  # (B * samples, T) new tokens only
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return texts


def greedy_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                    max_new_tokens: int, pool: RewardPool, batch_size: int = 64) -> float:
    """Greedy pass@1: the fraction of prompts whose greedy completion scores >= 1."""
    texts = decode(model, tokenizer, prompts, max_new_tokens, batch_size)
    rewards = pool.score(texts, [p.gold for p in prompts]).rewards
    return sum(r >= 1.0 for r in rewards) / max(1, len(prompts))


class GroupMix(NamedTuple):
    """How a model's sampled groups split: the share the gradient filter would drop outright."""

    all_right: float
    """Fraction of groups whose G completions all score >= 1."""
    all_wrong: float
    """Fraction of groups whose G completions all score < 1."""
    sample_accuracy: float
    """Fraction of all sampled completions that score >= 1."""


def group_mix(model_dir: Path, prompts: Sequence[Prompt], group_size: int, max_new_tokens: int, temperature: float,
              seed: int) -> GroupMix:
    """Sample G completions per prompt from `model_dir` and count all-right and all-wrong groups
    (zero reward variance: no GRPO gradient, arXiv 2505.17218 Sec. 5)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = decode(model, tokenizer, prompts, max_new_tokens, batch_size=16, samples=group_size,
                   temperature=temperature)
    with RewardPool() as pool:
        rewards = pool.score(texts, [p.gold for p in prompts for _ in range(group_size)]).rewards
    right = [[r >= 1.0 for r in rewards[i * group_size:(i + 1) * group_size]] for i in range(len(prompts))]
    n = max(1, len(prompts))
    return GroupMix(sum(all(g) for g in right) / n, sum(not any(g) for g in right) / n,
                    sum(map(sum, right)) / max(1, len(rewards)))


class _GenerateTimer:
    """Wraps `model.generate` (as an instance attribute) and sums its wall seconds while enabled:
    the generation share of a TRL step, which TRL itself only reports to external trackers."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.seconds = 0.0
        self.enabled = True
        self._inner: Callable = model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            if self.enabled:
                self.seconds += time.perf_counter() - t0


class _Clock:
    """Training wall seconds with evaluation paused (the curve's x axis)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.paused = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def pause_for(self, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.paused += time.perf_counter() - t0


# ----------------------------------------------------------------------------- TRL GRPOTrainer


def trl_grpo_curve(model_dir: Path, train_prompts: Sequence[Prompt], eval_prompts: Sequence[Prompt], group_size: int,
                   max_new_tokens: int, lr: float, prompts_per_step: int, time_budget_s: float,
                   eval_every_prompts: int, seed: int, eval_max_new_tokens: int | None = None,
                   temperature: float = 1.0) -> PeerCurve:
    """TRL GRPOTrainer from `model_dir` for `time_budget_s` training seconds; greedy accuracy at the
    start, after every `eval_every_prompts` training prompts (the cadence of our contenders, so
    that a seconds-to-target reads the same number of prompts on both sides, whatever the time
    budget) and at the end. `samples_generated` counts the completions TRL scored (each generation
    batch passes through the reward function once); prompts = samples / G.

    Matched to our learner's defaults: no KL (beta 0, finding 3), PPO clip 0.2, group-std
    advantages, "dapo" loss = our token_mean over the optimizer batch, constant lr, grad clip 1,
    sampling at `temperature` with top_p 1 and no top-k."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if time_budget_s <= 0 or eval_every_prompts < 1:
        raise ValueError(f"time_budget_s must be > 0 and eval_every_prompts >= 1, got {time_budget_s}, "
                         f"{eval_every_prompts}")
    eval_tokens = eval_max_new_tokens or max_new_tokens
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_list([{"prompt": p.text, "gold": p.gold} for p in train_prompts])
    points: list[dict] = []
    scoring = {"samples": 0, "tokens": 0, "seconds": 0.0}
    generate_timer = _GenerateTimer(model)
    clock = _Clock()

    with RewardPool() as pool, tempfile.TemporaryDirectory(prefix="trl-bench-") as out_dir:
        def reward_math(completions: list[str], gold: list[str], completion_ids: list[list[int]],
                        **_kwargs) -> list[float]:
            # TRL passes dataset columns (and the sampled token ids) as keyword lists aligned with `completions`.
            t0 = time.perf_counter()
            rewards = pool.score(completions, gold).rewards
            scoring["seconds"] += time.perf_counter() - t0
            scoring["samples"] += len(completions)
            scoring["tokens"] += sum(len(ids) for ids in completion_ids)
            return rewards

        def evaluate() -> float:
            generate_timer.enabled = False
            try:
                return clock.pause_for(lambda: greedy_accuracy(model, tokenizer, eval_prompts, eval_tokens, pool))
            finally:
                generate_timer.enabled = True

        class BudgetAndEval(TrainerCallback):
            """Evaluates every eval_every_prompts training prompts and stops at the time budget."""

            def __init__(self) -> None:
                self.next_eval = eval_every_prompts

            def on_train_begin(self, args, state, control, **kwargs):
                clock.start, clock.paused = time.perf_counter(), 0.0
                points.append(curve_point(0.0, 0, evaluate()))

            def on_step_end(self, args, state, control, **kwargs):
                now, prompts = clock.seconds(), scoring["samples"] // group_size
                if now >= time_budget_s:
                    control.should_training_stop = True
                if prompts >= self.next_eval or control.should_training_stop:
                    points.append(curve_point(now, scoring["samples"], evaluate()))
                    while self.next_eval <= prompts:
                        self.next_eval += eval_every_prompts
                return control

        # Checkpointing is on by default and ~40% slower on CPU. transformers < 5.20 (the vLLM CPU
        # build's pin, so the venv `make test` builds) calls the switch gradient_checkpointing.
        names = {f.name for f in dataclasses.fields(GRPOConfig)}
        no_checkpointing = {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}
        config = GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, **no_checkpointing,
            learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            # per_device_train_batch_size counts completions: one optimizer step = prompts_per_step groups of G.
            per_device_train_batch_size=prompts_per_step * group_size, gradient_accumulation_steps=1,
            num_generations=group_size, max_completion_length=max_new_tokens, temperature=temperature,
            top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
            max_steps=10**9, save_strategy="no", report_to="none", logging_steps=10**9,
            disable_tqdm=True, seed=seed, data_seed=seed, dataloader_num_workers=0, log_completions=False)
        trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[reward_math],
                              args=config, train_dataset=dataset, callbacks=[BudgetAndEval()])
        trainer.train()
    total = points[-1]["train_seconds"]
    # TRL's step = generate -> score -> logprob forward + backward + optimizer in one process; the
    # remainder after generation and scoring is its learn phase, bookkeeping included (no sync:
    # the sampler is the trained model itself).
    phases = {"generate": generate_timer.seconds, "score": scoring["seconds"],
              "learn": total - generate_timer.seconds - scoring["seconds"], "sync": 0.0, "other": None, "total": total}
    return PeerCurve(points, phases, scoring["tokens"])


# ----------------------------------------------------------------------------- SFT at equal time


def sft_curve(model_dir: Path, train_prompts: Sequence[Prompt], eval_prompts: Sequence[Prompt], time_budget_s: float,
              eval_every_s: float, lr: float, batch_size: int, seed: int, max_new_tokens: int = 16) -> PeerCurve:
    """Continued SFT (launch.sft.sft_train) from `model_dir` for `time_budget_s` training seconds,
    in segments of `eval_every_s` with a greedy evaluation between segments. `samples_generated`
    stays 0 (SFT samples nothing); its x axis is seconds.
    Each segment restarts sft_train's optimizer and warm-up (sft_train has no resume), at another
    seed so that the segments see different batches."""
    from launch.sft import sft_train

    if time_budget_s <= 0 or eval_every_s <= 0:
        raise ValueError(f"time_budget_s and eval_every_s must be > 0, got {time_budget_s}, {eval_every_s}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts, targets = [p.text for p in train_prompts], [sft_target(p) for p in train_prompts]
    points: list[dict] = []
    with RewardPool() as pool:
        points.append(curve_point(0.0, 0, greedy_accuracy(model, tokenizer, eval_prompts, max_new_tokens, pool)))
        spent, segment = 0.0, 0
        while spent < time_budget_s:
            # steps is only an upper bound; the deadline ends the segment.
            stats = sft_train(model, tokenizer, texts, targets, steps=10**6, lr=lr, batch_size=batch_size,
                              seed=seed + segment, deadline_s=min(eval_every_s, time_budget_s - spent))
            spent += stats.seconds
            segment += 1
            points.append(curve_point(spent, 0, greedy_accuracy(model, tokenizer, eval_prompts, max_new_tokens, pool)))
    return PeerCurve(points, {"generate": 0.0, "score": 0.0, "learn": spent, "sync": 0.0, "other": 0.0, "total": spent}, 0)
