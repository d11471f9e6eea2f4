"""How much accelerator memory one learner rank needs: model states by ZeRO stage plus the
activations and logits of one micro-batch. Pure arithmetic on the model's shape, so a colocated
run (engine and learner on one GPU) is refused before any actor starts when the engine's memory
share leaves the learner too little (launch.placement.preflight).

    PYTHONPATH=$PWD python -m pytest -q tests/test_learner_memory.py

Model states (Rajbhandari et al. 2020, ZeRO, Sec. 3.1 and Fig. 1: mixed-precision Adam holds 2N
bytes of 16-bit weights, 2N of 16-bit gradients and K*N = 12N of fp32 master weights, momentum
and variance; stage 1 partitions the 12N over the W data-parallel ranks, stage 2 also the
gradients, stage 3 also the weights). An fp32 run (learner.bf16=false) holds 4N weights, 4N
gradients and 8N Adam moments; its stages partition the same way.

Activations, kept for the backward pass (no recomputation here): 34 * h * T bytes per layer in
16-bit for T tokens (Korthikanti et al. 2022, "Reducing Activation Recomputation", Eq. 2 without
the attention-score term, which flash/SDPA attention never materialises), twice that in fp32.
Logits: the model's (T, V) output in its dtype, plus the fp32 copy and log-softmax the loss takes
of the predicted positions (`learner.trainer.forward_logprobs`), at most T rows: 8 * T * V bytes.
"""
from __future__ import annotations

from typing import NamedTuple


class LearnerMemory(NamedTuple):
    """Bytes one learner rank holds on its device, by part."""

    model_states: int
    """Weights, gradients and optimizer states (this rank's ZeRO partition)."""
    activations: int
    """Per-layer activations of one micro-batch, kept for backward."""
    logits: int
    """The micro-batch's logits and the loss's fp32 log-softmax of them."""
    reference: int
    """The frozen reference model for the KL (0 when the KL is off: paper finding 3)."""

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.logits + self.reference


def model_state_bytes(n_params: int, zero_stage: int, num_ranks: int, bf16: bool) -> int:
    """Weights + gradients + Adam states of one rank (module docstring), ZeRO-partitioned over `num_ranks`."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    weights, grads, optim = (2, 2, 12) if bf16 else (4, 4, 8)
    w = num_ranks
    per_param = {0: weights + grads + optim,
                 1: weights + grads + optim / w,
                 2: weights + (grads + optim) / w,
                 3: (weights + grads + optim) / w}[zero_stage]
    return int(per_param * n_params)


def learner_memory(n_params: int, layers: int, hidden: int, vocab: int, micro_batch_tokens: int, zero_stage: int,
                   num_ranks: int, bf16: bool, reference_model: bool) -> LearnerMemory:
    """The learner rank's peak bytes (module docstring for each term)."""
    act_bytes = 2 if bf16 else 4
    activations = layers * 34 * hidden * micro_batch_tokens * act_bytes // 2
    logits = micro_batch_tokens * vocab * (act_bytes + 8)
    # the reference model is loaded in bf16 with flash attention, else fp32 (learner.trainer)
    reference = n_params * act_bytes if reference_model else 0
    return LearnerMemory(model_state_bytes(n_params, zero_stage, num_ranks, bf16), activations, logits, reference)
