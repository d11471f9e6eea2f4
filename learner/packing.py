"""Length-bucketed packing of samples into token-budget micro-batches, and token-balanced rank splits.

A micro-batch is a (B, L) block of samples (prompt + completion each), RIGHT-padded to its longest
row. Right padding under the causal mask is exact without any attention mask: a real token only
attends to earlier positions of its own row, which are all real, so the model runs with
`is_causal` attention and no (T x T) mask is built. The budget bounds B * L (padding included),
and `pack_by_length` groups samples of similar length so that little of it is padding.

Shared prompts (learner.share_prompts). The G samples of a group share their prompt, and the
forward pass of a prompt token does not depend on what follows it (causal attention), so a
micro-batch whose prompts all have P tokens can run each distinct prompt head (its first P - 1
tokens) once, as an (N, P - 1) block whose K/V cache every row then continues: the rows are
(last prompt token + completion), right-padded as above. Same logits, same gradient (backward
flows through the cache into the shared prompt pass), and ~G times fewer prompt tokens forwarded.
`pack_samples` buckets samples by prompt length for this and `bin_cost` counts what such a
micro-batch holds: the N prompt heads, the B rows, and the rows' copies of the prompt K/V.

The same micro-batch converts to one padding-free row (`varlen_inputs`: concatenated samples,
position ids restarting at 0) for varlen flash attention on GPUs.

Pure tensor math, no Ray/DeepSpeed. Tested by:
    PYTHONPATH=$PWD python -m pytest -q tests/test_learner_math.py
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

from learner.filtering import Sample
from learner.losses import token_weights


def padded_cost(lengths: Sequence[int]) -> int:
    """Tokens a right-padded block of rows of these lengths occupies: rows x longest row."""
    return len(lengths) * max(lengths, default=0)


def check_fits(lengths: Sequence[int], budget: int) -> None:
    """A clear error naming the sample and the budget when a sample alone is over the budget."""
    if budget < 1:
        raise ValueError(f"micro-batch token budget must be >= 1, got {budget}")
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens (prompt + completion), more than the micro-batch "
                             f"budget micro_batch_tokens={budget}")


def pack_by_length(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each with padded_cost <= budget: samples sorted longest first
    (ties keep input order, so the result is deterministic) and cut into consecutive runs, so each
    bin holds samples of similar length. A length > budget raises naming both."""
    check_fits(lengths, budget)
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        # sorted longest first: a bin's first sample is its longest row
        if bins and (len(bins[-1]) + 1) * lengths[bins[-1][0]] <= budget:
            bins[-1].append(i)
        else:
            bins.append([i])
    return bins


CACHE_ROWS_PER_TOKEN = 8
"""A row's copy of one shared prompt token's K/V costs this many times less memory than a token's
activations: 2 x 2h bytes (keys and values, before and after the row's own tokens join them) of
the 34h bytes per token per layer that `learner.memory` counts (Korthikanti et al. 2022, Eq. 2)."""


def can_share_prompts(samples: Sequence[Sample]) -> bool:
    """Whether `samples` can run with shared prompt heads: their prompts all have the same length
    P >= 2 (`pack_samples` bins have one prompt length)."""
    lengths = {len(s.prompt_token_ids) for s in samples}
    return len(lengths) == 1 and min(lengths) >= 2


def bin_cost(samples: Sequence[Sample], share_prompts: bool) -> int:
    """Token budget a micro-batch of `samples` uses: padded_cost of the full rows, or with shared
    prompt heads N (P - 1) + B L + the rows' cache copies (B (P - 1) / CACHE_ROWS_PER_TOKEN)."""
    if not (share_prompts and can_share_prompts(samples)):
        return padded_cost([s.num_tokens for s in samples])
    head = len(samples[0].prompt_token_ids) - 1
    rows = len(samples)
    width = max(1 + len(s.completion_token_ids) for s in samples)
    distinct = len({s.prompt_token_ids for s in samples})
    return distinct * head + rows * width + math.ceil(rows * head / CACHE_ROWS_PER_TOKEN)


def pack_samples(samples: Sequence[Sample], budget: int, share_prompts: bool) -> list[list[int]]:
    """Bins of indices into `samples`, each with bin_cost <= budget (a sample alone always fits when
    its prompt + completion do). Without sharing: `pack_by_length`. With it: samples bucketed by
    prompt length (in order of first appearance), each bucket sorted longest completion first
    (ties: a prompt's samples together, then input order) and cut into consecutive runs."""
    if not share_prompts:
        return pack_by_length([s.num_tokens for s in samples], budget)
    check_fits([s.num_tokens for s in samples], budget)
    first_seen: dict[tuple[int, ...], int] = {}
    buckets: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        first_seen.setdefault(s.prompt_token_ids, i)
        buckets.setdefault(len(s.prompt_token_ids), []).append(i)
    bins: list[list[int]] = []
    for members in buckets.values():
        members.sort(key=lambda i: (-len(samples[i].completion_token_ids), first_seen[samples[i].prompt_token_ids], i))
        current: list[int] = []
        for i in members:
            if current and bin_cost([samples[j] for j in current + [i]], True) > budget:
                bins.append(current)
                current = []
            current.append(i)
        bins.append(current)
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
    """B samples, right-padded to L tokens, after N shared prompt heads of H tokens (N = H = 0 when
    prompts are not shared). K = completion tokens in it. Empty (dummy) when K = 0."""

    input_ids: torch.Tensor
    """(B, L) long: each sample's tokens after its shared prompt head (the whole prompt + completion
    when H = 0, else the last prompt token + completion), right-padded with token 0."""
    lengths: torch.Tensor
    """(B,) long: real tokens of each row (the rest of the row is padding)."""
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
    prompt_heads: torch.Tensor
    """(N, H) long: the distinct shared prompt heads (each prompt's first H = P - 1 tokens); (0, 0)
    when prompts are not shared."""
    row_head: torch.Tensor
    """(B,) long: the prompt head (index into prompt_heads) each row continues; empty when not shared."""

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens forwarded: the prompt heads' and the rows'."""
        return self.prompt_heads.numel() + int(self.lengths.sum())


def collate(samples: Sequence[Sample], loss_agg: str,
            logprobs_old: Optional[dict[int, torch.Tensor]] = None, share_prompts: bool = False) -> MicroBatch:
    """Pad `samples` into one (B, L) micro-batch, rows in the given order. `logprobs_old` maps
    Sample.uid -> (C,) old logprobs (None = use the learner's detached logprobs). `share_prompts`:
    run the distinct prompt heads once (module docstring); needs `can_share_prompts(samples)`. An
    empty `samples` gives a dummy micro-batch of one token (after a one-token head when sharing, so
    its passes have the shape of its round's others) that contributes exactly zero gradient (lets a
    rank with less work join the collectives of a round)."""
    no_heads = torch.zeros(0, 0, dtype=torch.long)
    if not samples:
        empty_f, empty_l = torch.zeros(0), torch.zeros(0, dtype=torch.long)
        heads, row_head = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)) if share_prompts \
            else (no_heads, empty_l)
        return MicroBatch(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), empty_l, empty_l,
                          empty_f, empty_f, empty_f, None, empty_l, (), heads, row_head)
    if share_prompts and not can_share_prompts(samples):
        raise ValueError("collate(share_prompts=True) needs prompts of one length >= 2 (pack_samples bins by prompt length)")
    head = len(samples[0].prompt_token_ids) - 1 if share_prompts else 0
    heads: dict[tuple[int, ...], int] = {}
    row_head = [heads.setdefault(s.prompt_token_ids[:head], len(heads)) for s in samples] if head else []
    width = max(s.num_tokens for s in samples) - head
    input_ids = torch.zeros(len(samples), width, dtype=torch.long)
    pred: list[int] = []
    for row, s in enumerate(samples):
        p, c = len(s.prompt_token_ids) - head, len(s.completion_token_ids)
        input_ids[row, :p + c] = torch.tensor(s.prompt_token_ids[head:] + s.completion_token_ids, dtype=torch.long)
        # the logits at position (p - 1 + k) of the row predict completion token k
        pred.extend(range(row * width + p - 1, row * width + p - 1 + c))
    seq_lens = torch.tensor([len(s.completion_token_ids) for s in samples], dtype=torch.long)
    old = None
    if logprobs_old is not None:
        old = torch.cat([logprobs_old[s.uid] for s in samples])
    return MicroBatch(
        input_ids=input_ids,
        lengths=torch.tensor([s.num_tokens - head for s in samples], dtype=torch.long),
        pred_index=torch.tensor(pred, dtype=torch.long),
        target_ids=torch.tensor([t for s in samples for t in s.completion_token_ids], dtype=torch.long),
        advantages=torch.repeat_interleave(torch.tensor([s.advantage for s in samples], dtype=torch.float32), seq_lens),
        weights=token_weights(seq_lens, loss_agg),
        logprobs_sampler=torch.tensor([x for s in samples for x in s.logprobs_sampler], dtype=torch.float32),
        logprobs_old=old,
        seq_lens=seq_lens,
        uids=tuple(s.uid for s in samples),
        prompt_heads=torch.tensor(list(heads), dtype=torch.long) if head else no_heads,
        row_head=torch.tensor(row_head, dtype=torch.long),
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
    """Drop the padding of `mb`: same tokens, same predicted positions, one row. `mb` must not share
    prompt heads (varlen attention runs each sample whole)."""
    if mb.prompt_heads.numel():
        raise ValueError("varlen_inputs needs a micro-batch without shared prompt heads (collate share_prompts=False)")
    width = mb.input_ids.shape[1]
    positions = torch.arange(width)
    real = positions[None, :] < mb.lengths[:, None]  # (B, L)
    packed_index = torch.full((real.numel(),), -1, dtype=torch.long)
    packed_index[real.flatten()] = torch.arange(int(real.sum()))
    return VarlenInputs(mb.input_ids[real][None], positions.expand_as(real)[real][None], packed_index[mb.pred_index])
