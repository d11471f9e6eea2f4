"""Ray side of the learner: one `LearnerRank` actor per data-parallel DeepSpeed rank, and the
driver-side `LearnerGroup` that creates them, streams scored groups to them (via
`learner.batcher.StreamingBatcher`) and checkpoints / exports.

Inside each rank actor, `self.trainer` is the `RankTrainer`, `self.trainer.ds` its DeepSpeedEngine
and `self.trainer.ds.module` the transformers model. A weight-sync sender (launch.actors) reads the
weights through `LearnerRank.named_parameters()` (under ZeRO-3 they are partitioned: the sender
gathers them with `deepspeed.zero.GatheredParameters`).

Every ray.get has a timeout: a dead or stuck rank raises, never hangs.

Tested by:
    PYTHONPATH=$PWD python -m pytest -q tests/test_learner_deepspeed.py
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.config import LearnerConfig
from learner.batcher import LearnStats, StreamingBatcher
from learner.trainer import MicroResult, RankTrainer, StepResult
from learner.packing import MicroBatch
from learner.groups import ScoredGroupLike


CONTROL = "control"
"""The rank actors' concurrency group for calls that must not queue behind passes (`LearnerRank.set_threads`)."""


class LearnerRank:
    """One DeepSpeed data-parallel rank (a Ray actor via `ray.remote(LearnerRank)`). Construction is
    cheap; `setup` joins the process group and builds the trainer (two phases, so rank 0's node
    address and a free port there can be the rendezvous)."""

    def __init__(self, cfg: LearnerConfig, model_path: str, rank: int, world_size: int,
                 sampling_temperature: float = 1.0) -> None:
        self.cfg, self.model_path, self.rank, self.world_size = cfg, model_path, rank, world_size
        self.sampling_temperature = sampling_temperature
        self.trainer: Optional[RankTrainer] = None
        """Built by `setup`; `self.trainer.ds.module` is the transformers model."""
        self.threads = cfg.rank_threads
        """Intra-op torch threads of the next pass (`set_threads` may change it during a batch)."""

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a port free on it now (asked of rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int, timeout_s: float) -> None:
        torch.set_num_threads(self.threads)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.trainer = RankTrainer(self.cfg, self.model_path, self.rank, self.world_size, master_addr,
                                   master_port, timeout_s, self.sampling_temperature)

    def forward_backward(self, mb: MicroBatch, boundary: bool, return_logprobs: bool) -> MicroResult:
        self._take_threads()
        return self.trainer.forward_backward(mb, boundary, return_logprobs)

    def old_logprobs(self, mb: MicroBatch) -> MicroResult:
        self._take_threads()
        return self.trainer.old_logprobs(mb)

    def set_threads(self, threads: int) -> None:
        """Intra-op torch threads from the next pass on. Called in the "control" concurrency group
        (`LearnerGroup.set_threads`), so it lands while passes of a batch are still queued: the
        passes run on the default group's thread, which applies it (torch's thread count belongs
        to the thread that runs the ops)."""
        self.threads = threads

    def _take_threads(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def step(self, normaliser: float) -> StepResult:
        self._take_threads()
        return self.trainer.step(normaliser)

    def full_gradients(self, normaliser: float) -> dict[str, torch.Tensor]:
        return self.trainer.full_gradients(normaliser)

    def discard_gradients(self) -> None:
        self.trainer.discard_gradients()

    def full_weights(self) -> dict[str, torch.Tensor]:
        return self.trainer.full_weights()

    def forward_calls(self) -> int:
        return self.trainer.forward_calls

    def attention(self) -> str:
        """How this rank runs micro-batches (`learner.trainer.attention_kind`)."""
        return self.trainer.attention

    def forward_uids(self) -> set[int]:
        return set(self.trainer.forward_uids)

    def has_reference_model(self) -> bool:
        return self.trainer.ref_model is not None

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        self.trainer.save_checkpoint(path, client_state)

    def load_checkpoint(self, path: str) -> dict:
        return self.trainer.load_checkpoint(path)

    def export_hf(self, path: str) -> None:
        self.trainer.export_hf(path)

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The live parameters of the trained model, by training name, for a weight-sync sender in
        this actor (launch.actors.SyncedLearnerRank); not a remote method: they are not copies, and
        under ZeRO-3 each holds only this rank's partition."""
        return self.trainer.ds.module.named_parameters()


class RayRankPool:
    """`learner.batcher.RankPool` over LearnerRank actors: calls fire at once (ObjectRefs), `wait`
    gets them with the group's timeout."""

    def __init__(self, actors: Sequence[Any], timeout_s: float) -> None:
        self.actors, self.timeout_s, self.num_ranks = list(actors), timeout_s, len(actors)

    @functools.cached_property
    def attention(self) -> str:
        """Rank 0's `LearnerRank.attention` (every rank has the same config and hardware); asked once,
        after the ranks are set up."""
        return self.wait([self.actors[0].attention.remote()])[0]

    def forward_backward(self, per_rank: Sequence[MicroBatch], boundary: bool, return_logprobs: bool) -> list[Any]:
        return [a.forward_backward.remote(mb, boundary, return_logprobs) for a, mb in zip(self.actors, per_rank)]

    def old_logprobs(self, per_rank: Sequence[MicroBatch]) -> list[Any]:
        return [a.old_logprobs.remote(mb) for a, mb in zip(self.actors, per_rank)]

    def step(self, normaliser: float) -> list[Any]:
        return [a.step.remote(normaliser) for a in self.actors]

    def full_gradients(self, normaliser: float) -> list[Any]:
        return [a.full_gradients.remote(normaliser) for a in self.actors]

    def discard_gradients(self) -> list[Any]:
        return [a.discard_gradients.remote() for a in self.actors]

    def wait(self, handles: Sequence[Any]) -> list[Any]:
        try:
            return ray.get(list(handles), timeout=self.timeout_s)
        except GetTimeoutError as e:
            raise TimeoutError(f"learner ranks did not answer within {self.timeout_s} s") from e


class LearnerState(NamedTuple):
    """Driver-side learner state saved next to the DeepSpeed checkpoint."""

    optimizer_steps: int
    """Optimizer steps taken so far (skipped steps not counted)."""
    policy_version: int
    """Weight version: +1 after every sampled batch that took at least one optimizer step."""
    batches_done: int
    """Sampled batches finished (end_batch calls)."""


class LearnerGroup:
    """W LearnerRank actors (W = cfg.num_ranks) behind one streaming interface."""

    def __init__(self, cfg: LearnerConfig, model_path: str, max_new_tokens: int, timeout_s: float,
                 placement_group=None, bundle_offset: int = 0, rank_cls: type = LearnerRank,
                 gpu_fraction: float | None = None, sampling_temperature: float = 1.0,
                 sampler_exact: bool = False) -> None:
        """`rank_cls`: LearnerRank or a subclass adding methods (launch adds the weight-sync sender).
        `sampling_temperature`: the engines' (rollout.temperature); the learner's logprobs are those
        of the distribution the samples were drawn from (`learner.trainer.forward_logprobs`).
        `gpu_fraction`: GPUs per rank actor (default cfg.gpus_per_rank; 0.5 when colocated).
        `sampler_exact`: the engines' logprobs are exact (see `StreamingBatcher`)."""
        self.cfg, self.model_path, self.timeout_s = cfg, model_path, timeout_s
        # "control": set_threads runs beside the passes (the default group runs one call at a time, in order)
        remote_cls = ray.remote(concurrency_groups={CONTROL: 1})(rank_cls)
        self._actors = []
        for r in range(cfg.num_ranks):
            opts: dict[str, Any] = {"num_cpus": cfg.cpus_per_rank,
                                    "num_gpus": cfg.gpus_per_rank if gpu_fraction is None else gpu_fraction}
            if placement_group is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=bundle_offset + r)
            self._actors.append(remote_cls.options(**opts).remote(cfg, model_path, r, cfg.num_ranks,
                                                                     sampling_temperature))
        self._pool = RayRankPool(self._actors, timeout_s)
        try:
            addr, port = self._pool.wait([self._actors[0].rendezvous_address.remote()])[0]
            self._pool.wait([a.setup.remote(addr, port, timeout_s) for a in self._actors])
        except (RayError, TimeoutError):
            self.shutdown()
            raise
        self._batcher = StreamingBatcher(cfg, self._pool, max_new_tokens, sampler_exact)
        self.optimizer_steps = 0
        self.policy_version = 0

    @property
    def rank_actors(self) -> list[Any]:
        """The LearnerRank actor handles, rank order (see the module docstring for what they hold)."""
        return list(self._actors)

    def begin_batch(self, num_groups: int, sampled_version: int | None = None) -> None:
        """Announce a sampled batch of `num_groups` groups: num_groups / prompts_per_step * epochs_per_batch steps,
        learned from the current `policy_version` (group staleness is measured against it), sampled by
        engines holding `sampled_version` (None: the current one)."""
        sampled = self.policy_version if sampled_version is None else sampled_version
        self._batcher.begin_batch(num_groups, self.policy_version, self.policy_version - sampled)

    def drop_slots(self, n: int) -> None:
        """`n` announced groups will never come (refused prompts; see `StreamingBatcher.drop_slots`)."""
        self._batcher.drop_slots(n)

    def add_groups(self, groups: Sequence[ScoredGroupLike]) -> None:
        """Filter, pack and dispatch backprop as micro-batches fill; does not wait for backprop."""
        self._batcher.add_groups(groups)

    @property
    def groups_wanted(self) -> int:
        """With learner.refill: empty slots of the open batch (see `StreamingBatcher.groups_wanted`)."""
        return self._batcher.groups_wanted

    def set_threads(self, threads: int) -> None:
        """Each rank's intra-op torch threads from its next pass on (the driver's per-phase thread
        handover), including passes of the current batch already queued on the ranks. Not waited
        for; safe from another driver thread (train.overlap's prefetch hands over this way)."""
        if threads < 1:
            raise ValueError(f"set_threads needs >= 1 thread, got {threads}")
        for a in self._actors:
            a.set_threads.options(concurrency_group=CONTROL).remote(threads)

    def end_batch(self) -> LearnStats:
        """Run the rest of the batch's steps and wait for every rank."""
        stats = self._batcher.end_batch()
        self.optimizer_steps += stats.steps
        self.policy_version += stats.steps > 0
        return stats

    def abort_batch(self) -> None:
        """Drop the open batch after an error (see `StreamingBatcher.abort_batch`)."""
        self._batcher.abort_batch()

    def probe_gradients(self, groups: Sequence[ScoredGroupLike]) -> dict[str, torch.Tensor]:
        """See `StreamingBatcher.probe_gradients` (diagnostics; takes no optimizer step)."""
        return self._batcher.probe_gradients(groups)

    def forward_calls(self) -> list[int]:
        """Model forward passes per rank so far (dummy passes included)."""
        return self._pool.wait([a.forward_calls.remote() for a in self._actors])

    def forward_uids(self) -> set[int]:
        """Sample uids (of the current/last batch numbering) any rank ran a forward pass on."""
        return set().union(*self._pool.wait([a.forward_uids.remote() for a in self._actors]))

    def has_reference_model(self) -> list[bool]:
        return self._pool.wait([a.has_reference_model.remote() for a in self._actors])

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights by name, from rank 0 (gathered under ZeRO-3)."""
        return self._pool.wait([a.full_weights.remote() for a in self._actors])[0]

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed state (model, optimizer, scheduler, per-rank RNG) + LearnerState at `path`,
        atomically: written under `path`.tmp, then renamed (a crash leaves the old checkpoint)."""
        if self._batcher.batch_open:
            raise RuntimeError("save_checkpoint during an open batch: call end_batch (or abort_batch) first")
        tmp, final = Path(f"{path}.tmp"), Path(path)
        shutil.rmtree(tmp, ignore_errors=True)
        state = LearnerState(self.optimizer_steps, self.policy_version, self._batcher.batches_done)
        self._pool.wait([a.save_checkpoint.remote(str(tmp), state._asdict()) for a in self._actors])
        with open(tmp / "learner_state.json", "w") as f:
            json.dump(state._asdict(), f)
        old = Path(f"{path}.old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str) -> LearnerState:
        """Restore a `save_checkpoint` directory on every rank; returns the saved LearnerState."""
        if self._batcher.batch_open:
            raise RuntimeError("load_checkpoint during an open batch: call end_batch (or abort_batch) first")
        if not (Path(path) / "learner_state.json").exists():
            raise FileNotFoundError(f"{path} is not a learner checkpoint (no learner_state.json)")
        self._pool.wait([a.load_checkpoint.remote(path) for a in self._actors])
        with open(Path(path) / "learner_state.json") as f:
            state = LearnerState(**json.load(f))
        self.optimizer_steps, self.policy_version = state.optimizer_steps, state.policy_version
        self._batcher.batches_done = state.batches_done
        return state

    def export_hf(self, path: str) -> None:
        """Current weights as a transformers model dir (safetensors + tokenizer), atomically."""
        self._pool.wait([a.export_hf.remote(path) for a in self._actors])

    def shutdown(self) -> None:
        """Kill the rank actors (idempotent)."""
        for a in self._actors:
            ray.kill(a)
        self._actors = []
