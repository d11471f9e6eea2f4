"""Driver-side DASH batching: filter each arriving group, pack kept samples into token-budget
micro-batches, hand them to the ranks in lock-step rounds as they fill (streaming), and take the
optimizer steps of a sampled batch (several steps per batch = preemptive sampling, DASH Sec. 3.1;
several epochs = PPO epochs). Ray-free: it drives any `RankPool` (in-process `LocalRankPool`,
or `learner.actor`'s Ray pool).

Schedule of one sampled batch of N groups (S = N / prompts_per_step steps per epoch, E epochs):
- Groups are assigned to steps in ARRIVAL order (the first prompts_per_step groups form step 0).
- Every rank runs the same number of passes in the same order (ZeRO-2/3 collectives run inside
  forward/backward): a round gives each rank one micro-batch, padded with a one-token dummy whose
  gradient is exactly zero when a rank has nothing left.
- old logprobs: "sampler" -> the engine's; "recompute" with S * E == 1 -> rho = 1 (the detached
  current logprobs ARE the old ones, no extra pass); "recompute" with S * E > 1 -> a no-grad pass
  with the pre-update weights for every sample not already seen by a step-0 backward (whose own
  detached logprobs are kept as its old ones); these stream as groups arrive, and the first
  optimizer step waits for all of them (in `end_batch`).
- Backward of step 0 streams while later groups arrive; a step is taken once its groups are all in.

Tested by:
    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_learner_deepspeed.py
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import torch

from learner.config import LearnerConfig
from learner.ds_engine import MicroResult, RankEngine, StepResult
from learner.filtering import Sample, select_samples
from learner.losses import step_normaliser
from learner.packing import MicroBatch, collate, pack_first_fit_decreasing, split_across_ranks
from rollout_workers.types import ScoredGroup


class RankPool(Protocol):
    """W ranks that run the same call in lock-step. Every call returns one handle per rank, at once
    (fire); `wait` turns handles into results, raising if a rank failed or `timeout` passed."""

    num_ranks: int

    def forward_backward(self, per_rank: Sequence[MicroBatch], boundary: bool, return_logprobs: bool) -> list[Any]: ...
    def old_logprobs(self, per_rank: Sequence[MicroBatch]) -> list[Any]: ...
    def step(self, normaliser: float) -> list[Any]: ...
    def full_gradients(self, normaliser: float) -> list[Any]: ...
    def discard_gradients(self) -> list[Any]: ...
    def wait(self, handles: Sequence[Any]) -> list[Any]: ...


class LocalRankPool:
    """One in-process `RankEngine` (W = 1): calls run immediately; handles are the results."""

    def __init__(self, engine: RankEngine) -> None:
        self.engine = engine
        self.num_ranks = 1

    def forward_backward(self, per_rank: Sequence[MicroBatch], boundary: bool, return_logprobs: bool) -> list[MicroResult]:
        return [self.engine.forward_backward(per_rank[0], boundary, return_logprobs)]

    def old_logprobs(self, per_rank: Sequence[MicroBatch]) -> list[MicroResult]:
        return [self.engine.old_logprobs(per_rank[0])]

    def step(self, normaliser: float) -> list[StepResult]:
        return [self.engine.step(normaliser)]

    def full_gradients(self, normaliser: float) -> list[dict[str, torch.Tensor]]:
        return [self.engine.full_gradients(normaliser)]

    def discard_gradients(self) -> list[None]:
        return [self.engine.discard_gradients()]

    def wait(self, handles: Sequence[Any]) -> list[Any]:
        return list(handles)


@dataclass
class LearnStats:
    """What one sampled batch did (`StreamingBatcher.end_batch`)."""

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
    lr: float = 0.0
    """Learning rate of the last step."""
    samples_in: int = 0
    samples_kept: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    """Tokens (prompt + completion) through backprop passes, all epochs."""
    completion_tokens: int = 0
    """Completion tokens in the loss, all epochs."""
    seconds_forward_backward: float = 0.0
    """Rank-side seconds in backprop passes, summed over ranks."""
    seconds_old_logprobs: float = 0.0
    """Rank-side seconds in no-grad old-logprob passes, summed over ranks."""
    seconds_wall: float = 0.0
    """begin_batch -> end_batch on the driver."""
    refill_needed: int = 0
    """Groups dropped whole by the filter: how many more groups a DAPO-style refill would ask for to keep
    every optimizer batch at prompts_per_step kept groups."""


class StreamingBatcher:
    """The DASH batching logic over a `RankPool` (see the module docstring)."""

    def __init__(self, cfg: LearnerConfig, pool: RankPool, max_new_tokens: int) -> None:
        self.cfg, self.pool, self.max_new_tokens = cfg, pool, max_new_tokens
        self._active = False
        self.batches_done = 0

    # ---- public ---------------------------------------------------------------------------
    @property
    def batch_open(self) -> bool:
        """True between begin_batch and end_batch/abort_batch."""
        return self._active

    @property
    def groups_wanted(self) -> int:
        """Slots of the open batch still empty: with refill, the groups the filter dropped whole
        that the driver should replace by sampling that many more prompts (0 without refill)."""
        return self.num_groups - self.slots if self._active and self.cfg.refill else 0

    def begin_batch(self, num_groups: int) -> None:
        """Announce a sampled batch of `num_groups` groups (a multiple of prompts_per_step)."""
        if self._active:
            raise RuntimeError("begin_batch called while a batch is open (call end_batch first)")
        if num_groups < 1 or num_groups % self.cfg.prompts_per_step:
            raise ValueError(f"a sampled batch needs a positive multiple of prompts_per_step="
                             f"{self.cfg.prompts_per_step} groups, got {num_groups}")
        self._active, self._probe = True, False
        self.num_groups, self.received = num_groups, 0
        self.slots = 0  # groups that occupy a step's slot: all of them, or only kept ones with refill
        self.samples_received = 0
        self.steps_per_epoch = num_groups // self.cfg.prompts_per_step
        self.needs_old = self.cfg.old_logprobs == "recompute" and self.steps_per_epoch * self.cfg.epochs_per_batch > 1
        self.group_size: Optional[int] = None
        self.step_samples: list[list[Sample]] = [[] for _ in range(self.steps_per_epoch)]
        self.step_samples_in = [0] * self.steps_per_epoch
        self.drop_reasons: Counter = Counter()
        self.groups_dropped = 0
        self.current = 0  # step whose backprop is streaming
        self.pool_samples: list[Sample] = []
        self.old_pool: list[Sample] = []
        self.logprobs_old: dict[int, torch.Tensor] = {}
        self.grad_handles: list[Any] = []
        self.old_handles: list[Any] = []
        self.step_handles: list[tuple[float, list[Any]]] = []
        self.step0_flushed = False
        self.empty_steps = 0
        self.gradients: Optional[dict[str, torch.Tensor]] = None
        self.t_begin = time.perf_counter()

    def drop_slots(self, n: int) -> None:
        """`n` announced groups will never arrive (their prompts were refused before sampling, e.g.
        too long for the engine). Without refill the batch shrinks by n and its last step runs
        short; with refill their slots stay empty, so they count in `groups_wanted`."""
        if not self._active:
            raise RuntimeError("drop_slots before begin_batch")
        if not 0 <= n <= self.num_groups - self.slots:
            raise ValueError(f"drop_slots({n}): only {self.num_groups - self.slots} of the {self.num_groups} "
                             "announced groups are still to come")
        if not self.cfg.refill:
            self.num_groups -= n

    def add_groups(self, groups: Sequence[ScoredGroup]) -> None:
        """Filter, route and dispatch; returns without waiting for backprop (handles are tracked)."""
        if not self._active:
            raise RuntimeError("add_groups before begin_batch")
        for g in groups:
            if self.slots >= self.num_groups:
                raise ValueError(f"got more groups than the {self.num_groups} announced by begin_batch "
                                 f"(duplicate or late group {g.prompt.uid!r}, batch_id {g.batch_id})")
            if self.group_size is None:
                self.group_size = len(g.completions)
            elif len(g.completions) != self.group_size:
                raise ValueError(f"group {g.prompt.uid!r} has {len(g.completions)} completions, expected "
                                 f"group_size={self.group_size} (the batch's first group)")
            res = select_samples([g], self.cfg.advantage, self.cfg.filter_threshold, self.cfg.filter,
                                 first_uid=self.received * self.group_size)
            self.received += 1
            self.samples_received += res.samples_in
            self.drop_reasons.update(res.drop_reasons)
            self.groups_dropped += not res.samples
            if self.cfg.refill and not res.samples:
                continue  # DAPO refill: a group dropped whole leaves its slot for a refilled one
            s = self.slots // self.cfg.prompts_per_step
            self.slots += 1
            self.step_samples[s].extend(res.samples)
            self.step_samples_in[s] += res.samples_in
            if self.needs_old:
                (self.pool_samples if s == 0 else self.old_pool).extend(res.samples)
            elif s == self.current:
                self.pool_samples.extend(res.samples)
            self._pump()

    def end_batch(self) -> LearnStats:
        """Run what is left (later steps, epochs), wait for every rank, return the batch's stats."""
        if not self._active:
            raise RuntimeError("end_batch before begin_batch")
        if self.slots < self.num_groups and not self.cfg.refill:
            raise ValueError(f"end_batch after {self.received} of the {self.num_groups} groups announced")
        try:
            # With refill the driver may stop short (learner.refill_rounds): the steps whose slots
            # are not all filled run on the kept groups they have.
            if self.needs_old:
                if not self.step0_flushed:
                    self._flush_step0()
                self._flush_old(force=True)
                for results in self._wait_all(self.old_handles):
                    for r in results:
                        self.logprobs_old.update(r.logprobs)
                if self.cfg.epochs_per_batch > 1:  # step-0 backprops carried their own old logprobs
                    for results in self._wait_all([h for h, _ in self.grad_handles]):
                        for r in results:
                            self.logprobs_old.update(r.logprobs)
                self._fire_step(0)
                for s in range(1, self.steps_per_epoch):
                    if self.step_samples[s]:
                        self._flush_grad(self.step_samples[s], self.logprobs_old)
                    self._fire_step(s)
            else:
                while self.current < self.steps_per_epoch:
                    self._finish_current_step()
            old = self.logprobs_old if self.needs_old else None
            for _ in range(1, self.cfg.epochs_per_batch):
                for s in range(self.steps_per_epoch):
                    if self.step_samples[s]:
                        self._flush_grad(self.step_samples[s], old)
                    self._fire_step(s)
            return self._collect()
        finally:
            self._active = False
            self.batches_done += 1

    def abort_batch(self) -> None:
        """Drop the open batch after an error: wait for its in-flight passes and discard the
        accumulated gradient on every rank (optimizer steps already taken stay)."""
        if not self._active:
            return
        try:
            for handles, _ in self.grad_handles:
                self.pool.wait(handles)
            self.pool.wait(self.pool.discard_gradients())
        finally:
            self._active = False

    def probe_gradients(self, groups: Sequence[ScoredGroup]) -> dict[str, torch.Tensor]:
        """Diagnostics (exactness tests): run the whole filter/pack/backprop path of ONE optimizer
        step over `groups` (len == prompts_per_step, epochs_per_batch == 1) and return the full
        normalised gradient the optimizer would get, by parameter name; then drop it (no step)."""
        if (len(groups) != self.cfg.prompts_per_step and not self.cfg.refill) or self.cfg.epochs_per_batch != 1:
            raise ValueError("probe_gradients needs exactly prompts_per_step groups (with refill: kept groups) "
                             "and epochs_per_batch == 1")
        self.begin_batch(self.cfg.prompts_per_step)
        self._probe = True
        self.add_groups(groups)
        self.end_batch()
        if self.gradients is None:
            raise ValueError("probe_gradients: every sample was filtered out, there is no gradient")
        return self.gradients

    # ---- internals --------------------------------------------------------------------------
    def _full_enough(self, samples: list[Sample]) -> bool:
        return sum(s.num_tokens for s in samples) >= self.pool.num_ranks * self.cfg.micro_batch_tokens

    def _pump(self) -> None:
        budget = self.cfg.micro_batch_tokens
        while self._full_enough(self.pool_samples):
            self.pool_samples = self._fire_full_round(self.pool_samples, budget)
        if self.needs_old:
            if not self.step0_flushed and self.slots >= self.cfg.prompts_per_step:
                self._flush_step0()
            self._flush_old(force=False)
            return
        while self.current < self.steps_per_epoch and self.slots >= (self.current + 1) * self.cfg.prompts_per_step:
            self._finish_current_step()
            while self._full_enough(self.pool_samples):
                self.pool_samples = self._fire_full_round(self.pool_samples, budget)

    def _flush_step0(self) -> None:
        """Backprop the rest of step 0 (its samples are in pool_samples); with several epochs its
        detached logprobs come back as the old ones."""
        if self.step_samples[0]:
            self._flush_grad(self.pool_samples, None, return_logprobs=self.cfg.epochs_per_batch > 1)
        self.pool_samples, self.step0_flushed = [], True

    def _finish_current_step(self) -> None:
        """Backprop what is left of the streaming step, take it, and start streaming the next one."""
        if self.step_samples[self.current]:
            self._flush_grad(self.pool_samples, None)
        self._fire_step(self.current)
        self.current += 1
        self.pool_samples = list(self.step_samples[self.current]) if self.current < self.steps_per_epoch else []

    def _fire_full_round(self, samples: list[Sample], budget: int) -> list[Sample]:
        """Pack `samples`, send the W fullest micro-batches as one round, return the rest."""
        bins = pack_first_fit_decreasing([s.num_tokens for s in samples], budget)
        bins.sort(key=lambda b: -sum(samples[i].num_tokens for i in b))
        chosen = bins[:self.pool.num_ranks]
        batches = [collate([samples[i] for i in b], self.cfg.loss_agg) for b in chosen]
        self.grad_handles.append((self.pool.forward_backward(batches, False, self.needs_old and self.cfg.epochs_per_batch > 1),
                                  len(self.step_handles)))
        used = {i for b in chosen for i in b}
        return [s for i, s in enumerate(samples) if i not in used]

    def _rounds(self, samples: Sequence[Sample], old: Optional[dict[int, torch.Tensor]]) -> list[list[MicroBatch]]:
        """Token-balanced rounds: FFD bins, split across ranks, padded with dummies."""
        bins = pack_first_fit_decreasing([s.num_tokens for s in samples], self.cfg.micro_batch_tokens)
        per_rank = split_across_ranks([sum(samples[i].num_tokens for i in b) for b in bins], self.pool.num_ranks)
        dummy = collate([], self.cfg.loss_agg)
        rounds = []
        for k in range(max((len(r) for r in per_rank), default=0)):
            rounds.append([collate([samples[i] for i in bins[r[k]]], self.cfg.loss_agg, old) if k < len(r) else dummy
                           for r in per_rank])
        return rounds

    def _flush_grad(self, samples: Sequence[Sample], old: Optional[dict[int, torch.Tensor]],
                    return_logprobs: bool = False) -> None:
        """Backprop what is left of a step; the last round is the accumulation boundary (a dummy
        round when nothing is left, so the boundary is never on an already-sent micro-batch)."""
        rounds = self._rounds(samples, old) or [[collate([], self.cfg.loss_agg)] * self.pool.num_ranks]
        for k, batches in enumerate(rounds):
            self.grad_handles.append((self.pool.forward_backward(batches, k == len(rounds) - 1, return_logprobs),
                                      len(self.step_handles)))

    def _flush_old(self, force: bool) -> None:
        budget = self.cfg.micro_batch_tokens
        while self._full_enough(self.old_pool):
            bins = pack_first_fit_decreasing([s.num_tokens for s in self.old_pool], budget)
            bins.sort(key=lambda b: -sum(self.old_pool[i].num_tokens for i in b))
            chosen = bins[:self.pool.num_ranks]
            self.old_handles.append(self.pool.old_logprobs([collate([self.old_pool[i] for i in b], self.cfg.loss_agg)
                                                            for b in chosen]))
            used = {i for b in chosen for i in b}
            self.old_pool = [s for i, s in enumerate(self.old_pool) if i not in used]
        if force:
            for batches in self._rounds(self.old_pool, None):
                self.old_handles.append(self.pool.old_logprobs(batches))
            self.old_pool = []

    def _fire_step(self, s: int) -> None:
        samples = self.step_samples[s]
        if not samples:  # nothing kept: no pass ran, and no optimizer step (Adam would still move)
            self.empty_steps += 1
            self.step_handles.append((0.0, []))
            return
        normaliser = step_normaliser(self.cfg.loss_agg, sum(len(x.completion_token_ids) for x in samples), len(samples),
                                     self.cfg.constant_normalizer or self.max_new_tokens * self.step_samples_in[s])
        if self._probe:
            self.gradients = self.pool.wait(self.pool.full_gradients(normaliser))[0]
            self.pool.wait(self.pool.discard_gradients())
            self.step_handles.append((0.0, []))
            return
        self.step_handles.append((normaliser, self.pool.step(normaliser)))

    def _wait_all(self, handle_lists: Sequence[list[Any]]) -> list[list[Any]]:
        return [self.pool.wait(h) for h in handle_lists]

    def _collect(self) -> LearnStats:
        st = LearnStats(samples_in=self.samples_received, samples_kept=sum(len(x) for x in self.step_samples),
                        drop_reasons=dict(self.drop_reasons), refill_needed=self.groups_dropped,
                        empty_steps=self.empty_steps)
        loss_per_step: dict[int, float] = {}
        clipped = kl = ratio = 0.0
        for handles, step_idx in self.grad_handles:
            for r in self.pool.wait(handles):
                loss_per_step[step_idx] = loss_per_step.get(step_idx, 0.0) + r.loss_sum
                st.completion_tokens += r.tokens
                clipped, kl, ratio = clipped + r.clipped_tokens, kl + r.kl_sum, ratio + r.ratio_sum
                st.seconds_forward_backward += r.seconds
        for handles in self.old_handles:
            st.seconds_old_logprobs += sum(r.seconds for r in self.pool.wait(handles))
        st.tokens = sum(s.num_tokens for x in self.step_samples for s in x) * self.cfg.epochs_per_batch
        losses, norms = [], []
        for idx, (normaliser, handles) in enumerate(self.step_handles):
            if not handles:
                continue
            result: StepResult = self.pool.wait(handles)[0]
            st.lr = result.lr
            if result.skipped:
                st.skipped_nonfinite += 1
                continue
            st.steps += 1
            losses.append(loss_per_step.get(idx, 0.0) / normaliser)
            norms.append(result.grad_norm)
        if losses:
            st.loss, st.grad_norm = sum(losses) / len(losses), sum(norms) / len(norms)
        if st.completion_tokens:
            st.clip_frac, st.kl, st.ratio_mean = clipped / st.completion_tokens, kl / st.completion_tokens, ratio / st.completion_tokens
        st.seconds_wall = time.perf_counter() - self.t_begin
        return st
