#!/usr/bin/env bash
# Single-node launch: start a local Ray head if none is running, submit the training job to it,
# and stop only what this script started.
#
#   launch/single_node.sh [CONFIG] [section.key=value ...]
#   launch/single_node.sh tiny-cpu train.iterations=3
#
# The head's dashboard (job API) listens on 127.0.0.1 only; nothing is exposed off the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
RAY="$(dirname "$PY")/ray"
export PATH="$(dirname "$PY"):$PATH"   # the job's `python` is the one ray runs on
command -v "$RAY" >/dev/null 2>&1 || RAY=ray

CONFIG_ARGS=()
if [[ $# -gt 0 && "$1" != *=* ]]; then CONFIG_ARGS=(--config "$1"); shift; fi

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"   # loopback-only head; see README "Security"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PORT="${DASH_DASHBOARD_PORT:-8265}"
STARTED=0
if ! "$RAY" status >/dev/null 2>&1; then
  "$RAY" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --dashboard-port="$PORT" \
    --include-dashboard=true --disable-usage-stats >/dev/null
  STARTED=1
fi
cleanup() { if [[ $STARTED == 1 ]]; then "$RAY" stop --force >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT INT TERM
"$RAY" job submit --address "http://127.0.0.1:$PORT" --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"DS_ACCELERATOR\": \"$DS_ACCELERATOR\"}}" \
  -- python -m launch.train "${CONFIG_ARGS[@]}" "$@"
