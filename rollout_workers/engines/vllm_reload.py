"""The CPU weight path into vLLM: a worker extension (`LLM(worker_extension_cls=RELOAD_EXTENSION)`)
whose methods vLLM mixes into each of its workers, called through `LLM.collective_rpc`.

`reload_weights` (vllm/v1/worker/gpu_model_runner.py, reached on CPU through the CPU model runner)
runs the model's own `load_weights` on the new checkpoint-named tensors and then its
`process_weights_after_loading` again, so layers that the CPU backend repacks (linear weights
become size-0 parameters plus a packed copy) are repacked from the new values. Calling
`model.load_weights` directly does not: it writes into the emptied parameters and fails.

This module imports nothing of vLLM: vLLM imports it by name inside its worker process.

    PYTHONPATH=$PWD python -m pytest -q -m vllm tests/test_vllm_real.py
"""
from __future__ import annotations

import torch

RELOAD_EXTENSION = "rollout_workers.engines.vllm_reload.ReloadWeightsExtension"
"""Import path given to `LLM(worker_extension_cls=...)`."""


class ReloadWeightsExtension:
    """Methods added to vLLM's worker (`self` is the worker: it has `model_runner`)."""

    def dash_reload_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Load a complete, already validated checkpoint-named weight set; returns how many tensors."""
        self.model_runner.reload_weights(weights_iterator=iter(named_tensors))
        return len(named_tensors)

    def dash_named_parameters(self) -> dict[str, torch.Tensor]:
        """The model's parameters by vLLM's (fused) names, copied to CPU; the CPU backend's repacked
        linear layers show up as size-0 tensors here (their values live in the packed copy)."""
        model = self.model_runner.get_model()
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
