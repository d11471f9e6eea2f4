"""Mirrors vllm/inputs/llm.py:111 `class TokensPrompt(TypedDict)`."""
from __future__ import annotations

from typing import TypedDict

from typing_extensions import NotRequired


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]
