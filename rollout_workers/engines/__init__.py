"""Inference engines behind one interface (`base.Engine`): transformers (`hf`) and vLLM (`vllm_engine`).

    PYTHONPATH=$PWD python -m pytest -q tests/test_engines.py tests/test_vllm_adapter.py
"""
