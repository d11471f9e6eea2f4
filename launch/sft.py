"""Supervised warm-up on (prompt, target) pairs: the start point of RL and the SFT baseline
(finding 1 of the paper compares on-policy RL against SFT on the same data).

    python -m launch.train model.sft_steps=300   # runs as the first phase of the embedded default
"""
from __future__ import annotations

import time
from typing import NamedTuple, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


class SFTStats(NamedTuple):
    steps: int
    final_loss: float
    seconds: float
    examples: int


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
              deadline_s: float | None = None) -> SFTStats:
    """AdamW on next-token loss of the targets. Batches cycle through a seeded permutation.
    `deadline_s` stops early at a wall-clock budget (the SFT-at-equal-time baseline)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=gen).tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / max(steps, 1)))
    model.train()
    start = time.perf_counter()
    loss_value, step, cursor = float("nan"), 0, 0
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
    model.eval()
    return SFTStats(step, loss_value, time.perf_counter() - start, step * batch_size)
