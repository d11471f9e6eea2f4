"""Length-bucketed packing of samples into token-budget micro-batches, and token-balanced rank splits.

A micro-batch is a (B, L) block of samples (prompt + completion each), RIGHT-padded to its longest
row. Right padding under the causal mask is exact without any attention mask: a real token only
attends to earlier positions of its own row, which are all real, so the model runs with
`is_causal` attention and no (T x T) mask is built. The budget bounds B * L (padding included),
and `pack_by_length` groups samples of similar length so that little of it is padding.

The same micro-batch converts to one padding-free row (`varlen_inputs`: concatenated samples,
position ids restarting at 0) for varlen flash attention on GPUs.

Pure tensor math, no Ray/DeepSpeed. Tested by:
    PYTHONPATH=$PWD python -m pytest -q tests/test_learner_math.py
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from learner.filtering import Sample
from learner.losses import token_weights


def padded_cost(lengths: Sequence[int]) -> int:
    """Tokens a right-padded block of rows of these lengths occupies: rows x longest row."""
    return len(lengths) * max(lengths, default=0)


def pack_by_length(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each with padded_cost <= budget: samples sorted longest first
    (ties keep input order, so the result is deterministic) and cut into consecutive runs, so each
    bin holds samples of similar length. A length > budget raises naming both."""
    if budget < 1:
        raise ValueError(f"micro-batch token budget must be >= 1, got {budget}")
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens (prompt + completion), more than the micro-batch "
                             f"budget micro_batch_tokens={budget}")
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        # sorted longest first: a bin's first sample is its longest row
        if bins and (len(bins[-1]) + 1) * lengths[bins[-1][0]] <= budget:
            bins[-1].append(i)
        else:
            bins.append([i])
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
    """B samples, right-padded to L tokens. K = completion tokens in it. Empty (dummy) when K = 0."""

    input_ids: torch.Tensor
    """(B, L) long: prompt + completion of each sample, right-padded with token 0."""
    lengths: torch.Tensor
    """(B,) long: prompt + completion tokens of each row (the rest of the row is padding)."""
    pred_index: torch.Tensor
    """(K,) long: flat indices into the B * L positions whose logits predict a completion token."""
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
    """(B,) long: completion tokens per sample."""
    uids: tuple[int, ...]
    """(B,) Sample.uid of each sample, in row order."""

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens."""
        return int(self.lengths.sum())


def collate(samples: Sequence[Sample], loss_agg: str,
            logprobs_old: Optional[dict[int, torch.Tensor]] = None) -> MicroBatch:
    """Pad `samples` into one (B, L) micro-batch, rows in the given order. `logprobs_old` maps
    Sample.uid -> (C,) old logprobs (None = use the learner's detached logprobs). An empty `samples`
    gives a dummy micro-batch of one token that contributes exactly zero gradient (lets a rank with
    less work join the collectives of a round)."""
    if not samples:
        empty_f, empty_l = torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return MicroBatch(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), empty_l, empty_l,
                          empty_f, empty_f, empty_f, None, empty_l, ())
    width = max(s.num_tokens for s in samples)
    input_ids = torch.zeros(len(samples), width, dtype=torch.long)
    pred: list[int] = []
    for row, s in enumerate(samples):
        p, c = len(s.prompt_token_ids), len(s.completion_token_ids)
        input_ids[row, :p + c] = torch.tensor(s.prompt_token_ids + s.completion_token_ids, dtype=torch.long)
        # the logits at position (p - 1 + k) of the row predict completion token k
        pred.extend(range(row * width + p - 1, row * width + p - 1 + c))
    seq_lens = torch.tensor([len(s.completion_token_ids) for s in samples], dtype=torch.long)
    old = None
    if logprobs_old is not None:
        old = torch.cat([logprobs_old[s.uid] for s in samples])
    return MicroBatch(
        input_ids=input_ids,
        lengths=torch.tensor([s.num_tokens for s in samples], dtype=torch.long),
        pred_index=torch.tensor(pred, dtype=torch.long),
        target_ids=torch.tensor([t for s in samples for t in s.completion_token_ids], dtype=torch.long),
        advantages=torch.repeat_interleave(torch.tensor([s.advantage for s in samples], dtype=torch.float32), seq_lens),
        weights=token_weights(seq_lens, loss_agg),
        logprobs_sampler=torch.tensor([x for s in samples for x in s.logprobs_sampler], dtype=torch.float32),
        logprobs_old=old,
        seq_lens=seq_lens,
        uids=tuple(s.uid for s in samples),
    )


class VarlenInputs(NamedTuple):
    """A micro-batch as one padding-free row, T = its real tokens (for varlen flash attention)."""

    input_ids: torch.Tensor
    """(1, T) long: the rows' real tokens, concatenated."""
    position_ids: torch.Tensor
    """(1, T) long: restarts at 0 for each sample (how transformers finds the sequence boundaries)."""
    pred_index: torch.Tensor
    """(K,) long: positions of the row whose logits predict a completion token."""


def varlen_inputs(mb: MicroBatch) -> VarlenInputs:
    """Drop the padding of `mb`: same tokens, same predicted positions, one row."""
    width = mb.input_ids.shape[1]
    positions = torch.arange(width)
    real = positions[None, :] < mb.lengths[:, None]  # (B, L)
    packed_index = torch.full((real.numel(),), -1, dtype=torch.long)
    packed_index[real.flatten()] = torch.arange(int(real.sum()))
    return VarlenInputs(mb.input_ids[real][None], positions.expand_as(real)[real][None], packed_index[mb.pred_index])
