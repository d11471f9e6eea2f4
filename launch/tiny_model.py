"""The embedded tiny model: a byte-level BPE tokenizer trained offline and a Qwen2-style model
built from a config, saved as an ordinary Hugging Face directory (so every engine and the learner
load it with `from_pretrained`, exactly as they load a real model).

    python -m launch.tiny_model /tmp/tiny   # writes a tokenizer + random-init model there
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

EOS = "<|endoftext|>"
PAD = "<|pad|>"


TINY_VOCAB = 384
"""Tokens of the embedded tiny model's tokenizer (`train_tokenizer`'s default)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """Byte-level BPE (every byte is in the vocab, so nothing is ever unknown); digits stay single
    tokens, which makes arithmetic learnable by a tiny model."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", clean_up_tokenization_spaces=False)


def tiny_config(vocab_size: int, hidden_size: int, layers: int, heads: int, max_positions: int = 256) -> Qwen2Config:
    """The embedded model's architecture (also what `launch.placement.model_shape` counts before
    the tokenizer exists)."""
    return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=True, torch_dtype="float32")


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, layers: int = 2,
                     heads: int = 4, seed: int = 0, max_positions: int = 256) -> Qwen2ForCausalLM:
    """A Qwen2-architecture causal LM of a few M params, randomly initialised from `seed`."""
    config = tiny_config(len(tokenizer), hidden_size, layers, heads, max_positions)
    config.eos_token_id, config.pad_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def write_tiny_model_dir(path: str | Path, texts: Iterable[str], hidden_size: int = 64, layers: int = 2,
                         heads: int = 4, seed: int = 0) -> Path:
    """Train the tokenizer on `texts`, build the model and save both to `path` (HF format, safetensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts)
    model = build_tiny_model(tokenizer, hidden_size, layers, heads, seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _default_texts() -> list[str]:
    import random
    rng = random.Random(0)
    out = []
    for _ in range(2000):
        a, b = rng.randrange(1000), rng.randrange(1000)
        out.append(f"Q: {a} + {b} = ?\nA: \\boxed{{{a + b}}}")
        out.append(f"Q: {a} * {b % 100} = ?\nA: #### {a * (b % 100)}")
    return out


if __name__ == "__main__":
    out = write_tiny_model_dir(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-model", _default_texts())
    print(f"wrote {out}")
