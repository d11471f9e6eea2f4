"""Prompts as the policy sees them: its chat template, its token ids, and the load-time length
filter. Each prompt is tokenized once, here, with the engines' own call
(`rollout_workers.engines.base.prompt_token_ids`); the ids travel on `Prompt.token_ids`, so the
rollout worker checks the length and the engine samples without tokenizing again.

    PYTHONPATH=$PWD python -m pytest -q tests/test_prompts.py tests/test_engines.py -k "token_ids or long_prompts"
"""
from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import replace

from launch.data.sources import LoadResult
from launch.data.templates import chat_prompts, plain_prompts, use_chat_template
from rollout_workers.engines.base import prompt_token_ids
from rollout_workers.types import OVER_MAX_PROMPT_TOKENS, Prompt


def prompts_for_model(prompts: Sequence[Prompt], model_path: str, chat_template: str,
                      answer_format: str) -> list[Prompt]:
    """`prompts` as the model at `model_path` should see them: chats when `use_chat_template` says
    so (its tokenizer decides under "auto"), else plain texts asking for `answer_format`
    (`plain_prompts`); each with its token ids (`with_token_ids`, the model's tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if use_chat_template(chat_template, tokenizer):
        prompts = chat_prompts(prompts, tokenizer, answer_format)
    else:
        prompts = plain_prompts(prompts, answer_format)
    return with_token_ids(prompts, tokenizer)


def with_token_ids(prompts: Sequence[Prompt], tokenizer) -> list[Prompt]:
    """`prompts` carrying their token ids under `tokenizer`, which must be the policy's: the
    engines use carried ids as they are."""
    return [replace(p, token_ids=tuple(prompt_token_ids(tokenizer, p.text))) for p in prompts]


def drop_long_prompts(result: LoadResult, max_tokens: int) -> LoadResult:
    """`result` without the prompts longer than `max_tokens` tokens; they are added to `skipped`
    under OVER_MAX_PROMPT_TOKENS. A prompt's length is that of its carried token ids
    (`prompts_for_model` attaches them: nothing is tokenized here). Run at load time so that the
    rollout workers' own length check (a second line) refuses nothing in a normal run."""
    missing = [p.uid for p in result.prompts if p.token_ids is None]
    if missing:
        raise ValueError(f"drop_long_prompts needs prompts with token ids (prompts_for_model); {len(missing)} "
                         f"have none, e.g. {missing[0]!r}")
    kept = [p for p in result.prompts if len(p.token_ids) <= max_tokens]
    skipped = collections.Counter(result.skipped)
    if len(kept) < len(result.prompts):
        skipped[OVER_MAX_PROMPT_TOKENS] += len(result.prompts) - len(kept)
    return LoadResult(kept, skipped)
