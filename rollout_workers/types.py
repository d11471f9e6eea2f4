"""Typed records that cross actor boundaries: prompts in, scored groups out.

The driver (`launch.data`) builds the prompts and the workers emit the groups; the learner
imports nothing of this package: it reads the groups through the Protocols of `learner.groups`,
which these records satisfy (imports flow launch -> rollout_workers / learner / weight_sync).

    PYTHONPATH=$PWD python -m pytest -q tests/test_worker.py tests/test_imports.py
"""
from __future__ import annotations

from dataclasses import dataclass

OVER_MAX_PROMPT_TOKENS = "over_max_prompt_tokens"
"""Why a prompt is dropped at load time (`launch.data.model_prompts.drop_long_prompts`) or refused
by a worker: more tokens than rollout.max_prompt_tokens."""


@dataclass(frozen=True)
class Prompt:
    """One problem from a prompt source."""

    uid: str
    """Stable id inside its source, e.g. "gsm8k-test-17" or "synthetic-train-3-42"."""
    text: str
    """The prompt exactly as the model sees it (template already applied)."""
    gold: str
    """The gold final answer (e.g. "579", "\\frac{1}{2}")."""
    solution: str = ""
    """A worked solution ending in `\\boxed{gold}` (synthetic "chain" problems), the SFT warm-up's
    target; empty = the target is the boxed gold answer alone."""
    token_ids: tuple[int, ...] | None = None
    """`text` as the policy's tokenizer encodes it (`rollout_workers.engines.base.prompt_token_ids`,
    the engines' own call), set when the driver loads the prompt so that it is tokenized once: the
    worker's length check and the engine reuse these ids. None = not tokenized yet (prompts built
    by hand); the worker tokenizes it then. (P,)"""


@dataclass(frozen=True)
class Completion:
    """One sampled completion of a prompt."""

    token_ids: tuple[int, ...]
    """Sampled token ids, EOS included when the engine stopped on it. (T,)"""
    logprobs_sampler: tuple[float, ...]
    """Log-probability of each sampled token under the sampling distribution. (T,)"""
    finish_reason: str
    """"stop" (EOS / stop string) or "length" (hit max_new_tokens)."""
    text: str
    """Decoded completion text (what the reward function reads)."""


@dataclass(frozen=True)
class ScoredGroup:
    """The G completions of one prompt, scored. The unit streamed from workers to the learner."""

    prompt: Prompt
    """The problem that was sampled."""
    prompt_token_ids: tuple[int, ...]
    """Token ids of `prompt.text` as the engine tokenized it. (P,)"""
    completions: tuple[Completion, ...]
    """G completions. (G,)"""
    rewards: tuple[float, ...]
    """Reward of each completion. (G,)"""
    policy_version: int
    """Weight version of the engine that sampled this group (for staleness)."""
    batch_id: int
    """Id of the sampling request (iteration) this group answers; lets the driver detect duplicates."""
    advantages: tuple[float, ...] | None = None
    """Optional precomputed per-completion advantages (G,); None lets the learner compute them."""
    worker: str = ""
    """Name of the rollout worker that produced it (diagnostics only)."""
    score_seconds: float = 0.0
    """Wall seconds the worker spent scoring these G completions (the driver's "score" phase)."""
