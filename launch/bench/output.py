"""The result file every bench and GPU-check main writes for `--json PATH` (and the GPU check's
OUT/gpu_check.json): one place for the format (indented JSON) and the parent directory creation.

    python -m launch.bench sync --json /tmp/bench_sync.json
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` to `path` as indented JSON, creating the parent directories; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path
