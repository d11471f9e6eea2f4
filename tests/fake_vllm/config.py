"""Mirrors vllm/config/weight_transfer.py `WeightTransferConfig` (exported by vllm/config/__init__.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WeightTransferConfig:
    backend: str = "nccl"
    """"nccl", "ipc", "sparse_nccl", "sharded_rdt", "nccl_m2n" in the real registry; the fake
    implements "ipc" only (the real NCCL backend needs CUDA)."""
