"""Benchmarks, one command each; every number in the README's performance table comes from here.

    python -m launch.bench learner --json runs/bench/learner.json
    python -m launch.bench engine  --json runs/bench/engine.json
    python -m launch.bench sync    --json runs/bench/sync.json
    python -m launch.bench dash [--quick] [--regime tiny|reasoning] [--seeds N] --json runs/bench/dash.json
    python -m launch.bench all [--quick] [--skip dash]   # all of the above + the README table (runs/bench/table.md)
    python -m launch.bench rewards --samples 2000          # scoring ms/sample: exact fast path vs math-verify
    python -m launch.bench prefill --model DIR             # HF engine: shared vs per-sample prompt prefill
    python -m launch.bench decode --model DIR              # HF engine: chunk budgets, ended rows leaving the batch
    python -m launch.bench layout --json runs/bench/layout.json  # learner micro-batch layouts: dense mask vs padded
    python -m launch.bench arrival --model DIR             # real vLLM: what each DASH step learns, by arrival or prompt order
"""
from __future__ import annotations

import importlib
import platform
import sys
import time
from pathlib import Path

from launch.bench.output import fmt, fmt_spread

BENCHES = {"learner": "launch.bench.learner", "engine": "launch.bench.engine", "sync": "launch.bench.sync",
           "dash": "launch.bench.dash"}
EXTRA = {"rewards": "launch.bench.rewards", "prefill": "launch.bench.prefill", "decode": "launch.bench.decode",
         "layout": "launch.bench.layout", "arrival": "launch.bench.arrival"}
"""Benchmarks run by name only (not by `all`): prefill, decode and arrival need a model directory; layout
compares the learner's micro-batch layouts and arrival the order of a vLLM batch's groups (design
measurements, not table figures)."""


def machine() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores, {cpu}, {gpu}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA:
        importlib.import_module(EXTRA[argv[0]]).main(argv[1:])
        return 0
    if not argv or argv[0] not in (*BENCHES, "all"):
        print(__doc__)
        return 2
    which, rest = argv[0], argv[1:]
    if which != "all":
        importlib.import_module(BENCHES[which]).main(rest)
        return 0
    out = Path("runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    quick = ["--quick"] if "--quick" in rest else []
    skip = {rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--skip"}
    results = {}
    for name, module in BENCHES.items():
        if name in skip:
            continue
        results[name] = importlib.import_module(module).main(["--json", str(out / f"{name}.json")] + (quick if name == "dash" else []))
    table = render_table(results, machine(), time.strftime("%Y-%m-%d"))
    (out / "table.md").write_text(table)
    print(table)
    return 0


def render_table(r: dict, machine_name: str, date: str) -> str:
    l, e, s = r["learner"], r["engine"], r["sync"]
    rows = [
        ("learner backprop, 5M model", f"{l['tokens_per_second']:.0f} tok/s vs bare torch {l['bare_torch_tokens_per_second']:.0f} tok/s "
         f"({l['tokens_per_second'] / l['bare_torch_tokens_per_second']:.2f}x); grad rel. error {l['grad_rel_error']:.1e}; "
         f"filtered forward calls {l['filtered_forward_calls']}", "python -m launch.bench learner"),
    ]
    curves = [("transformers", e.get("models", {})), ("vLLM (CPU build)", e.get("vllm", {}))]
    for engine, models in curves:
        if isinstance(models, str):  # e.g. "not installed"
            rows.append((f"{engine} engine", models, "python -m launch.bench engine"))
            continue
        for model, curve in models.items():
            pts = ", ".join(f"{b}: {t:.0f}" for b, t in zip(curve["batch_sizes"], curve["tokens_per_second"]))
            rows.append((f"{engine} engine, {model} ({curve['params'] / 1e6:.1f}M params; batch: tok/s)", pts,
                         "python -m launch.bench engine"))
    for x in s["models"]:
        model = x["model"]
        rows.append((f"gloo weight sync, {model}", f"{x['bytes'] / 1e6:.1f} MB in {x['seconds'] * 1e3:.1f} ms vs memcpy "
                     f"{x['memcpy_seconds'] * 1e3:.1f} ms ({x['seconds'] / x['memcpy_seconds']:.1f}x); max abs diff {x['max_abs_diff']}",
                     "python -m launch.bench sync"))
    if "dash" in r:
        d = r["dash"]
        cmd = (f"python -m launch.bench dash --regime {d['regime']} --seeds {d['seeds']}"
               + (" --quick" if d["quick"] else ""))
        for name, c in d["contenders"].items():
            rows.append((f"{name}: seconds to target {fmt(d['target_accuracy'], '.3f')}, median (min-max) of {d['seeds']} seeds",
                         f"{fmt_spread(c['seconds_to_target'])} s; final accuracy {fmt_spread(c['final_accuracy'], '.3f')}; "
                         f"{fmt(c['samples_per_second'], '.0f')} samples/s", cmd))
        rows.append(("ratio dash / standard_grpo (median seconds to target)", fmt(d["ratio_dash_vs_standard_grpo"], ".2f"), cmd))
        rows.append(("ratio dash / trl GRPOTrainer (median seconds to target)", fmt(d["ratio_dash_vs_trl"], ".2f"), cmd))
    head = f"Measured on {machine_name}, {date}.\n\n| what | measured | command |\n|---|---|---|\n"
    return head + "\n".join(f"| {a} | {b} | `{c}` |" for a, b, c in rows) + "\n"

