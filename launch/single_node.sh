#!/usr/bin/env bash
# Single-node launch: start a private Ray head on loopback (its own free ports and its own temp
# dir), submit the training job to it with `ray job submit`, and stop that head (and only it).
#
#   launch/single_node.sh [CONFIG] [section.key=value ...]
#   launch/single_node.sh tiny-cpu train.iterations=2 run.dir=/tmp/run
#
# Interpreter: .venv/bin/python of the repo if it exists, else $PYTHON, else `python` on PATH;
# always used by its absolute path. The head is started with that interpreter's `ray`, so the
# actors run on it, and the job's entrypoint names it explicitly: the job runs in Ray's unpacked
# copy of the working dir, where a relative `.venv/bin/python` does not exist.
# The head's dashboard (job API) listens on 127.0.0.1 only; nothing is exposed off the machine.
# Two runs (or users) on one machine do not collide: each head gets free ports and a temp dir of
# its own, and the clean-up stops that head alone (never `ray stop`, which stops every Ray of the
# user). Without run.dir=..., the run directory is runs/CONFIG-TIME in this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then PY="$PWD/.venv/bin/python"; else PY="$(command -v "${PYTHON:-python}")"; fi
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"   # absolute, also when $PYTHON was relative
RAY="$(dirname "$PY")/ray"
[[ -x "$RAY" ]] || { echo "single_node.sh: no ray next to $PY (install the repo's dependencies: make install)" >&2; exit 2; }

CONFIG_ARGS=()
if [[ $# -gt 0 && "$1" != *=* ]]; then CONFIG_ARGS=(--config "$1"); shift; fi
# The job runs in Ray's unpacked copy of the repo, which goes with the head: without a run.dir
# the run writes under this checkout's runs/ (absolute), not under the copy.
RUN_ARGS=()
[[ " $* " == *" run.dir="* || " $* " == *" --resume "* ]] ||
  RUN_ARGS=("run.dir=$PWD/runs/$(basename "${CONFIG_ARGS[1]:-tiny-cpu}" .yaml)-$(date +%Y%m%d-%H%M%S)")

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"   # loopback-only head; see README "Security"
unset RAY_ADDRESS   # submit to this script's head, never to another cluster of the user

# Validate the config and check this machine (launch.placement.preflight: GPUs, vLLM, model, GPU
# memory of a colocated run, a contradicting DS_ACCELERATOR) before starting anything. Then give
# the head the CPUs the run reserves (Ray would otherwise wait for resources this machine does not
# advertise), and the job the learner's accelerator as the config's placement decides it (a GPU
# merely being visible does not move a CPU preset's learner to CUDA).
PLAN="$("$PY" -m launch.single_node_plan "${CONFIG_ARGS[@]}" "$@" "${RUN_ARGS[@]}")" || exit 2
read -r NUM_CPUS DS_ACCELERATOR <<< "$PLAN"
export DS_ACCELERATOR

HEAD_PID="" RAY_TMP="" HEAD_LOG=""
stop_head() {   # stop this script's head (and only it), remove its temp dir
  if [[ -n "$HEAD_PID" ]] && kill -0 "$HEAD_PID" 2>/dev/null; then
    kill -TERM "$HEAD_PID" 2>/dev/null || true   # `ray start --block` stops its own processes on SIGTERM
    for _ in $(seq 240); do kill -0 "$HEAD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$HEAD_PID" 2>/dev/null || true   # still there after 120 s: its whole process group
  fi
  wait "$HEAD_PID" 2>/dev/null || true
  [[ -z "$RAY_TMP" ]] || rm -rf "$RAY_TMP"
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_head
  if [[ $rc == 0 ]]; then rm -f "$HEAD_LOG"; elif [[ -n "$HEAD_LOG" ]]; then echo "single_node.sh: Ray head log kept in $HEAD_LOG" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_head() {  # a head on free loopback ports with a temp dir of its own; sets HEAD_PID, DASH, RAY_TMP
  # Ray's default ports are fixed numbers, so two heads would collide: take free ones. Short
  # temp dir: Ray's socket paths must fit in 107 bytes.
  local gcs agent_http agent_grpc metrics client runtime_env_agent
  read -r gcs DASH agent_http agent_grpc metrics client runtime_env_agent < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(7)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
  RAY_TMP="$(mktemp -d /tmp/dashray.XXXXXX)"
  HEAD_LOG="$RAY_TMP.head.log"
  # --block keeps the head in the foreground: SIGTERM to it stops exactly this cluster. setsid
  # gives it a process group of its own (the script's Ctrl-C is handled by the trap).
  setsid "$RAY" start --head --block --node-ip-address=127.0.0.1 --port="$gcs" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASH" --include-dashboard=true \
    --dashboard-agent-listen-port="$agent_http" --dashboard-agent-grpc-port="$agent_grpc" \
    --metrics-export-port="$metrics" --ray-client-server-port="$client" --runtime-env-agent-port="$runtime_env_agent" \
    --num-cpus="$NUM_CPUS" --disable-usage-stats --temp-dir="$RAY_TMP" >"$HEAD_LOG" 2>&1 &
  HEAD_PID=$!
  echo "single_node.sh: Ray head on 127.0.0.1 (GCS port $gcs, job API port $DASH), temp dir $RAY_TMP, interpreter $PY"
}

submit() {  # submit the job to the head; prints its id, or nothing if the job API refused it
  "$RAY" job submit --address "http://127.0.0.1:$DASH" --no-wait --working-dir . \
    --runtime-env-json "{\"env_vars\": {\"DS_ACCELERATOR\": \"$DS_ACCELERATOR\"}}" \
    -- "$PY" -m launch.train "${CONFIG_ARGS[@]}" "$@" "${RUN_ARGS[@]}" 2>&1 | grep -o "raysubmit_[A-Za-z0-9]*" | head -1 || true
}

# The job API answers a little after the head starts, and the first submissions are refused
# until the dashboard agent registers ("No available agent"): retry for at most 180 s. A head
# that dies while starting (Ray gives its raylet 30 s to register, which a loaded machine can
# miss) is started again, at most 3 times in all.
JOB_ID=""
for attempt in 1 2 3; do
  start_head
  deadline=$((SECONDS + 180))
  # `ray start --block` prints this once its node has registered; before that the head may still exit.
  until grep -q "will now block forever" "$HEAD_LOG" || ! kill -0 "$HEAD_PID" 2>/dev/null || (( SECONDS >= deadline )); do
    sleep 0.5
  done
  while kill -0 "$HEAD_PID" 2>/dev/null && (( SECONDS < deadline )); do
    JOB_ID="$(submit "$@")"
    [[ -z "$JOB_ID" ]] || break 2
    sleep 1
  done
  if kill -0 "$HEAD_PID" 2>/dev/null; then
    echo "single_node.sh: the Ray job API on 127.0.0.1:$DASH did not accept the job within 180 s" >&2
    exit 1
  fi
  echo "single_node.sh: the Ray head exited while starting (attempt $attempt of 3); its log:" >&2
  tail -5 "$HEAD_LOG" >&2
  stop_head
  (( attempt == 3 )) || rm -f "$HEAD_LOG"
done
[[ -n "$JOB_ID" ]] || { echo "single_node.sh: no Ray head could be started" >&2; exit 1; }
ADDRESS="http://127.0.0.1:$DASH"
echo "single_node.sh: submitted $JOB_ID to $ADDRESS"
"$RAY" job logs --address "$ADDRESS" --follow "$JOB_ID"
# `ray job status` ends with "Job '<id>' succeeded" (or failed / was stopped).
STATUS="$("$RAY" job status --address "$ADDRESS" "$JOB_ID" 2>&1 || true)"
if [[ "$STATUS" == *"Job '$JOB_ID' succeeded"* ]]; then
  echo "single_node.sh: job $JOB_ID SUCCEEDED"
else
  echo "single_node.sh: job $JOB_ID did not succeed (ray job status --address $ADDRESS $JOB_ID while the head runs)" >&2
  exit 1
fi
