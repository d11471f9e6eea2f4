"""What the learner reads from a scored group: structural types (Protocols), so that the learner
imports nothing of the rollout workers. `rollout_workers.types.ScoredGroup` satisfies them (checked
by tests/test_learner_math.py::test_scored_group_satisfies_the_learner_protocol); any record with these
read-only attributes does.

Tested by:
    PYTHONPATH=$PWD python -m pytest -q tests/test_imports.py tests/test_learner_math.py
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence


class PromptLike(Protocol):
    @property
    def uid(self) -> str:
        """Stable id of the problem (error messages only)."""


class CompletionLike(Protocol):
    @property
    def token_ids(self) -> Sequence[int]:
        """Sampled token ids. (T,)"""

    @property
    def logprobs_sampler(self) -> Sequence[float]:
        """Logprob of each sampled token under the behaviour policy (the engine that sampled it). (T,)"""


class ScoredGroupLike(Protocol):
    """The G completions of one prompt, scored: the unit the learner filters and learns from."""

    @property
    def prompt(self) -> PromptLike: ...

    @property
    def prompt_token_ids(self) -> Sequence[int]:
        """(P,)"""

    @property
    def completions(self) -> Sequence[CompletionLike]:
        """(G,)"""

    @property
    def rewards(self) -> Sequence[float]:
        """(G,)"""

    @property
    def advantages(self) -> Optional[Sequence[float]]:
        """(G,) precomputed, or None (the learner computes them)."""

    @property
    def policy_version(self) -> int:
        """Weight version of the engine that sampled the group (staleness = learner's - this)."""

    @property
    def batch_id(self) -> int:
        """Sampling request the group answers (error messages only)."""
