"""Run the GPU check's steps, each in its own process under its own time cap (a failing or hung
step is recorded and the next one runs), then print one table (card, figure, value, command) and
write it with every step's figures to OUT/gpu_check.json. `launch/gpu_check.sh` calls this after
installing the carried wheels:

    python -m launch.gpu_check --out "$OUT"                      # on the lent GPU machine
    python -m launch.gpu_check --cpu-rehearsal --out runs/gpu_check [--steps engine,sync]

Exit status 0 only when every step ran. `--budget-s` bounds the whole run (the device time is 15
minutes in all, machine start included): a step gets min(its cap, what is left), and one with
under 20 s left is skipped and recorded as such.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch.gpu_check.steps import CPU_REHEARSAL, GPU, STEPS, Profile

MIN_STEP_S = 20.0


def card_name(p: Profile) -> str:
    """The GPU's name from nvidia-smi (so this process never opens a CUDA context), or the CPU's."""
    if p.device == "cuda":
        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            return f"unknown GPU (nvidia-smi: {e})"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"CPU only: {os.cpu_count()} cores, {line.split(':', 1)[1].strip()}"
    return f"CPU only: {os.cpu_count()} cores, {platform.processor()}"


def step_command(p: Profile, step: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "launch.gpu_check.steps", step, "--profile", p.name, "--json", str(out / f"{step}.json")]


def run_step(p: Profile, step: str, out: Path, cap_s: float) -> dict:
    """Run one step as a child process group, killed at `cap_s`; returns its record."""
    cmd = step_command(p, step, out) + ["--cap-s", str(cap_s)]
    log = out / f"{step}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        # own session: at the cap the whole group goes (Ray, engine processes the step started)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            rc = None
    record = {"seconds": time.perf_counter() - t0, "cap_s": cap_s, "log": str(log),
              "command": " ".join(["python"] + cmd[1:-2])}
    tail = log.read_text(errors="replace")[-3000:]
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
    if rc is None:
        record.update(status="timeout", error=f"killed at its {cap_s:.0f} s cap; last log line: {last}\n{tail}")
    elif rc:
        record.update(status="failed", error=f"exit {rc}: {last}\n{tail}")
    else:
        record.update(status="ok", figures=json.loads((out / f"{step}.json").read_text()))
    print(f"[gpu_check] {step}: {record['status']} in {record['seconds']:.0f} s", flush=True)
    if rc:
        print(tail[-1500:], flush=True)
    return record


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def table_rows(steps: dict) -> list[tuple[str, str, str]]:
    """(figure, value, command) rows of the steps' records."""
    rows = []
    for step, rec in steps.items():
        cmd = rec.get("command", "")
        if rec["status"] != "ok":
            first = (rec.get("error") or "").splitlines()[:1]
            rows.append((step, f"{rec['status'].upper()}: {first[0] if first else ''}", cmd))
            continue
        f = rec["figures"]
        if step == "install":
            rows.append(("install carried wheels", f["summary"], cmd))
        elif step == "learner":
            for budget, b in f["budgets"].items():
                mfu = f"MFU {b['mfu']:.1%} of {f['peak_tflops']:g} TFLOPS" if b["mfu"] is not None else "MFU n/a (no bf16 peak for this device)"
                rows.append((f"learner ZeRO-2 bf16, {f['model_params'] / 1e6:.1f}M params, micro-batch {budget} tokens",
                             f"{_fmt_rate(b['tokens_per_second'])} tok/s, {b['model_tflops']:.3g} model TFLOPS, {mfu}", cmd))
        elif step == "engine":
            for name in ("transformers", "vllm"):
                e = f[name]
                if name == "vllm" and not e["available"]:
                    rows.append(("vLLM engine", f"not measured: {e['reason']}", cmd))
                    continue
                pts = ", ".join(f"{b}: {_fmt_rate(r)}" for b, r in zip(e["batch_sizes"], e["tokens_per_second"]))
                skipped = f" (skipped at the cap: {e['skipped_batch_sizes']})" if e["skipped_batch_sizes"] else ""
                rows.append((f"{name} engine tok/s by batch ({f['model_params'] / 1e6:.1f}M params, {f['max_new_tokens']} new tokens)",
                             pts + skipped, cmd))
        elif step == "sync":
            rows.append((f"weight sync {f['bytes'] / 1e6:.1f} MB bf16, {f['tensors']} tensors",
                         f"memcpy {_ms(f['memcpy_seconds'])}; in-process {_ms(f['in_process_seconds'])} "
                         f"({f['in_process_vs_memcpy']:.2f}x); {f['ipc_mechanism']} {_ms(f['ipc_seconds'])} "
                         f"({f['ipc_vs_memcpy']:.2f}x); max diff {max(f['in_process_max_abs_diff'], f['ipc_max_abs_sum_diff'])}", cmd))
        elif step == "e2e":
            rows.append((f"embedded default, {f['iterations']} RL iteration(s)",
                         f"held-out accuracy {f['accuracy_before_rl']:.3f} -> {f['accuracy_after_rl']:.3f}; "
                         f"run {f['run_wall_seconds']:.0f} s, command {f['command_wall_seconds']:.0f} s"
                         + (f" (then exit {f['exit_code']}: {f['exit_note']})" if f["exit_code"] else ""), f["command"]))
    return rows


def render(card: str, profile: str, rows: list[tuple[str, str, str]]) -> str:
    lines = [f"GPU check ({profile}) on {card}", "", "| figure | value | command |", "|---|---|---|"]
    lines += [f"| {a} | {b} | `{c}` |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-rehearsal", action="store_true", help="tiny shapes on CPU (no wheels, no CUDA)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="where the JSON and logs go")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall-clock bound of all steps together")
    ap.add_argument("--install-status", default="", help="set by gpu_check.sh: 'ok', 'skipped ...' or 'failed ...'")
    ap.add_argument("--install-summary", default="", help="set by gpu_check.sh: what the install did")
    args = ap.parse_args(argv)
    p = CPU_REHEARSAL if args.cpu_rehearsal else GPU
    wanted = [s for s in args.steps.split(",") if s]
    unknown = [s for s in wanted if s not in STEPS]
    if unknown:
        ap.error(f"--steps: unknown step(s) {unknown}; known: {list(STEPS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    card = card_name(p)
    print(f"[gpu_check] {p.name} on {card}; output in {out}", flush=True)
    steps: dict[str, dict] = {}
    if args.install_status:
        ok = args.install_status == "ok" or args.install_status.startswith("skipped")
        steps["install"] = ({"status": "ok", "figures": {"summary": f"{args.install_status}: {args.install_summary}"}}
                            if ok else {"status": "failed", "error": f"{args.install_status}: {args.install_summary}"})
        steps["install"]["command"] = "bash launch/gpu_check.sh (pip install --no-index --find-links .whl ...)"
    for step in wanted:
        left = deadline - time.monotonic()
        cap = min(p.caps_s[step], left)
        if cap < MIN_STEP_S:
            steps[step] = {"status": "skipped", "error": f"{left:.0f} s of the --budget-s {args.budget_s:.0f} left",
                           "command": " ".join(["python"] + step_command(p, step, out)[1:])}
            continue
        steps[step] = run_step(p, step, out, cap)
    rows = table_rows(steps)
    table = render(card, p.name, rows)
    print("\n" + table, flush=True)
    result = {"card": card, "profile": p.name, "started_utc": started,
              "python": platform.python_version(), "steps": steps,
              "rows": [{"figure": a, "value": b, "command": c} for a, b, c in rows]}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_check.md").write_text(table + "\n")
    print(f"\n[gpu_check] wrote {out / 'gpu_check.json'}", flush=True)
    return 0 if all(r["status"] == "ok" for r in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
