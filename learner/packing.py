"""Length-aware packing of samples into token-budget micro-batches, and token-balanced rank splits.

Padding-free: a micro-batch is ONE row of concatenated sequences (prompt + completion each), with
position ids restarting at 0 per sequence and a block-diagonal causal 4-D boolean attention mask
(Qwen2 under transformers' "sdpa" attention gives bit-for-bit the per-sequence logits on CPU;
measured: max |diff| 1.5e-7, i.e. identical up to float summation order).

Pure tensor math, no Ray/DeepSpeed. Tested by:
    PYTHONPATH=$PWD /work/main/.venv/bin/python -m pytest -q tests/test_learner_math.py
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from learner.filtering import Sample
from learner.losses import token_weights


def pack_first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each bin's total <= budget (first-fit-decreasing; ties keep
    input order, so the result is deterministic). A length > budget raises naming both."""
    if budget < 1:
        raise ValueError(f"micro-batch token budget must be >= 1, got {budget}")
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens (prompt + completion), more than the micro-batch "
                             f"budget micro_batch_tokens={budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(budget - lengths[i])
    return bins


def split_across_ranks(loads: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Assign items (micro-batches with token `loads`) to ranks: largest first onto the least loaded
    rank among those with the fewest items, so every rank gets ceil/floor(n / num_ranks) items
    (ranks must run the same number of passes: ZeRO collectives happen inside forward/backward)
    and token loads are balanced. Returns, per rank, indices into `loads`."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    per_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    tokens = [0] * num_ranks
    for i in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        fewest = min(len(r) for r in per_rank)
        r = min((r for r in range(num_ranks) if len(per_rank[r]) == fewest), key=lambda r: (tokens[r], r))
        per_rank[r].append(i)
        tokens[r] += loads[i]
    return per_rank


class MicroBatch(NamedTuple):
    """One packed row. K = completion tokens in it, T = all tokens in it. Empty (dummy) when K = 0."""

    input_ids: torch.Tensor
    """(1, T) long: prompt + completion of each sample, concatenated."""
    position_ids: torch.Tensor
    """(1, T) long: restarts at 0 for each sample."""
    segment_ids: torch.Tensor
    """(T,) long: which sample of the row each token belongs to (builds the block-diagonal mask)."""
    pred_index: torch.Tensor
    """(K,) long: positions whose logits predict a completion token."""
    target_ids: torch.Tensor
    """(K,) long: the completion tokens."""
    advantages: torch.Tensor
    """(K,) float: the sample's advantage on each of its tokens."""
    weights: torch.Tensor
    """(K,) float: aggregation weights w_t of the sum-form loss (`losses.token_weights`)."""
    logprobs_sampler: torch.Tensor
    """(K,) float."""
    logprobs_old: Optional[torch.Tensor]
    """(K,) float, or None when the learner's own detached logprobs are the old ones (rho = 1)."""
    seq_lens: torch.Tensor
    """(S,) long: completion tokens per sample."""
    uids: tuple[int, ...]
    """(S,) Sample.uid of each sample, in row order."""

    @property
    def num_tokens(self) -> int:
        """T, what the budget counts."""
        return int(self.input_ids.shape[1])

    def attention_mask(self) -> torch.Tensor:
        """(1, 1, T, T) bool, True = may attend: causal inside each sample, nothing across samples."""
        t = self.input_ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril_()
        return (causal & (self.segment_ids[:, None] == self.segment_ids[None, :]))[None, None]


def collate(samples: Sequence[Sample], loss_agg: str,
            logprobs_old: Optional[dict[int, torch.Tensor]] = None) -> MicroBatch:
    """Pack `samples` into one padding-free row. `logprobs_old` maps Sample.uid -> (C,) old logprobs
    (None = use the learner's detached logprobs). An empty `samples` gives a dummy micro-batch of
    one token that contributes exactly zero gradient (lets a rank with less work join the
    collectives of a round)."""
    if not samples:
        empty_f, empty_l = torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return MicroBatch(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                          torch.zeros(1, dtype=torch.long), empty_l, empty_l, empty_f, empty_f, empty_f,
                          None, empty_l, ())
    ids: list[int] = []
    pos: list[int] = []
    seg: list[int] = []
    pred: list[int] = []
    for s_idx, s in enumerate(samples):
        start, p = len(ids), len(s.prompt_token_ids)
        ids.extend(s.prompt_token_ids)
        ids.extend(s.completion_token_ids)
        pos.extend(range(p + len(s.completion_token_ids)))
        seg.extend([s_idx] * (p + len(s.completion_token_ids)))
        # the logits at position (start + p - 1 + k) predict completion token k
        pred.extend(range(start + p - 1, start + p - 1 + len(s.completion_token_ids)))
    seq_lens = torch.tensor([len(s.completion_token_ids) for s in samples], dtype=torch.long)
    old = None
    if logprobs_old is not None:
        old = torch.cat([logprobs_old[s.uid] for s in samples])
    return MicroBatch(
        input_ids=torch.tensor(ids, dtype=torch.long)[None],
        position_ids=torch.tensor(pos, dtype=torch.long)[None],
        segment_ids=torch.tensor(seg, dtype=torch.long),
        pred_index=torch.tensor(pred, dtype=torch.long),
        target_ids=torch.tensor([t for s in samples for t in s.completion_token_ids], dtype=torch.long),
        advantages=torch.repeat_interleave(torch.tensor([s.advantage for s in samples], dtype=torch.float32), seq_lens),
        weights=token_weights(seq_lens, loss_agg),
        logprobs_sampler=torch.tensor([x for s in samples for x in s.logprobs_sampler], dtype=torch.float32),
        logprobs_old=old,
        seq_lens=seq_lens,
        uids=tuple(s.uid for s in samples),
    )
