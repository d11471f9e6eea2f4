"""Prompt templates, chat templates and the SFT warm-up's target.

    PYTHONPATH=$PWD python -m pytest -q tests/test_prompts.py tests/test_smollm2.py

Synthetic problems use `TINY_TEMPLATE` (`"Q: {question}\\nA:"`, the format the tiny model's
tokenizer is trained on); GSM8K and MATH load with `REASONING_TEMPLATE`, the problem followed by
"Please reason step by step, and put your final answer within \\boxed{}." (the Qwen2.5-Math prompt).
Plain prompts (`plain_prompts`, no chat template): the driver swaps that instruction for
`REASONING_INSTRUCTIONS[rollout.answer_format]`, so a model that obeys its prompt writes the answer
where the reward reads it (`#### N` for "gsm8k", which ignores `\\boxed{}`).
Chat template (`chat_prompts`, `data.chat_template`): for an instruct model the driver rewraps every
prompt, train and eval alike, as the tokenizer's chat: a system turn asking for the final answer in
the format the reward reads (`CHAT_INSTRUCTIONS[rollout.answer_format]`) and a user turn holding the
bare problem; the text ends with the assistant header (`add_generation_prompt`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from launch.data.config import CHAT_TEMPLATE_MODES
from rollout_workers.types import Prompt

TINY_TEMPLATE = "Q: {question}\nA:"
"""Prompt of synthetic problems (the tiny model's tokenizer is trained on this format)."""
REASONING_INSTRUCTIONS = {
    "boxed": "Please reason step by step, and put your final answer within \\boxed{}.",
    "gsm8k": "Please reason step by step, and write the final number on the last line after '#### '.",
    "last_number": "Please reason step by step, and end with 'The answer is N.', where N is the final number.",
}
"""Last line of plain GSM8K/MATH prompts, by `rollout.answer_format`: ask for the answer where the reward reads it."""
LOADED_TAIL = "\n" + REASONING_INSTRUCTIONS["boxed"]
"""What follows the problem in a GSM8K/MATH prompt as loaded."""
REASONING_TEMPLATE = "{problem}" + LOADED_TAIL.replace("{}", "{{}}")
"""Prompt of GSM8K/MATH problems as loaded (`plain_prompts` rewrites the instruction for other formats)."""
CHAT_INSTRUCTIONS = {
    "boxed": "Solve the math problem. Put your final answer within \\boxed{}.",
    "gsm8k": "Solve the math problem step by step. On the last line write '#### ' followed by the final number.",
    "last_number": "Solve the math problem. End your reply with 'The answer is N.', where N is the final number.",
}
"""System turn of chat prompts, by `rollout.answer_format`: ask for the answer where the reward reads it."""


def sft_target(prompt: Prompt) -> str:
    """The supervised completion of a prompt for SFT warm-up: `" " + prompt.solution` when the
    prompt has a worked solution, else `" \\boxed{<gold>}"`."""
    return f" {prompt.solution}" if prompt.solution else f" \\boxed{{{prompt.gold}}}"


def use_chat_template(mode: str, tokenizer) -> bool:
    """Whether prompts get the chat template: "on" requires the tokenizer to have one (clear error
    naming `data.chat_template` otherwise), "auto" uses it when present, "off" never."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"data.chat_template must be one of {list(CHAT_TEMPLATE_MODES)}, got {mode!r}")
    has_template = bool(tokenizer.chat_template)
    if mode == "on" and not has_template:
        raise ValueError(f"data.chat_template=on but the tokenizer {tokenizer.name_or_path!r} "
                         "has no chat template; use auto or off")
    return mode == "on" or (mode == "auto" and has_template)


def problem_of(prompt: Prompt) -> str:
    """The bare problem inside a prompt made by this package (`TINY_TEMPLATE` or `REASONING_TEMPLATE`)."""
    text = prompt.text
    head, tail = TINY_TEMPLATE.split("{question}")
    if text.startswith(head) and text.endswith(tail):
        return text[len(head):len(text) - len(tail)]
    if text.endswith(LOADED_TAIL):
        return text[:-len(LOADED_TAIL)]
    raise ValueError(f"prompt {prompt.uid!r} was not made by TINY_TEMPLATE or REASONING_TEMPLATE")


def plain_prompts(prompts: Sequence[Prompt], answer_format: str) -> list[Prompt]:
    """`prompts` with each `REASONING_TEMPLATE` instruction replaced by that of `answer_format`
    (module docstring); synthetic `TINY_TEMPLATE` prompts are kept as they are (the tiny model's
    format, whose warm-up teaches `\\boxed{}`). uid and gold unchanged; token ids dropped when the
    text changes (they were the old text's)."""
    if answer_format not in REASONING_INSTRUCTIONS:
        raise ValueError(f"rollout.answer_format must be one of {list(REASONING_INSTRUCTIONS)}, got {answer_format!r}")
    wanted = "\n" + REASONING_INSTRUCTIONS[answer_format]
    return [replace(p, text=p.text[:-len(LOADED_TAIL)] + wanted, token_ids=None)
            if wanted != LOADED_TAIL and p.text.endswith(LOADED_TAIL) else p
            for p in prompts]


def chat_prompts(prompts: Sequence[Prompt], tokenizer, answer_format: str) -> list[Prompt]:
    """`prompts` rewritten as chats (module docstring); uid and gold unchanged, token ids dropped
    (they were the old text's)."""
    if answer_format not in CHAT_INSTRUCTIONS:
        raise ValueError(f"rollout.answer_format must be one of {list(CHAT_INSTRUCTIONS)}, got {answer_format!r}")
    system = {"role": "system", "content": CHAT_INSTRUCTIONS[answer_format]}
    return [replace(p, text=tokenizer.apply_chat_template([system, {"role": "user", "content": problem_of(p)}],
                                                          tokenize=False, add_generation_prompt=True),
                    token_ids=None)
            for p in prompts]
