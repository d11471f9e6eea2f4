"""Inference engines behind one interface (`base.Engine`, with the optional capabilities
`base.Sleepable` and `base.NativeWeightTransfer`): transformers (`hf`) and vLLM (`vllm_engine`),
registered by name in `registry` (the `rollout.engine` values), which imports an engine's module
only when one is built. Kept empty of imports so that `registry` stays cheap.

    PYTHONPATH=$PWD python -m pytest -q -p no:cacheprovider tests/test_engines.py tests/test_vllm_adapter.py
"""
