"""Mirrors vllm/logprobs.py (0.33)."""
from __future__ import annotations

from dataclasses import dataclass


# Mirrors vllm/logprobs.py:13 `class Logprob`; a sample's logprobs are `list[dict[int, Logprob]]`
# (SampleLogprobs, logprobs.py:162), one dict per generated position keyed by token id.
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None
