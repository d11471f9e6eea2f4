"""Configuration of the learner -> engine weight sync (section `sync`). Defaults live here only."""
from __future__ import annotations

from dataclasses import dataclass

from weight_sync.transports import get_transport


@dataclass(frozen=True)
class SyncConfig:
    """How new weights travel from learner rank 0 to every engine (section `sync`)."""

    transport: str = "gloo"
    """A name in weight_sync.transports.TRANSPORTS: "gloo" (CPU torch.distributed group), "ray" (object store), "nccl" (vLLM native, separate GPUs) or "ipc" (vLLM native CUDA IPC, colocated)."""
    bucket_mb: int = 64
    """Bucket size in MiB: parameters are gathered, cast and sent one bucket at a time."""
    timeout_s: float = 120.0
    """A sync that does not finish in this many seconds raises, naming the engine and phase."""

    def __post_init__(self) -> None:
        get_transport(self.transport)  # raises naming sync.transport
        if self.bucket_mb < 1:
            raise ValueError(f"sync.bucket_mb must be >= 1, got {self.bucket_mb}")
        if not self.timeout_s > 0:
            raise ValueError(f"sync.timeout_s must be > 0, got {self.timeout_s}")
