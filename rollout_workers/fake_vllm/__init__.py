"""A fake `vllm` package for CPU tests: the vLLM 0.33 API surface the adapter touches, backed by
the transformers engine so tokens and logprobs are real. Mirrors vllm/__init__.py (lazy exports
LLM, SamplingParams, RequestOutput, CompletionOutput, and `__version__`).

Select it with `VLLMEngine(..., vllm_module="rollout_workers.fake_vllm")`.

    PYTHONPATH=$PWD python -m pytest -q tests/test_vllm_adapter.py
"""
from rollout_workers.fake_vllm.entrypoints.llm import LLM
from rollout_workers.fake_vllm.outputs import CompletionOutput, RequestOutput
from rollout_workers.fake_vllm.sampling_params import SamplingParams

__version__ = "0.33.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
