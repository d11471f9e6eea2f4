"""DASH batching on the driver: filter each arriving group, pack kept samples into token-budget
micro-batches, send them to the ranks in lock-step rounds as they fill (streaming), and take the
optimizer steps of a sampled batch (several steps per batch = preemptive sampling, DASH Sec. 3.1;
several epochs = PPO epochs). Ray-free: it drives any `RankPool` (in-process `LocalRankPool`, or
`learner.actor`'s Ray pool).

Schedule of one sampled batch of N groups: S = N / prompts_per_step steps per epoch, E epochs,
steps g = 0 .. S*E - 1 in order, step g trains on the samples of slot s = g mod S.
- Groups fill the slots in ARRIVAL order (the first prompts_per_step groups are slot 0).
- Rounds: every rank runs the same number of passes in the same order (ZeRO-2/3 collectives run
  inside forward/backward). A round gives each rank one micro-batch, or a one-token dummy whose
  gradient is exactly zero when a rank has nothing left.
- The current step's backward passes stream: a round goes as soon as W micro-batches are full;
  once the step's groups are all in, the rest goes (its last round is the accumulation boundary)
  and the step is taken. Later steps of the first epoch were sampled with the same weights, so
  their samples simply wait in their slot.
- Old (proximal) logprobs, the PPO ratio's denominator: the policy of the weights the batch began
  with. "sampler" -> the engine's. With S*E == 1 -> rho = 1 (the detached current logprobs ARE the
  old ones: no extra pass). With S*E > 1 a sample of slots 1.. needs them from elsewhere:
  - "auto" with an exact engine (`sampler_exact`), for a batch that `begin_batch` announces as
    sampled by the current weights: the engine's logprobs are the pre-update policy's, so they are
    taken as they are (no pass, and step 0 streams like the others). The same for a stale batch
    (train.overlap) with learner.off_policy="none": PPO's ratio is then the importance ratio to the
    policy that sampled (the behaviour policy), for step 0 too, as learner.old_logprobs="sampler"
    would take it; no proximal policy is needed, so no pass either;
  - otherwise ("recompute", or a stale / inexact group) a no-grad pass with the pre-update weights,
    streamed in rounds like the backward passes as the groups arrive; step 0's samples keep the
    detached logprobs of their own backward pass (asked for only when E > 1). Step 0 is then taken
    in end_batch, once every old logprob is in.
- Staleness: a group sampled more than `max_staleness` versions before the learner's current one is
  dropped before any pass (reason "stale"); the behaviour/proximal gap of the others is corrected by
  `learner.off_policy` (`losses.behaviour_weights`, in the rank's loss).

Tested by:
    PYTHONPATH=$PWD python -m pytest -q tests/test_learner_deepspeed.py
"""
from __future__ import annotations

import functools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from learner.config import LearnerConfig
from learner.filtering import FilterResult, Sample, select_samples
from learner.losses import NO_IS_STATS, effective_sample_size, step_normaliser
from learner.packing import MicroBatch, bin_cost, collate, pack_samples, split_across_ranks
from learner.trainer import MicroResult, RankTrainer, StepResult
from learner.groups import ScoredGroupLike


class RankPool(Protocol):
    """W ranks that run the same call in lock-step. Every call returns one handle per rank, at once
    (fire); `wait` turns handles into results, raising if a rank failed or `timeout` passed."""

    num_ranks: int
    attention: str
    """How the ranks run a micro-batch (`learner.trainer.attention_kind`)."""

    def forward_backward(self, per_rank: Sequence[MicroBatch], boundary: bool, return_logprobs: bool) -> list[Any]: ...
    def old_logprobs(self, per_rank: Sequence[MicroBatch]) -> list[Any]: ...
    def step(self, normaliser: float) -> list[Any]: ...
    def full_gradients(self, normaliser: float) -> list[Any]: ...
    def discard_gradients(self) -> list[Any]: ...
    def wait(self, handles: Sequence[Any]) -> list[Any]: ...


class LocalRankPool:
    """One in-process `RankTrainer` (W = 1): calls run immediately; handles are the results."""

    def __init__(self, trainer: RankTrainer) -> None:
        self.trainer = trainer
        self.num_ranks = 1
        self.attention = trainer.attention

    def forward_backward(self, per_rank: Sequence[MicroBatch], boundary: bool, return_logprobs: bool) -> list[MicroResult]:
        return [self.trainer.forward_backward(per_rank[0], boundary, return_logprobs)]

    def old_logprobs(self, per_rank: Sequence[MicroBatch]) -> list[MicroResult]:
        return [self.trainer.old_logprobs(per_rank[0])]

    def step(self, normaliser: float) -> list[StepResult]:
        return [self.trainer.step(normaliser)]

    def full_gradients(self, normaliser: float) -> list[dict[str, torch.Tensor]]:
        return [self.trainer.full_gradients(normaliser)]

    def discard_gradients(self) -> list[None]:
        return [self.trainer.discard_gradients()]

    def wait(self, handles: Sequence[Any]) -> list[Any]:
        return list(handles)


@dataclass
class LearnStats:
    """What one sampled batch did (`StreamingBatcher.end_batch`). Rank-side seconds are summed over ranks."""

    steps: int = 0
    """Optimizer steps taken (skipped and empty steps not counted)."""
    skipped_nonfinite: int = 0
    """Steps dropped because a loss was NaN/inf on some rank."""
    empty_steps: int = 0
    """Steps with no kept sample (filtered away entirely): no pass, no optimizer step."""
    loss: float = float("nan")
    """Mean over taken steps of the aggregated loss (sum-form loss / step normaliser)."""
    grad_norm: float = float("nan")
    """Mean over taken steps of the normalised gradient's global norm (before clipping)."""
    clip_frac: float = 0.0
    """Fraction of completion tokens whose ratio was clipped."""
    kl: float = 0.0
    """Mean k3 KL per completion token (0 when kl_coef = 0)."""
    ratio_mean: float = 1.0
    """Mean importance ratio rho per completion token."""
    logprob_diff_mean: float = float("nan")
    """Mean |logprob_learner - logprob_sampler| per completion token, learner logprobs taken with the
    pre-update weights (step 0's backward passes and the old-logprob passes); NaN when none ran.
    The learner divides its logits by the sampling temperature, so this is ~0 whenever the
    engines hold the learner's weights and top_p = 1 (nucleus truncation is not modelled)."""
    logprob_ratio_max: float = float("nan")
    """Max over the same tokens of exp(logprob_learner - logprob_sampler); NaN when none ran."""
    staleness: dict[int, int] = field(default_factory=dict)
    """Versions behind the learner -> groups received (dropped ones included)."""
    is_weight_mean: float = float("nan")
    """Mean over loss tokens of the off-policy weight pi_prox / pi_behav (before cap); NaN with no token."""
    is_weight_max: float = float("nan")
    """Max of the same weights."""
    is_capped_fraction: float = 0.0
    """Fraction of loss tokens whose weight exceeded learner.is_cap (truncated by tis, masked by decoupled)."""
    effective_sample_size: float = float("nan")
    """Normalised ESS of the applied weights, (sum a)^2 / (K sum a^2): 1 = no token outweighs another."""
    lr: float = 0.0
    """Learning rate of the last step."""
    samples_in: int = 0
    samples_kept: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    """Tokens (prompt + completion) through backprop passes, all epochs."""
    completion_tokens: int = 0
    """Completion tokens in the loss, all epochs."""
    seconds_forward: float = 0.0
    """Rank-side seconds in the forward pass and loss of backprop passes."""
    seconds_backward: float = 0.0
    """Rank-side seconds in backward passes."""
    seconds_old_logprobs: float = 0.0
    """Rank-side seconds in no-grad old-logprob passes."""
    seconds_optimizer: float = 0.0
    """Rank-side seconds in optimizer steps (normalisation, clipping, AdamW)."""
    seconds_wall: float = 0.0
    """begin_batch -> end_batch on the driver."""
    refill_needed: int = 0
    """Groups dropped whole by the filter: how many more groups a DAPO-style refill would ask for to keep
    every optimizer batch at prompts_per_step kept groups."""


Round = list[list[Sample]]
"""One micro-batch's samples per rank (an empty list = the rank's dummy pass)."""


@dataclass
class _Batch:
    """One sampled batch, from begin_batch to end_batch."""

    num_groups: int
    steps_per_epoch: int
    """S: optimizer steps (slots of prompts_per_step groups) per epoch."""
    total_steps: int
    """S * epochs_per_batch."""
    needs_old: bool
    """The samples of later steps need recomputed old logprobs (a no-grad pass, module docstring)."""
    sampler_is_old: bool
    """learner.old_logprobs="auto" with an exact engine and a batch sampled by the current weights
    (or any batch with learner.off_policy="none"): the engine's logprobs are the old ones."""
    stale: bool
    """Announced as sampled by older weights (train.overlap): with `sampler_is_old`, step 0's
    samples take the engine's logprobs too (their ratio is to the behaviour policy)."""
    policy_version: int
    """The learner's version when the batch began (a group's staleness is this minus its own)."""
    take_step: Callable[[float], list[Any]]
    """Fires the optimizer step with the step's normaliser; returns its handles ([] = no step result)."""
    step_samples: list[list[Sample]]
    """Kept samples per slot."""
    step_samples_in: list[int]
    """Samples before filtering per slot (the constant normaliser counts them)."""
    group_size: Optional[int] = None
    received: int = 0
    """Groups received (dropped ones included)."""
    slots: int = 0
    """Groups holding a slot: all received groups, or with refill only the kept ones."""
    samples_in: int = 0
    groups_dropped: int = 0
    drop_reasons: Counter = field(default_factory=Counter)
    staleness: Counter = field(default_factory=Counter)
    """Versions behind -> groups received."""
    step: int = 0
    """The step whose backward passes stream now (the next one to take)."""
    step_flushed: bool = False
    """The current step's last round (the accumulation boundary) was sent."""
    unsent: list[Sample] = field(default_factory=list)
    """Samples of the current step not sent yet."""
    unsent_old: list[Sample] = field(default_factory=list)
    """Samples of slots 1.. waiting for their no-grad old-logprob pass."""
    logprobs_old: dict[int, torch.Tensor] = field(default_factory=dict)
    """Sample.uid -> (C,) pre-update logprobs: the sampler's of exact groups as they arrive, the
    recomputed ones before step 0 is taken (when needs_old)."""
    grad_passes: list[tuple[list[Any], int]] = field(default_factory=list)
    """(handles of a backprop round, the step it belongs to)."""
    old_passes: list[list[Any]] = field(default_factory=list)
    """Handles of the no-grad rounds."""
    step_results: list[tuple[float, list[Any]]] = field(default_factory=list)
    """(normaliser, handles) per step in order; no handles = no optimizer step."""
    empty_steps: int = 0
    t_begin: float = field(default_factory=time.perf_counter)

    def step_complete(self, prompts_per_step: int) -> bool:
        """All the groups of the current step are in (the first epoch fills slot by slot; a later
        epoch's step needs the whole batch)."""
        needed = (self.step + 1) * prompts_per_step if self.step < self.steps_per_epoch else self.num_groups
        return self.slots >= needed


class StreamingBatcher:
    """The DASH batching logic over a `RankPool` (see the module docstring)."""

    def __init__(self, cfg: LearnerConfig, pool: RankPool, max_new_tokens: int, sampler_exact: bool = False) -> None:
        """`sampler_exact`: the engines' logprobs are their weights' own policy up to float rounding
        (fp32 engine, top_p = 1), so with learner.old_logprobs="auto" a group sampled at the
        learner's current version needs no recomputed old logprobs."""
        self.cfg, self.pool, self.max_new_tokens, self.sampler_exact = cfg, pool, max_new_tokens, sampler_exact
        self._batch: Optional[_Batch] = None
        self._open = False
        self.batches_done = 0

    # ---- public ---------------------------------------------------------------------------
    @functools.cached_property
    def share_prompts(self) -> bool:
        """Micro-batches run shared prompt heads once (`learner.packing`); varlen flash attention runs
        every sample whole. Every micro-batch (dummies too) then has a head pass, so the ranks' passes
        of a round have one shape: ZeRO-3 gathers weights at each forward call and ZeRO-2 reduces
        gradients in the order they complete. Asked of the pool at the first round, not when the
        batcher is built: the ranks may still be starting then."""
        return self.cfg.share_prompts and self.pool.attention == "padded_sdpa"

    @property
    def batch_open(self) -> bool:
        """True between begin_batch and end_batch/abort_batch."""
        return self._open

    @property
    def groups_wanted(self) -> int:
        """Slots of the open batch still empty: with refill, the groups the filter dropped whole
        that the driver should replace by sampling that many more prompts (0 without refill)."""
        b = self._batch
        return b.num_groups - b.slots if self._open and self.cfg.refill else 0

    @property
    def logprobs_old(self) -> dict[int, torch.Tensor]:
        """Sample.uid -> (C,) recomputed old logprobs of the last batch (empty unless it needed them)."""
        return self._batch.logprobs_old if self._batch is not None else {}

    def begin_batch(self, num_groups: int, policy_version: int = 0, staleness: int = 0) -> None:
        """Announce a sampled batch of `num_groups` groups (a multiple of prompts_per_step), to be
        learned by weights of version `policy_version` (what group staleness is measured against),
        sampled by engines `staleness` versions behind (0: synchronous; 1: train.overlap's prefetch).
        The announcement decides, before any group arrives, whether the batch needs recomputed old
        logprobs (learner.old_logprobs="auto")."""
        self._begin(num_groups, self.pool.step, policy_version, staleness)

    def drop_slots(self, n: int) -> None:
        """`n` announced groups will never arrive (their prompts were refused before sampling, e.g.
        too long for the engine). Without refill the batch shrinks by n and its last step runs
        short (end_batch takes every step); with refill their slots stay empty, so they count in
        `groups_wanted`."""
        if not self._open:
            raise RuntimeError("drop_slots before begin_batch")
        b = self._batch
        if not 0 <= n <= b.num_groups - b.slots:
            raise ValueError(f"drop_slots({n}): only {b.num_groups - b.slots} of the {b.num_groups} "
                             "announced groups are still to come")
        if not self.cfg.refill:
            b.num_groups -= n

    def add_groups(self, groups: Sequence[ScoredGroupLike]) -> None:
        """Filter, route and send full rounds; returns without waiting for the ranks."""
        if not self._open:
            raise RuntimeError("add_groups before begin_batch")
        b, per_step = self._batch, self.cfg.prompts_per_step
        for g in groups:
            if b.slots >= b.num_groups:
                raise ValueError(f"got more groups than the {b.num_groups} announced by begin_batch "
                                 f"(duplicate or late group {g.prompt.uid!r}, batch_id {g.batch_id})")
            if b.group_size is None:
                b.group_size = len(g.completions)
            elif len(g.completions) != b.group_size:
                raise ValueError(f"group {g.prompt.uid!r} has {len(g.completions)} completions, expected "
                                 f"group_size={b.group_size} (the batch's first group)")
            stale = b.policy_version - g.policy_version
            b.staleness[stale] += 1
            if stale > self.cfg.max_staleness:  # too far off-policy to correct: costs no pass
                res = FilterResult([], Counter({"stale": b.group_size}), b.group_size)
            else:
                res = select_samples([g], self.cfg.advantage, self.cfg.filter_threshold, self.cfg.filter,
                                     first_uid=b.received * b.group_size)
            b.received += 1
            b.samples_in += res.samples_in
            b.drop_reasons.update(res.drop_reasons)
            b.groups_dropped += not res.samples
            if self.cfg.refill and not res.samples:
                continue  # DAPO refill: a group dropped whole leaves its slot for a refilled one
            slot = b.slots // per_step
            b.slots += 1
            b.step_samples[slot].extend(res.samples)
            b.step_samples_in[slot] += res.samples_in
            exact = b.sampler_is_old and self._sampler_logprobs_are_old(stale)
            if exact:
                b.logprobs_old.update({s.uid: torch.tensor(s.logprobs_sampler) for s in res.samples})
            elif b.sampler_is_old and res.samples and b.total_steps > 1:
                raise ValueError(f"group {g.prompt.uid!r} was sampled {stale} versions behind the learner, in a batch "
                                 "announced as sampled by the current weights (begin_batch staleness=0): its old "
                                 "logprobs cannot be recomputed once the batch's steps have begun")
            if slot == b.step:
                b.unsent.extend(res.samples)
            elif b.needs_old:
                b.unsent_old.extend(res.samples)
        self._advance(at_end=False)

    def end_batch(self) -> LearnStats:
        """Run what is left (later steps, epochs), wait for every rank, return the batch's stats."""
        if not self._open:
            raise RuntimeError("end_batch before begin_batch")
        b = self._batch
        if b.slots < b.num_groups and not self.cfg.refill:
            raise ValueError(f"end_batch after {b.received} of the {b.num_groups} groups announced")
        try:
            # With refill the driver may stop short (learner.refill_rounds): the steps whose slots
            # are not all filled run on the kept groups they have.
            self._advance(at_end=True)
            return self._collect()
        finally:
            self._open = False
            self.batches_done += 1

    def abort_batch(self) -> None:
        """Drop the open batch after an error: wait for its in-flight passes and discard the
        accumulated gradient on every rank (optimizer steps already taken stay)."""
        if not self._open:
            return
        try:
            for handles, _ in self._batch.grad_passes:
                self.pool.wait(handles)
            for handles in self._batch.old_passes:
                self.pool.wait(handles)
            self.pool.wait(self.pool.discard_gradients())
        finally:
            self._open = False

    def probe_gradients(self, groups: Sequence[ScoredGroupLike], staleness: int = 0) -> dict[str, torch.Tensor]:
        """Diagnostics (exactness tests): run the whole filter/pack/backprop path of ONE optimizer
        step over `groups` (len == prompts_per_step, epochs_per_batch == 1), announced as sampled
        `staleness` versions behind (see `begin_batch`), and return the full normalised gradient the
        optimizer would get, by parameter name; then drop it (no step)."""
        if (len(groups) != self.cfg.prompts_per_step and not self.cfg.refill) or self.cfg.epochs_per_batch != 1:
            raise ValueError("probe_gradients needs exactly prompts_per_step groups (with refill: kept groups) "
                             "and epochs_per_batch == 1")
        gradients: dict[str, torch.Tensor] = {}

        def read_and_drop(normaliser: float) -> list[Any]:
            gradients.update(self.pool.wait(self.pool.full_gradients(normaliser))[0])
            self.pool.wait(self.pool.discard_gradients())
            return []

        self._begin(self.cfg.prompts_per_step, read_and_drop, max((g.policy_version for g in groups), default=0), staleness)
        self.add_groups(groups)
        self.end_batch()
        if not gradients:
            raise ValueError("probe_gradients: every sample was filtered out, there is no gradient")
        return gradients

    # ---- internals --------------------------------------------------------------------------
    def _begin(self, num_groups: int, take_step: Callable[[float], list[Any]], policy_version: int,
               staleness: int) -> None:
        if self._open:
            raise RuntimeError("begin_batch called while a batch is open (call end_batch first)")
        if num_groups < 1 or num_groups % self.cfg.prompts_per_step:
            raise ValueError(f"a sampled batch needs a positive multiple of prompts_per_step="
                             f"{self.cfg.prompts_per_step} groups, got {num_groups}")
        per_epoch = num_groups // self.cfg.prompts_per_step
        total = per_epoch * self.cfg.epochs_per_batch
        sampler_is_old = self._sampler_logprobs_are_old(staleness)
        needs_old = total > 1 and self.cfg.old_logprobs != "sampler" and not sampler_is_old
        self._batch = _Batch(num_groups, per_epoch, total, needs_old, sampler_is_old, staleness > 0, policy_version, take_step,
                             [[] for _ in range(per_epoch)], [0] * per_epoch)
        self._open = True

    def _sampler_logprobs_are_old(self, staleness: int) -> bool:
        """learner.old_logprobs="auto": an exact engine's logprobs are the pre-update policy's when it
        sampled `staleness` = 0 versions behind; and with off_policy="none" a stale sample's ratio is
        to its behaviour policy, which they are. Then no old-logprob pass is needed."""
        return (self.cfg.old_logprobs == "auto" and self.sampler_exact
                and (staleness == 0 or self.cfg.off_policy == "none"))

    def _advance(self, at_end: bool) -> None:
        """Send the full rounds waiting, then take every step whose groups are all in (at the end:
        all of them). Step 0 of a batch that needs old logprobs waits for the end."""
        b = self._batch
        b.unsent = self._send_backprop(b.unsent, final=False)
        if b.needs_old:
            b.unsent_old = self._send_old_logprobs(b.unsent_old, final=at_end)
        while b.step < b.total_steps and (at_end or b.step_complete(self.cfg.prompts_per_step)):
            if not b.step_flushed and b.step_samples[b.step % b.steps_per_epoch]:
                self._send_backprop(b.unsent, final=True)
            b.unsent, b.step_flushed = [], True
            if b.needs_old and b.step == 0:
                if not at_end:
                    return
                self._gather_logprobs_old()
            self._take_step()
            b.step += 1
            b.step_flushed = False
            if b.step < b.total_steps:
                b.unsent = self._send_backprop(b.step_samples[b.step % b.steps_per_epoch], final=False)

    def _rounds(self, samples: Sequence[Sample], final: bool) -> tuple[list[Round], list[Sample]]:
        """Cut `samples` into rounds of one micro-batch per rank; returns (rounds, samples left).
        Not final: only full rounds, the W fullest micro-batches each time while W budgets of
        tokens wait. Final: all of them, token-balanced across ranks, short ranks padded with dummies."""
        num_ranks, budget = self.pool.num_ranks, self.cfg.micro_batch_tokens
        rounds: list[Round] = []
        left = list(samples)
        while left and (final or sum(s.num_tokens for s in left) >= num_ranks * budget):
            bins = pack_samples(left, budget, self.share_prompts)
            loads = [bin_cost([left[i] for i in b], self.share_prompts) for b in bins]
            if final:
                per_rank = split_across_ranks(loads, num_ranks)
                rounds.extend([[left[i] for i in bins[r[k]]] if k < len(r) else [] for r in per_rank]
                              for k in range(max(len(r) for r in per_rank)))
                return rounds, []
            chosen = sorted(range(len(bins)), key=lambda j: (-loads[j], j))[:num_ranks]
            rounds.append([[left[i] for i in bins[j]] for j in chosen])
            used = {i for j in chosen for i in bins[j]}
            left = [s for i, s in enumerate(left) if i not in used]
        return rounds, left

    def _send_backprop(self, samples: Sequence[Sample], final: bool) -> list[Sample]:
        """Backprop rounds of the current step; returns the samples not sent. The final call's last
        round is the accumulation boundary (a dummy round when nothing is left, so the boundary is
        never on an already-sent micro-batch)."""
        b = self._batch
        rounds, left = self._rounds(samples, final)
        if final and not rounds:
            rounds = [[[] for _ in range(self.pool.num_ranks)]]
        use_old = b.step > 0 or (b.stale and b.sampler_is_old)
        old = b.logprobs_old if use_old and self.cfg.old_logprobs != "sampler" else None
        # with several epochs, step 0's own detached logprobs are its samples' old logprobs later
        want_logprobs = b.needs_old and b.step == 0 and self.cfg.epochs_per_batch > 1
        for k, per_rank in enumerate(rounds):
            batches = [collate(x, self.cfg.loss_agg, old, self.share_prompts) for x in per_rank]
            b.grad_passes.append((self.pool.forward_backward(batches, final and k == len(rounds) - 1, want_logprobs),
                                  b.step))
        return left

    def _send_old_logprobs(self, samples: Sequence[Sample], final: bool) -> list[Sample]:
        """No-grad old-logprob rounds; returns the samples not sent."""
        rounds, left = self._rounds(samples, final)
        for per_rank in rounds:
            self._batch.old_passes.append(self.pool.old_logprobs([collate(x, self.cfg.loss_agg, None, self.share_prompts)
                                                                   for x in per_rank]))
        return left

    def _gather_logprobs_old(self) -> None:
        b = self._batch
        for handles in b.old_passes:
            for r in self.pool.wait(handles):
                b.logprobs_old.update(r.logprobs)
        for handles, step in b.grad_passes:
            if step == 0 and self.cfg.epochs_per_batch > 1:
                for r in self.pool.wait(handles):
                    b.logprobs_old.update(r.logprobs)

    def _take_step(self) -> None:
        b = self._batch
        slot = b.step % b.steps_per_epoch
        samples = b.step_samples[slot]
        if not samples:  # nothing kept: no pass ran, and no optimizer step (Adam would still move)
            b.empty_steps += 1
            b.step_results.append((0.0, []))
            return
        normaliser = step_normaliser(self.cfg.loss_agg, sum(len(x.completion_token_ids) for x in samples), len(samples),
                                     self.cfg.constant_normalizer or self.max_new_tokens * b.step_samples_in[slot])
        b.step_results.append((normaliser, b.take_step(normaliser)))

    def _collect(self) -> LearnStats:
        b = self._batch
        st = LearnStats(samples_in=b.samples_in, samples_kept=sum(len(x) for x in b.step_samples),
                        drop_reasons=dict(b.drop_reasons), refill_needed=b.groups_dropped, empty_steps=b.empty_steps,
                        staleness=dict(sorted(b.staleness.items())))
        iw = NO_IS_STATS
        loss_per_step: dict[int, float] = {}
        clipped = kl = ratio = diff = 0.0
        diff_tokens, ratio_max = 0, 0.0

        def add_mismatch(r: MicroResult) -> None:  # passes run with the weights that sampled the batch
            nonlocal diff, diff_tokens, ratio_max
            diff, diff_tokens = diff + r.mismatch.abs_diff_sum, diff_tokens + r.mismatch.num_tokens
            ratio_max = max(ratio_max, r.mismatch.ratio_max)

        for handles, step in b.grad_passes:
            for r in self.pool.wait(handles):
                loss_per_step[step] = loss_per_step.get(step, 0.0) + r.loss_sum
                st.completion_tokens += r.tokens
                clipped, kl, ratio = clipped + r.clipped_tokens, kl + r.kl_sum, ratio + r.ratio_sum
                iw = iw.plus(r.is_stats)
                st.seconds_forward += r.seconds_forward
                st.seconds_backward += r.seconds_backward
                if step == 0:
                    add_mismatch(r)
        for handles in b.old_passes:
            for r in self.pool.wait(handles):
                st.seconds_old_logprobs += r.seconds_forward
                add_mismatch(r)
        st.tokens = sum(s.num_tokens for x in b.step_samples for s in x) * self.cfg.epochs_per_batch
        losses, norms = [], []
        for step, (normaliser, handles) in enumerate(b.step_results):
            if not handles:
                continue
            results: list[StepResult] = self.pool.wait(handles)
            st.seconds_optimizer += sum(r.seconds for r in results)
            st.lr = results[0].lr
            if results[0].skipped:
                st.skipped_nonfinite += 1
                continue
            st.steps += 1
            losses.append(loss_per_step.get(step, 0.0) / normaliser)
            norms.append(results[0].grad_norm)
        if losses:
            st.loss, st.grad_norm = sum(losses) / len(losses), sum(norms) / len(norms)
        if st.completion_tokens:
            st.clip_frac, st.kl, st.ratio_mean = clipped / st.completion_tokens, kl / st.completion_tokens, ratio / st.completion_tokens
        if iw.num_tokens:
            st.is_weight_mean, st.is_weight_max = iw.raw_sum / iw.num_tokens, iw.raw_max
            st.is_capped_fraction = iw.capped / iw.num_tokens
            st.effective_sample_size = effective_sample_size(iw.applied_sum, iw.applied_sq_sum, iw.num_tokens)
        if diff_tokens:
            st.logprob_diff_mean, st.logprob_ratio_max = diff / diff_tokens, ratio_max
        st.seconds_wall = time.perf_counter() - b.t_begin
        return st
