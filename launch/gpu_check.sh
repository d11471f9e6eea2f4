#!/usr/bin/env bash
# The GPU check, ready to fire on a lent GPU machine (README "GPU"). With the device tool:
#   run  carry: [".whl"]  command: bash launch/gpu_check.sh
# (build .whl first here: make gpu-wheels). On the machine it
#   1. installs ray, deepspeed and math-verify from the carried .whl/ (no index is reachable);
#   2-5. runs python -m launch.gpu_check: learner MFU, engine tok/s by batch, weight sync vs
#        memcpy, the embedded default end to end, each step under its own time cap;
#   6. prints the table and writes it to $OUT/gpu_check.json (+ .md, and every step's log).
# Rehearsal anywhere, no wheels and no CUDA, tiny shapes:
#   bash launch/gpu_check.sh --cpu-rehearsal [--steps engine,sync]
# Environment: PYTHON (default python3), OUT (default runs/gpu_check), GPU_CHECK_BUDGET_S (default 600:
# the whole run's bound; the device time is 15 minutes in all, machine start included).
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu_check}"
BUDGET="${GPU_CHECK_BUDGET_S:-600}"
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
  export CUDA_VISIBLE_DEVICES=""
  STATUS="skipped (cpu rehearsal)"
  SUMMARY="uses this environment's packages"
else
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
  start=$(date +%s)
  # --no-index: only the carried wheels; what is already installed (torch, transformers) stays.
  if timeout 180 "$PYTHON" -m pip install --no-index --find-links .whl \
      ray==2.60.0 deepspeed==0.19.8 math-verify==0.9.0 > "$OUT/install.log" 2>&1; then
    STATUS="ok"
  else
    STATUS="failed rc=$?"
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
