"""Mirrors vllm/sampling_params.py (0.33): `SamplingParams` (the fields the adapter sets, same
names and defaults) and `RequestOutputKind`."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


# Mirrors vllm/sampling_params.py:208 `class RequestOutputKind(Enum)`.
class RequestOutputKind(Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


# Mirrors vllm/sampling_params.py:271 `class SamplingParams(msgspec.Struct)` (a subset of its
# fields, same names/defaults: n=1, temperature=1.0, top_p=1.0, top_k=0, seed=None,
# max_tokens=16, logprobs=None, output_kind=CUMULATIVE, detokenize=True, skip_special_tokens=True).
@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    detokenize: bool = True
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Same checks (and messages) as the real _verify_args.
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.temperature == 0.0 and self.n > 1:  # _verify_greedy_sampling (sampling_params.py:769)
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
