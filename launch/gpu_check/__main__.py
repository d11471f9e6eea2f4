"""Run the GPU check's steps, each in its own process under its own time cap (a failing or hung
step is recorded and the next one runs), then print one table (card, figure, value, command) and
write it with every step's figures. `launch/gpu_check.sh` calls this after installing the carried
wheels:

    python -m launch.gpu_check --out "$OUT"                      # on the lent GPU machine
    python -m launch.gpu_check --cpu-rehearsal --out runs/gpu_check [--steps engine,sync]

Results: OUT holds only OUT_FILES (the table as JSON and markdown, one combined log of every
step), rewritten after each step so that a run cut short keeps what it measured; with the
script's nvidia-smi.txt and install.log that stays within the MAX_OUT_FILES the device tool
returns. Everything else (each step's JSON and log, the model files, the end-to-end run
directory) goes to a scratch directory outside OUT: `--scratch DIR` (kept), else a fresh
temporary directory removed at the end unless `--keep-scratch`.

Exit status 0 only when every step ran. `--budget-s` bounds the whole run (the device time is 15
minutes in all, machine start included): a step gets min(its cap, what is left), and one with
under 20 s left is skipped and recorded as such.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch.bench.output import write_json
from launch.gpu_check.steps import CPU_REHEARSAL, GPU, STEPS, Profile

MIN_STEP_S = 20.0
OUT_FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.log")
"""What this driver writes under OUT."""
SCRIPT_OUT_FILES = ("nvidia-smi.txt", "install.log")
"""What `launch/gpu_check.sh` writes under OUT on the GPU machine."""
MAX_OUT_FILES = 8
"""The device tool returns at most this many files from $OUT."""
NOT_COVERED = (
    "Not covered by this check: no vLLM wheel fits the device tool's 64 MiB carry limit (the CUDA "
    "build is 336 MB), so unless vLLM is already installed on the machine the vLLM engine does not "
    "run, and vLLM's native weight transfers (NCCL broadcast, CUDA IPC into vLLM: "
    "weight_sync/vllm_transport.py) never do; the sync row measures the CUDA IPC mechanism, and "
    "the end-to-end row runs the transformers engine with the gloo sync. One GPU: no NCCL between "
    "learner ranks or nodes.")
"""Printed under the table and written into gpu_check.md: which GPU paths the check cannot cover."""


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


def step_command(p: Profile, step: str, scratch: Path) -> list[str]:
    return [sys.executable, "-m", "launch.gpu_check.steps", step, "--profile", p.name,
            "--json", str(scratch / f"{step}.json")]


def shown_command(cmd: list[str], scratch: Path) -> str:
    """`cmd` as the table shows it: `python` for the interpreter, $SCRATCH for the scratch
    directory (a temporary one is gone after the run; its path is in gpu_check.json)."""
    return " ".join(["python"] + [a.replace(str(scratch), "$SCRATCH") for a in cmd[1:]])


def run_step(p: Profile, step: str, scratch: Path, cap_s: float, combined_log: Path) -> dict:
    """Run one step as a child process group, killed at `cap_s`, its output in scratch/STEP.log,
    then appended to `combined_log`; returns its record."""
    cmd = step_command(p, step, scratch) + ["--cap-s", str(cap_s)]
    log = scratch / f"{step}.log"
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
    record = {"seconds": time.perf_counter() - t0, "cap_s": cap_s, "command": shown_command(cmd[:-2], scratch)}
    text = log.read_text(errors="replace")
    tail = text[-3000:]
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
    if rc is None:
        record.update(status="timeout", error=f"killed at its {cap_s:.0f} s cap; last log line: {last}\n{tail}")
    elif rc:
        record.update(status="failed", error=f"exit {rc}: {last}\n{tail}")
    else:
        record.update(status="ok", figures=json.loads((scratch / f"{step}.json").read_text()))
    with combined_log.open("a") as f:
        f.write(f"===== step {step}: {record['status']} in {record['seconds']:.0f} s: {record['command']}\n{text}\n")
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
            ceiling = f["matmul_ceiling_tflops"]["median"]
            for budget, b in f["budgets"].items():
                title = (f"learner RankTrainer ZeRO-{f['zero_stage']} {f['dtype']}, {f['model_params'] / 1e6:.1f}M params, "
                         f"micro-batch {budget} tokens")
                if "error" in b:
                    rows.append((title, f"FAILED: {b['error']}", cmd))
                    continue
                datasheet = (f"{b['mfu_vs_datasheet']:.1%} of the {f['peak_tflops']:g} TFLOPS datasheet peak"
                             if b["mfu_vs_datasheet"] is not None else "no datasheet peak for this device")
                rows.append((title,
                             f"{_fmt_rate(b['tokens_per_second'])} tok/s ({b['samples']} samples of "
                             f"{f['prompt_lens'][0]}-{f['prompt_lens'][1]} + {f['completion_lens'][0]}-"
                             f"{f['completion_lens'][1]} tokens, {b['micro_batches_per_step']} micro-batches, "
                             f"{b['padding_share']:.0%} padding), {b['model_tflops']:.3g} model TFLOPS: MFU "
                             f"{b['mfu_vs_measured_matmul']:.1%} of the measured {f['matmul_ceiling_dtype']} matmul "
                             f"({ceiling:.4g} TFLOPS), {datasheet}"
                             + (f"; peak memory {b['peak_memory_gib']:.1f} GiB (learner.memory estimate "
                                f"{b['predicted_memory_gib']:.1f})" if "peak_memory_gib" in b else ""), cmd))
        elif step == "engine":
            for name in ("transformers", "vllm"):
                e = f[name]
                if name == "vllm" and not e["available"]:
                    rows.append(("vLLM engine", f"not measured: {e['reason']}", cmd))
                    continue
                pts = ", ".join(f"{b}: {_fmt_rate(r)} ({_fmt_rate(lo)}-{_fmt_rate(hi)})" for b, r, lo, hi in
                                zip(e["batch_sizes"], e["tokens_per_second"], e["tokens_per_second_min"],
                                    e["tokens_per_second_max"]))
                skipped = f" (skipped at the cap: {e['skipped_batch_sizes']})" if e["skipped_batch_sizes"] else ""
                rows.append((f"{name} engine tok/s by batch, median (min-max) of {e['repeats']} "
                             f"({f['model_params'] / 1e6:.1f}M params, {f['max_new_tokens']} new tokens)",
                             pts + skipped, cmd))
        elif step == "sync":
            exact = f["in_process_mismatched_tensors"] == 0 and f["ipc_mismatched_tensors"] == 0
            rows.append((f"weight sync {f['bytes'] / 1e6:.1f} MB bf16, {f['tensors']} tensors",
                         f"memcpy {_ms(f['memcpy_seconds'])}; in-process {_ms(f['in_process_seconds'])} "
                         f"({f['in_process_vs_memcpy']:.2f}x); {f['ipc_mechanism']} {_ms(f['ipc_seconds'])} "
                         f"({f['ipc_vs_memcpy']:.2f}x); "
                         + ("bit-exact" if exact else f"NOT bit-exact: {f['in_process_mismatched_tensors']} in-process, "
                            f"{f['ipc_mismatched_tensors']} IPC tensor mismatches")
                         + f" over {f['ipc_versions_checked']} versions (checked outside the timing)", cmd))
        elif step == "e2e":
            rows.append((f"embedded default, {f['iterations']} RL iteration(s)",
                         f"held-out accuracy {f['accuracy_before_rl']:.3f} -> {f['accuracy_after_rl']:.3f}; "
                         f"run {f['run_wall_seconds']:.0f} s, command {f['command_wall_seconds']:.0f} s"
                         + (f" (then exit {f['exit_code']}: {f['exit_note']})" if f["exit_code"] else ""), f["command"]))
    return rows


def render(card: str, profile: str, rows: list[tuple[str, str, str]]) -> str:
    lines = [f"GPU check ({profile}) on {card}", "", "| figure | value | command |", "|---|---|---|"]
    lines += [f"| {a} | {b} | `{c}` |" for a, b, c in rows]
    return "\n".join(lines + ["", NOT_COVERED])


def write_results(out: Path, card: str, p: Profile, started: str, steps: dict, scratch: Path) -> str:
    """(Re)write OUT's table files from the steps so far; returns the table."""
    rows = table_rows(steps)
    table = render(card, p.name, rows)
    result = {"card": card, "profile": p.name, "started_utc": started, "python": platform.python_version(),
              "scratch": str(scratch), "not_covered": NOT_COVERED, "steps": steps,
              "rows": [{"figure": a, "value": b, "command": c} for a, b, c in rows]}
    write_json(out / "gpu_check.json", result)
    (out / "gpu_check.md").write_text(table + "\n")
    return table


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-rehearsal", action="store_true", help="tiny shapes on CPU (no wheels, no CUDA)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check",
                    help=f"where the results go: only {', '.join(OUT_FILES)}")
    ap.add_argument("--scratch", default="", help="each step's JSON and log, model files, the e2e run (outside --out); "
                                                 "default: a fresh temporary directory")
    ap.add_argument("--keep-scratch", action="store_true", help="keep the default temporary scratch directory")
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
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="gpu_check-scratch-"))
    scratch.mkdir(parents=True, exist_ok=True)
    if scratch.resolve().is_relative_to(out.resolve()):
        ap.error(f"--scratch {scratch} is inside --out {out}: the device tool returns only {MAX_OUT_FILES} files from it")
    combined_log = out / "gpu_check.log"
    combined_log.write_text("")
    deadline = time.monotonic() + args.budget_s
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    card = card_name(p)
    print(f"[gpu_check] {p.name} on {card}; results in {out}, scratch in {scratch}", flush=True)
    steps: dict[str, dict] = {}
    if args.install_status:
        ok = args.install_status == "ok" or args.install_status.startswith("skipped")
        steps["install"] = ({"status": "ok", "figures": {"summary": f"{args.install_status}: {args.install_summary}"}}
                            if ok else {"status": "failed", "error": f"{args.install_status}: {args.install_summary}"})
        steps["install"]["command"] = "bash launch/gpu_check.sh (pip install --no-index --find-links .whl ...)"
    try:
        for step in wanted:
            left = deadline - time.monotonic()
            cap = min(p.caps_s[step], left)
            if cap < MIN_STEP_S:
                steps[step] = {"status": "skipped", "error": f"{left:.0f} s of the --budget-s {args.budget_s:.0f} left",
                               "command": shown_command(step_command(p, step, scratch), scratch)}
            else:
                steps[step] = run_step(p, step, scratch, cap, combined_log)
            write_results(out, card, p, started, steps, scratch)  # a run cut short keeps what it measured
        table = write_results(out, card, p, started, steps, scratch)
    finally:
        if not args.scratch and not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n" + table, flush=True)
    print(f"\n[gpu_check] wrote {', '.join(str(out / name) for name in OUT_FILES)}", flush=True)
    return 0 if all(r["status"] == "ok" for r in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
