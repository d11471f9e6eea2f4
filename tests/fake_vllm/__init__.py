"""A fake `vllm` package for CPU tests: the vLLM 0.33 API surface the adapter touches, backed by
the transformers engine so tokens and logprobs are real. Mirrors vllm/__init__.py (lazy exports
LLM, SamplingParams, RequestOutput, CompletionOutput, and `__version__`).

Select it with `VLLMEngine(..., vllm_module="tests.fake_vllm")`. A test double, so it lives under
tests/: `tests` has no __init__.py (pytest imports the test files by their own names), so
`tests.fake_vllm` resolves as a namespace package from the repo root, which conftest puts on
PYTHONPATH for the Ray workers too.

    PYTHONPATH=$PWD python -m pytest -q tests/test_vllm_adapter.py
"""
from tests.fake_vllm.entrypoints.llm import LLM
from tests.fake_vllm.outputs import CompletionOutput, RequestOutput
from tests.fake_vllm.sampling_params import SamplingParams

__version__ = "0.33.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
