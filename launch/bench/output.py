"""The result file every bench and GPU-check main writes for `--json PATH` (and the GPU check's
OUT/gpu_check.json): one place for the format (indented JSON) and the parent directory creation;
and the cells the bench tables print (`fmt`, `fmt_spread`).

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


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def fmt_spread(s: dict, spec: str = ".1f") -> str:
    """"median (min-max)" of a Spread dict, with how many seeds had a value when not all did."""
    if s["median"] is None and s["count"] == 0:
        return f"- (0/{s['of']})"
    text = f"{fmt(s['median'], spec)} ({fmt(s['min'], spec)}-{fmt(s['max'], spec)})"
    return text if s["count"] == s["of"] else f"{text} [{s['count']}/{s['of']}]"
