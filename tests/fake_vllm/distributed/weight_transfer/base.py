"""Mirrors vllm/distributed/weight_transfer/base.py (0.33): the API-level request dataclasses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# Mirrors base.py:414 `class WeightTransferInitRequest`.
@dataclass
class WeightTransferInitRequest:
    init_info: dict[str, Any] = field(default_factory=dict)


# Mirrors base.py:421 `class WeightTransferUpdateRequest` (update_info: dict | list[dict]).
@dataclass
class WeightTransferUpdateRequest:
    update_info: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)
