"""The CPU weight path into vLLM: a worker extension (`LLM(worker_extension_cls=RELOAD_EXTENSION)`)
whose methods vLLM mixes into each of its workers, called through `LLM.collective_rpc`.

Only plain values cross `collective_rpc`: a file path in, a dict of strings or an int out. With
the engine core in its own process (vLLM's default, and the layout on every GPU) the arguments and
results of a utility call are msgpack-encoded (vllm/v1/serial_utils.py, 0.33.0: `enc_hook` turns a
tensor into a (dtype, shape, buffer) tuple, and the engine core decodes untyped arguments as plain
lists), so a tensor sent as an argument arrives as a list. The weights therefore travel as a
safetensors file that the adapter (rollout_workers/engines/vllm_engine.py) writes to shared memory
and removes afterwards; the engine core's worker reads it here. The same path runs when the engine
core shares the caller's process (the CPU default, `rollout.vllm_engine_core`).

`reload_weights` (vllm/v1/worker/gpu_model_runner.py, reached on CPU through the CPU model runner)
runs the model's own `load_weights` on the new checkpoint-named tensors and then its
`process_weights_after_loading` again, so layers that the CPU backend repacks (linear weights
become size-0 parameters plus a packed copy) are repacked from the new values. Calling
`model.load_weights` directly does not: it writes into the emptied parameters and fails.

One more step on the CPU backend: a layer that kept its weight but packed a private copy for its
GEMM kernel (`cpu_linear`) is not re-processed when it receives no weight of its own. The tied
`lm_head` of a model with `tie_word_embeddings` is such a layer (its weight *is* the embedding's):
after `reload_weights` it would go on computing logits with the old embedding. Such kernels are
re-dispatched from the current weight after every reload (measured: without it, logprobs after a
sync were off by ~4 nats from a teacher-forced pass of the new weights).

vLLM imports this module by name inside its worker process (so it imports vLLM lazily).

    PYTHONPATH=$PWD python -m pytest -q -m vllm tests/test_vllm_real.py
"""
from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

RELOAD_EXTENSION = "rollout_workers.engines.vllm_reload.ReloadWeightsExtension"
"""Import path given to `LLM(worker_extension_cls=...)`."""


class ReloadWeightsExtension:
    """Methods added to vLLM's worker (`self` is the worker: it has `model_runner`)."""

    def dash_reload_weights(self, path: str) -> int:
        """Load the complete, already validated and cast checkpoint-named weight set stored in the
        safetensors file `path` (the caller owns and removes it); returns how many tensors."""
        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            # One tensor read at a time: the file is memory-mapped, the model copies each into place.
            self.model_runner.reload_weights(weights_iterator=((n, f.get_tensor(n)) for n in names))
        stale = [m for m in self.model_runner.get_model().modules()
                 if hasattr(m, "cpu_linear") and getattr(m, "weight", None) is not None and m.weight.numel() > 0]
        if stale:  # only the CPU backend sets cpu_linear
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            for module in stale:
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        return len(names)

    def dash_effective_weights(self, path: str) -> dict[str, list[str]]:
        """Write {vLLM parameter name: values on CPU} of the weights the engine computes with to the
        safetensors file `path` (the caller's; it reads and removes it) and return the model's
        packed_modules_mapping. Where the CPU backend keeps a packed copy for a GEMM kernel
        (`cpu_linear`; the parameter is then size 0, or a tied weight), the values are read back
        through that kernel applied to an identity matrix (x = I gives I @ W.T = W.T; in fp32
        every product is 0*w or 1*w and every sum adds zeros, so they come back exactly as the
        kernel holds them, stale or not)."""
        model = self.model_runner.get_model()
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for module_name, module in model.named_modules():
                for name, p in module.named_parameters(recurse=False):
                    full = f"{module_name}.{name}" if module_name else name
                    if name == "weight" and hasattr(module, "cpu_linear"):
                        k = int(module.input_size_per_partition) if p.numel() == 0 else p.shape[1]
                        eye = torch.eye(k, dtype=p.dtype, device=p.device)
                        value = module.cpu_linear(eye, p, None).t()
                    else:
                        value = p.detach()
                    # Its own contiguous CPU copy: safetensors stores neither views nor shared storage.
                    out[full] = value.to("cpu", copy=True).contiguous()
        save_file(out, path)
        return {k: list(v) for k, v in getattr(model, "packed_modules_mapping", {}).items()}
