"""Mirrors vllm/outputs.py (0.33): `WeightVersionSpan`, `CompletionOutput`, `RequestOutput`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tests.fake_vllm.logprobs import Logprob


# Mirrors vllm/outputs.py:50 `class WeightVersionSpan`.
@dataclass
class WeightVersionSpan:
    version: str
    start: int
    end: int


# Mirrors vllm/outputs.py:59 `class CompletionOutput` (same fields and order, minus the
# MoE/LoRA/spec-decode ones the adapter never reads).
@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    weight_versions: list[WeightVersionSpan] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


# Mirrors vllm/outputs.py:137 `class RequestOutput` (constructor args request_id, prompt,
# prompt_token_ids, prompt_logprobs, outputs, finished).
class RequestOutput:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                 prompt_logprobs: Any, outputs: list[CompletionOutput], finished: bool, **kwargs: Any) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished
