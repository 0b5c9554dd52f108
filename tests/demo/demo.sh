#!/usr/bin/env bash
# `make demo`: the main job end to end on this machine, with real peers.
#
#   1. a local MLflow server (from the project venv) with the bundled tiny Phi-3 registered
#      as a pyfunc wrapper, the way the Phi-3 cookbook logs it, in stage Production;
#   2. Mosquitto, when it is installed, with a subscriber watching the device's topics;
#   3. `edgeflow run` with an empty cache: it pulls, verifies, smoke-tests and serves;
#   4. a question over the Unix socket with the openai SDK, the answer streamed;
#   5. a health message as the fleet console receives it;
#   6. a second version promoted to Production and the hot swap, seen by a new request;
#   7. everything it started, stopped.
#
# The model has random weights (real Phi-3 weights cannot be downloaded here): the answer
# is fluent nonsense, but every byte of it came through the real pipeline.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROOT=$PWD
BIN=$ROOT/target/release/edgeflow
PY=$ROOT/.venv/test/bin/python
WORK=$ROOT/.demo
DEVICE=demo-device
rm -rf "$WORK"
mkdir -p "$WORK/mlflow"

pids=()
cleanup() {
  set +e
  [[ -n "${DAEMON:-}" ]] && kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  # Closing the MLflow wrapper's stdin makes it stop the whole server process group.
  exec 9>&- 2>/dev/null
  wait 2>/dev/null
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for ((i = 0; i < limit * 5; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "demo: timed out waiting for $what" >&2
  [[ -f $WORK/daemon.log ]] && tail -20 "$WORK/daemon.log" >&2
  return 1
}
status_json() { "$BIN" status --socket "$WORK/api.sock" --json; }
serving() { status_json | "$PY" -c 'import json,sys; sys.exit(json.load(sys.stdin)["serving"]["version"] != sys.argv[1])' "$1"; }

say "1. MLflow server with the tiny Phi-3 in Production"
MLFLOW_PORT=$(free_port)
# The wrapper stops the server (and its workers) when its stdin closes; this script holds the
# write end of a FIFO on fd 9 until cleanup.
mkfifo "$WORK/mlflow.stdin"
"$PY" tests/mlflow/serve.py --port "$MLFLOW_PORT" --dir "$WORK/mlflow" <"$WORK/mlflow.stdin" >"$WORK/mlflow.out" 2>&1 &
exec 9>"$WORK/mlflow.stdin"
MLFLOW=http://127.0.0.1:$MLFLOW_PORT
wait_for 120 "the MLflow server" curl -sf "$MLFLOW/health"
log_model() {
  MLFLOW_ENABLE_ASYNC_LOGGING=false GIT_PYTHON_REFRESH=quiet "$PY" tests/mlflow/log_model.py \
    --tracking-uri "$MLFLOW" --name phi-3 --model-dir "$1" --flavor "$2" --stage Production 2>>"$WORK/mlflow.out" | tail -1
}
log_model tests/fixtures/models/phi3-tiny-gqa pyfunc
echo "MLflow at $MLFLOW: registered model phi-3 version 1 (pyfunc wrapper) in stage Production"

FLEET=""
if command -v mosquitto >/dev/null && command -v mosquitto_sub >/dev/null; then
  say "2. Mosquitto broker and a fleet-console subscriber"
  MQTT_PORT=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$MQTT_PORT" >"$WORK/mosquitto.conf"
  mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
  pids+=($!)
  wait_for 10 "mosquitto" "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $MQTT_PORT))"
  mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -v -t "edgeflow/$DEVICE/#" >"$WORK/mqtt.txt" 2>/dev/null &
  pids+=($!)
  FLEET=$(printf '[fleet]\nbroker = "mqtt://127.0.0.1:%s"\ndevice_id = "%s"\nspool_dir = "%s"\nreport_interval = "5s"\n' "$MQTT_PORT" "$DEVICE" "$WORK/spool")
  echo "broker mqtt://127.0.0.1:$MQTT_PORT; watching edgeflow/$DEVICE/#"
else
  say "2. Mosquitto is not installed (apt-get install mosquitto mosquitto-clients): no fleet link in this demo"
fi

say "3. edgeflow run, empty cache"
cat >"$WORK/config.toml" <<EOF
[engine]
ort_lib = "$ROOT/.ort/$(uname -m)/libonnxruntime.so"
[registry]
url = "$MLFLOW"
model = "phi-3"
stage = "Production"
poll_interval = "3s"
[cache]
dir = "$WORK/cache"
[serve]
socket = "$WORK/api.sock"
$FLEET
EOF
"$BIN" check-config --config "$WORK/config.toml"
"$BIN" --log info run --config "$WORK/config.toml" 2>"$WORK/daemon.log" &
DAEMON=$!
wait_for 120 "version 1 to serve" serving 1
"$BIN" status --socket "$WORK/api.sock"

say "4. A question over the socket (openai SDK, streamed)"
"$PY" tests/demo/ask.py "$WORK/api.sock" "What is an edge device?"

if [[ -n $FLEET ]]; then
  say "5. Health as the fleet console receives it (edgeflow/$DEVICE/health)"
  # The first report after the question: it carries the model and the request.
  served_health() { grep "^edgeflow/$DEVICE/health " "$WORK/mqtt.txt" | cut -d' ' -f2- | grep '"model":{' | grep -v '"total":0' | head -1; }
  has_served_health() { [[ -n $(served_health) ]]; }
  wait_for 30 "a health message with the request" has_served_health
  served_health | "$PY" -c '
import json, sys
h = json.load(sys.stdin)
keep = {k: h[k] for k in ("schema", "device", "ts", "model", "host", "requests", "registry") if k in h}
print(json.dumps(keep, indent=2)[:2500])'
fi

say "6. Version 2 promoted to Production (onnx flavor): hot swap"
log_model tests/fixtures/models/phi3-tiny-mha onnx
wait_for 120 "version 2 to serve" serving 2
"$BIN" status --socket "$WORK/api.sock"
"$PY" tests/demo/ask.py "$WORK/api.sock" "And now?"
if [[ -n $FLEET ]]; then
  echo "events the fleet console saw:"
  grep "^edgeflow/$DEVICE/events " "$WORK/mqtt.txt" | cut -d' ' -f2- | "$PY" -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    print("  ", e.get("event"), {k: v for k, v in e.items() if k in ("version", "previous", "reason")})'
fi

say "7. SIGTERM: in-flight requests finish, offline is published, exit 0"
kill -TERM "$DAEMON"
wait "$DAEMON"
echo "edgeflow exited with status $?"
DAEMON=""
[[ -n $FLEET ]] && sleep 0.5 && grep "^edgeflow/$DEVICE/status " "$WORK/mqtt.txt" | tail -1
echo
echo "demo complete; logs in $WORK"
