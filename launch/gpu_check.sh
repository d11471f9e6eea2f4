#!/usr/bin/env bash
# The GPU check, ready to fire on a lent GPU machine (README "GPU"). With the device tool:
#   run  carry: [".whl"]  command: bash launch/gpu_check.sh
# (build .whl first here: make gpu-wheels). On the machine it
#   1. installs ray, deepspeed and math-verify from the carried .whl/ (no index is reachable);
#   2-5. runs python -m launch.gpu_check: the project's learner rank (tok/s, MFU vs the datasheet
#        and vs a measured matmul), engine tok/s by batch, weight sync vs memcpy, the embedded
#        default end to end with a CUDA learner, each step under its own time cap;
#   6. prints the table and writes $OUT/gpu_check.json, gpu_check.md and gpu_check.log (every
#      step's log). With this script's nvidia-smi.txt and install.log that is all of $OUT: 5
#      files (the device tool returns at most 8); scratch (the e2e run, model files) goes to a
#      temporary directory outside $OUT.
# Rehearsal anywhere, no wheels and no CUDA, tiny shapes:
#   bash launch/gpu_check.sh --cpu-rehearsal [--steps engine,sync]
# Environment: PYTHON (default: the repo's .venv/bin/python if it has torch, else python3), OUT (default runs/gpu_check), GPU_CHECK_BUDGET_S (the steps'
# bound after the install: default 400 s on the GPU, so that the install (at most 120 + 40 s) and
# the steps fit the device tool's 600 s per command; 1800 s for the rehearsal on a shared 2-core machine).
set -u
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then  # the interpreter that has torch: the repo's .venv (`make install`), python3, python
  PYTHON=python3
  for c in "$PWD/.venv/bin/python" python3 python; do
    if "$c" -c "import torch" > /dev/null 2>&1; then PYTHON="$c"; break; fi
  done
fi
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"   # a loopback cluster of this run only
REHEARSAL=0
ARGS=()
for a in "$@"; do
  if [ "$a" = "--cpu-rehearsal" ]; then REHEARSAL=1; fi
  ARGS+=("$a")
done
if [ "$REHEARSAL" = 1 ]; then
  BUDGET="${GPU_CHECK_BUDGET_S:-1800}"
  export CUDA_VISIBLE_DEVICES=""
  STATUS="skipped (cpu rehearsal)"
  SUMMARY="uses this environment's packages"
else
  BUDGET="${GPU_CHECK_BUDGET_S:-400}"
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
  start=$(date +%s)
  # --no-index: only the carried wheels; what is already installed (torch, transformers) stays.
  # PIP_BREAK_SYSTEM_PACKAGES: a distribution's Python refuses pip installs (PEP 668) without it;
  # an unwritable site-packages gets a second try with --user.
  export PIP_BREAK_SYSTEM_PACKAGES=1
  # the pins `make gpu-wheels` built (launch/gpu_check/wheels.py: stdlib only, imports anywhere)
  read -r -a PKGS <<< "$("$PYTHON" -c 'from launch.gpu_check.wheels import TOP_LEVEL; print(*TOP_LEVEL)')"
  if timeout 120 "$PYTHON" -m pip install --no-index --find-links .whl "${PKGS[@]}" > "$OUT/install.log" 2>&1 \
     || timeout 40 "$PYTHON" -m pip install --user --no-index --find-links .whl "${PKGS[@]}" >> "$OUT/install.log" 2>&1; then
    STATUS="ok"
  else
    STATUS="failed rc=$? (see $OUT/install.log)"
  fi
  SUMMARY="$(( $(date +%s) - start )) s; $("$PYTHON" - <<'PY' 2>&1 | tail -1
import importlib
found = []
for name in ("torch", "transformers", "ray", "deepspeed", "math_verify", "vllm"):
    try:
        found.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # noqa: BLE001 - report whatever is missing
        found.append(f"{name} missing ({type(e).__name__})")
print(", ".join(found))
PY
)"
  echo "install: $STATUS; $SUMMARY"
fi
"$PYTHON" -m launch.gpu_check --out "$OUT" --budget-s "$BUDGET" \
  --install-status "$STATUS" --install-summary "$SUMMARY" "${ARGS[@]}"
