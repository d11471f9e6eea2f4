"""Supervised warm-up on (prompt, target) pairs: the start point of RL and the SFT baseline
(finding 1 of the paper compares on-policy RL against SFT on the same data).

    python -m launch.train model.sft_steps=300   # runs as the first phase of the embedded default
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable, NamedTuple, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rollout_workers.types import OVER_MAX_PROMPT_TOKENS

TARGET_OVER_MAX_NEW_TOKENS = "sft_target_over_max_new_tokens"
"""Why a row is left out of the warm-up: its target and EOS are longer than rollout.max_new_tokens."""


class SFTStats(NamedTuple):
    steps: int
    final_loss: float
    seconds: float
    examples: int
    probe_accuracy: float
    """Last probe result (nan when no probe ran)."""


class StopProbe(NamedTuple):
    """When the warm-up stops early: once `accuracy()` >= `stop_at`, asked every `every` steps."""

    accuracy: Callable[[], float]
    """Greedy accuracy of the model being trained (e.g. `greedy_probe` on training problems)."""
    every: int
    """Steps between probes."""
    stop_at: float
    """Accuracy that ends the warm-up."""


class FittingRows(NamedTuple):
    kept: list[int]
    """Indices of the rows the warm-up learns from, in their order."""
    skipped: Counter[str]
    """Rows left out, by reason (OVER_MAX_PROMPT_TOKENS, TARGET_OVER_MAX_NEW_TOKENS)."""


def rows_within_limits(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], targets: Sequence[str],
                       max_prompt_tokens: int, max_new_tokens: int) -> FittingRows:
    """The rows whose prompt fits `max_prompt_tokens` (the RL path's own filter,
    `launch.data.model_prompts.drop_long_prompts`) and whose target with its EOS fits
    `max_new_tokens` (a completion the engine can write out before it is cut). A longer row would
    teach text past the limits RL samples within, past the model's context when they add up to it
    (the tiny model has 256 positions), and its length would be paid in every batch it joins:
    MATH's worked solutions kept the embedded model's warm-up running for over 10 minutes."""
    prompt_lens = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False).input_ids]
    target_lens = [len(ids) + 1 for ids in tokenizer(list(targets), add_special_tokens=False).input_ids]  # + EOS
    kept, skipped = [], Counter()
    for i, (n_prompt, n_target) in enumerate(zip(prompt_lens, target_lens)):
        if n_prompt > max_prompt_tokens:
            skipped[OVER_MAX_PROMPT_TOKENS] += 1
        elif n_target > max_new_tokens:
            skipped[TARGET_OVER_MAX_NEW_TOKENS] += 1
        else:
            kept.append(i)
    return FittingRows(kept, skipped)


def greedy_probe(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                 golds: Sequence[str], max_new_tokens: int) -> float:
    """Fraction of prompts whose greedy completion's final answer equals the gold string exactly:
    a cheap in-process check for the warm-up (the real eval uses math-verify in the workers)."""
    from rollout_workers.rewards import extract_final_answer

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    tokenizer.padding_side = side
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(extract_final_answer(t) == g for t, g in zip(texts, golds)) / max(1, len(golds))


def sft_batches(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], targets: Sequence[str]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids (B, T), attention_mask (B, T) and labels (B, T) with -100 on prompt and
    padding, so the loss covers only the target tokens (and its EOS)."""
    eos = tokenizer.eos_token_id
    rows, labels = [], []
    for p, t in zip(prompts, targets):
        p_ids = tokenizer(p, add_special_tokens=False).input_ids
        t_ids = tokenizer(t, add_special_tokens=False).input_ids + [eos]
        rows.append(p_ids + t_ids)
        labels.append([-100] * len(p_ids) + t_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (B, T)
    label_ids = torch.tensor([l + [-100] * (width - len(l)) for l in labels])  # (B, T)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (B, T)
    return input_ids, mask, label_ids


def sft_train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
              targets: Sequence[str], steps: int, lr: float, batch_size: int, seed: int,
              deadline_s: float | None = None, probe: StopProbe | None = None) -> SFTStats:
    """AdamW (constant lr after a 20-step warmup) on the next-token loss of the targets. Batches
    cycle through a seeded permutation. Stops early at `deadline_s` wall seconds (the
    SFT-at-equal-time baseline) or once the probe's accuracy reaches its `stop_at`: tiny models
    learn carries abruptly, so a step count alone gives an unreliable start point."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=gen).tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    start = time.perf_counter()
    loss_value, step, cursor, accuracy = float("nan"), 0, 0, float("nan")
    for step in range(1, steps + 1):
        idx = [order[(cursor + i) % len(order)] for i in range(batch_size)]
        cursor += batch_size
        input_ids, mask, labels = sft_batches(tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if deadline_s is not None and time.perf_counter() - start > deadline_s:
            break
        if probe is not None and step % probe.every == 0:
            accuracy = probe.accuracy()
            if accuracy >= probe.stop_at:
                break
    model.eval()
    return SFTStats(step, loss_value, time.perf_counter() - start, step * batch_size, accuracy)
