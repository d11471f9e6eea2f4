"""Length-bucketed packing of samples into token-budget micro-batches, and token-balanced rank splits.

A micro-batch is a (B, L) block of samples (prompt + completion each), RIGHT-padded to its longest
row. Right padding under the causal mask is exact without any attention mask: a real token only
attends to earlier positions of its own row, which are all real, so the model runs with
`is_causal` attention and no (T x T) mask is built. The budget bounds B * L (padding included),
and `pack_by_length` groups samples of similar length so that little of it is padding.

Shared prompts (learner.share_prompts). The G samples of a group share their prompt, and the
forward pass of a prompt token does not depend on what follows it (causal attention). So a
micro-batch runs each distinct prompt head (its first P - 1 tokens) once, as an (N, H) block,
right-padded (exact with no mask, as above), and every row then continues its head's K/V cache:
a row is (last prompt token + completion), right-padded to L, at positions P - 1 .. of its
sample, under a (B, 1, L, H + L) mask that shows it its own head's real tokens and its own
earlier tokens (`shared_suffix_inputs`). Same logits, same gradient (backward flows through the
cache into the head pass), and G times fewer prompt tokens forwarded. `bin_cost` counts what
such a micro-batch holds: the N heads, the B rows, and the rows' copies of the heads' K/V.

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


def bin_cost(samples: Sequence[Sample], share_prompts: bool) -> int:
    """Token budget a micro-batch of `samples` uses: padded_cost of the full rows, or with shared
    prompt heads N H + B L + the rows' cache copies (B H / CACHE_ROWS_PER_TOKEN)."""
    if not share_prompts:
        return padded_cost([s.num_tokens for s in samples])
    head = max([len(s.prompt_token_ids) - 1 for s in samples] + [1])
    rows = len(samples)
    width = max((1 + len(s.completion_token_ids) for s in samples), default=0)
    distinct = len({s.prompt_token_ids for s in samples})
    return distinct * head + rows * width + math.ceil(rows * head / CACHE_ROWS_PER_TOKEN)


def pack_samples(samples: Sequence[Sample], budget: int, share_prompts: bool) -> list[list[int]]:
    """Bins of indices into `samples`, each with bin_cost <= budget (a sample alone always gets a
    bin when its prompt + completion fit the budget). Without sharing: `pack_by_length`. With it,
    the cheaper (total bin_cost, then fewer bins) of two cuts into consecutive runs: samples sorted
    longest completion first (least padding), or a prompt's samples kept together, prompts sorted
    by their longest completion (most sharing; pays when completions of a group have similar
    lengths or prompts are long). Ties keep a prompt's samples together, then input order."""
    if not share_prompts:
        return pack_by_length([s.num_tokens for s in samples], budget)
    check_fits([s.num_tokens for s in samples], budget)
    first_seen: dict[tuple[int, ...], int] = {}
    longest: dict[tuple[int, ...], int] = {}
    for i, s in enumerate(samples):
        first_seen.setdefault(s.prompt_token_ids, i)
        longest[s.prompt_token_ids] = max(longest.get(s.prompt_token_ids, 0), len(s.completion_token_ids))

    def completion(i: int) -> tuple:
        return -len(samples[i].completion_token_ids), first_seen[samples[i].prompt_token_ids], i

    def prompt(i: int) -> tuple:
        p = samples[i].prompt_token_ids
        return -longest[p], first_seen[p], -len(samples[i].completion_token_ids), i

    cuts = [_cut_shared(samples, sorted(range(len(samples)), key=key), budget) for key in (completion, prompt)]
    return min(cuts, key=lambda bins: (sum(bin_cost([samples[i] for i in b], True) for b in bins), len(bins)))


def _cut_shared(samples: Sequence[Sample], order: Sequence[int], budget: int) -> list[list[int]]:
    """`order` cut into consecutive runs, each with bin_cost <= budget (or a single sample)."""
    bins: list[list[int]] = []
    rows = head = width = 0
    prompts: set[tuple[int, ...]] = set()
    for i in order:
        s = samples[i]
        h, w = max(head, len(s.prompt_token_ids) - 1, 1), max(width, 1 + len(s.completion_token_ids))
        n = len(prompts) + (s.prompt_token_ids not in prompts)
        if bins and n * h + (rows + 1) * w + math.ceil((rows + 1) * h / CACHE_ROWS_PER_TOKEN) <= budget:
            bins[-1].append(i)
            rows, head, width = rows + 1, h, w
            prompts.add(s.prompt_token_ids)
        else:
            bins.append([i])
            rows, head, width = 1, max(len(s.prompt_token_ids) - 1, 1), 1 + len(s.completion_token_ids)
            prompts = {s.prompt_token_ids}
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
    """(N, H) long: the distinct prompt heads (each prompt's first P - 1 tokens), right-padded with
    token 0, H >= 1; (0, 0) when prompts are not shared."""
    head_lengths: torch.Tensor
    """(N,) long: real tokens of each prompt head (0 for a one-token prompt)."""
    row_head: torch.Tensor
    """(B,) long: the prompt head (index into prompt_heads) each row continues; empty when not shared."""

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens forwarded: the prompt heads' and the rows'."""
        return int(self.head_lengths.sum()) + int(self.lengths.sum())


def collate(samples: Sequence[Sample], loss_agg: str,
            logprobs_old: Optional[dict[int, torch.Tensor]] = None, share_prompts: bool = False) -> MicroBatch:
    """Pad `samples` into one (B, L) micro-batch, rows in the given order. `logprobs_old` maps
    Sample.uid -> (C,) old logprobs (None = use the learner's detached logprobs). `share_prompts`:
    run the distinct prompt heads once (module docstring). An empty `samples` gives a dummy
    micro-batch of one token (after a one-token head when sharing, so that every pass of a round
    has one shape) that contributes exactly zero gradient (lets a rank with less work join the
    collectives of a round)."""
    no_heads, empty_l = torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    if not samples:
        empty_f = torch.zeros(0)
        heads, head_lengths, row_head = (torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long),
                                         torch.zeros(1, dtype=torch.long)) if share_prompts else (no_heads, empty_l, empty_l)
        return MicroBatch(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), empty_l, empty_l,
                          empty_f, empty_f, empty_f, None, empty_l, (), heads, head_lengths, row_head)
    if share_prompts:
        index: dict[tuple[int, ...], int] = {}
        row_head = [index.setdefault(s.prompt_token_ids, len(index)) for s in samples]
        head_lengths = [len(p) - 1 for p in index]  # every prompt token but the last, which the row runs
        heads = torch.zeros(len(index), max(head_lengths + [1]), dtype=torch.long)
        for p, k in index.items():
            heads[k, :len(p) - 1] = torch.tensor(p[:-1], dtype=torch.long)
        skip = [len(s.prompt_token_ids) - 1 for s in samples]  # prompt tokens each row leaves to its head
    else:
        heads, head_lengths, row_head, skip = no_heads, [], [], [0] * len(samples)
    width = max(s.num_tokens - k for s, k in zip(samples, skip))
    input_ids = torch.zeros(len(samples), width, dtype=torch.long)
    pred: list[int] = []
    for row, (s, k) in enumerate(zip(samples, skip)):
        p, c = len(s.prompt_token_ids) - k, len(s.completion_token_ids)
        input_ids[row, :p + c] = torch.tensor(s.prompt_token_ids[k:] + s.completion_token_ids, dtype=torch.long)
        # the logits at position (p - 1 + k) of the row predict completion token k
        pred.extend(range(row * width + p - 1, row * width + p - 1 + c))
    seq_lens = torch.tensor([len(s.completion_token_ids) for s in samples], dtype=torch.long)
    old = None
    if logprobs_old is not None:
        old = torch.cat([logprobs_old[s.uid] for s in samples])
    return MicroBatch(
        input_ids=input_ids,
        lengths=torch.tensor([s.num_tokens - k for s, k in zip(samples, skip)], dtype=torch.long),
        pred_index=torch.tensor(pred, dtype=torch.long),
        target_ids=torch.tensor([t for s in samples for t in s.completion_token_ids], dtype=torch.long),
        advantages=torch.repeat_interleave(torch.tensor([s.advantage for s in samples], dtype=torch.float32), seq_lens),
        weights=token_weights(seq_lens, loss_agg),
        logprobs_sampler=torch.tensor([x for s in samples for x in s.logprobs_sampler], dtype=torch.float32),
        logprobs_old=old,
        seq_lens=seq_lens,
        uids=tuple(s.uid for s in samples),
        prompt_heads=heads,
        head_lengths=torch.tensor(head_lengths, dtype=torch.long),
        row_head=torch.tensor(row_head, dtype=torch.long),
    )


class SuffixInputs(NamedTuple):
    """What the rows of a shared-prompt micro-batch need besides their tokens."""

    position_ids: torch.Tensor
    """(B, L) long: each row's positions in its sample (its head's length onwards)."""
    attention_mask: torch.Tensor
    """(B, 1, L, H + L) bool, True = attend: the row's own head's real tokens, then its own
    tokens causally (padding of the heads and other rows' heads hidden)."""


def shared_suffix_inputs(mb: MicroBatch) -> SuffixInputs:
    """Positions and mask of `mb`'s rows, which continue the K/V cache of `mb.prompt_heads`."""
    rows, width = mb.input_ids.shape
    head_len = mb.head_lengths[mb.row_head]  # (B,)
    positions = head_len[:, None] + torch.arange(width)[None, :]  # (B, L)
    sees_head = torch.arange(mb.prompt_heads.shape[1])[None, :] < head_len[:, None]  # (B, H)
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (L, L)
    mask = torch.cat([sees_head[:, None, :].expand(rows, width, -1), causal.expand(rows, -1, -1)], dim=2)
    return SuffixInputs(positions, mask[:, None])


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
