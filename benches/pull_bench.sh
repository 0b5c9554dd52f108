#!/usr/bin/env bash
# Registry pull benchmark (issue 3): the same model folder from the same local `mlflow
# server`, in the same run, fetched by
#   - `edgeflow pull` (stream to disk + sha256 + fsync + publish; timed to "downloaded and
#     verified", and end to end including the smoke test),
#   - `curl` (one process, every file, to disk: the transport ceiling),
#   - `mlflow artifacts download` (MLflow's Python client).
#
#   benches/pull_bench.sh [--model-dir DIR] [--rounds N]
#
# EDGEFLOW_BIN=path uses that binary instead of (re)building target/release/edgeflow.
#
# The model is .models/phi3-mini-int4 (the Phi-3-mini-shaped int4 model of the engine
# benchmark, about 2.7 GB) when present; otherwise a ≥ 256 MB folder made from the tiny
# fixture plus a padding file (the engine ignores extra files). Results: .bench/pull.md.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
rounds=3
model_dir=""
while (($#)); do
  case "$1" in
    --model-dir) model_dir="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    *) echo "usage: $0 [--model-dir DIR] [--rounds N]" >&2; exit 64 ;;
  esac
done

make --no-print-directory venv ort >/dev/null
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/.ort/$(uname -m)/libonnxruntime.so}"
bin="${EDGEFLOW_BIN:-$root/target/release/edgeflow}"
if [[ -z "${EDGEFLOW_BIN:-}" ]] && { [[ ! -x "$bin" ]] || [[ -n "$(find src Cargo.toml Cargo.lock -newer "$bin" -print -quit 2>/dev/null)" ]]; }; then
  cargo build --release --locked
fi
py="$root/.venv/test/bin/python"
mkdir -p .bench
work="$(mktemp -d "$root/.bench/pull.XXXXXX")"
trap 'rm -rf "$work"' EXIT

if [[ -z "$model_dir" ]]; then
  if [[ -f .models/phi3-mini-int4/genai_config.json ]]; then
    model_dir=.models/phi3-mini-int4
    model_kind="Phi-3-mini-shaped int4 model (.models/phi3-mini-int4)"
  else
    model_dir="$work/synthetic"
    mkdir -p "$model_dir"
    cp tests/fixtures/models/phi3-tiny-gqa/* "$model_dir/"
    head -c $((256 << 20)) /dev/urandom > "$model_dir/padding.bin"
    model_kind="generated: tiny fixture + 256 MiB padding file"
  fi
else
  model_kind="$model_dir"
fi
filebytes() { find "$1" -type f -printf '%s\n' | awk '{s += $1} END {printf "%.0f\n", s}'; }
bytes=$(filebytes "$model_dir")

# The server lives as long as fd 3 is open (tests/mlflow/serve.py reads its stdin).
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/server"
exec 3> >("$py" tests/mlflow/serve.py --port "$port" --dir "$work/server")
url="http://127.0.0.1:$port"
for _ in $(seq 1 240); do curl -sf "$url/health" >/dev/null && break; sleep 0.5; done
curl -sf "$url/health" >/dev/null || { echo "mlflow server did not start" >&2; cat "$work/server/server.log" >&2; exit 1; }

echo "== logging $model_dir ($bytes bytes) as a pyfunc model"
logged=$("$py" tests/mlflow/log_model.py --tracking-uri "$url" --name bench --model-dir "$model_dir" --flavor pyfunc --alias bench 2>/dev/null | tail -1)
version=$("$py" -c 'import json,sys; print(json.loads(sys.argv[1])["version"])' "$logged")

# The ONNX folder's files and URLs, from the registry (as edgeflow finds them).
read -r folder_uri < <("$py" - "$url" "$version" <<'EOF'
import json, sys, urllib.request
base, version = sys.argv[1], sys.argv[2]
get = lambda p: json.load(urllib.request.urlopen(base + p))
root = get(f"/api/2.0/mlflow/model-versions/get-download-uri?name=bench&version={version}")["artifact_uri"]
sub = get("/api/2.0/mlflow-artifacts/artifacts?path=" + root.split(":", 1)[1].lstrip("/") + "/artifacts")["files"][0]["path"]
print(f"{root}/artifacts/{sub}")
EOF
)
folder_path="${folder_uri#mlflow-artifacts:}"; folder_path="${folder_path#/}"
mapfile -t files < <(curl -sf "$url/api/2.0/mlflow-artifacts/artifacts?path=$folder_path" | "$py" -c 'import json,sys; [print(f["path"]) for f in json.load(sys.stdin)["files"]]')
curl_args=()
for f in "${files[@]}"; do curl_args+=(-o "$work/curl/$f" "$url/api/2.0/mlflow-artifacts/artifacts/$folder_path/$f"); done

now() { date +%s%N; }
secs() { printf "%d.%09d" $(( ($2 - $1) / 1000000000 )) $(( ($2 - $1) % 1000000000 )); }
declare -a t_curl t_mlflow t_ef t_ef_total
for r in $(seq 1 "$rounds"); do
  echo "== round $r/$rounds"
  rm -rf "$work/curl" "$work/mlflow" "$work/cache"; sync
  s=$(now); curl -sf --create-dirs "${curl_args[@]}"; e=$(now)
  t_curl+=("$(secs "$s" "$e")")
  got=$(filebytes "$work/curl"); [[ "$got" == "$bytes" ]] || { echo "curl got $got of $bytes bytes" >&2; exit 1; }
  rm -rf "$work/curl"; sync

  s=$(now); MLFLOW_TRACKING_URI="$url" "$root/.venv/test/bin/mlflow" artifacts download --artifact-uri "$folder_uri" --dst-path "$work/mlflow" >/dev/null 2>&1; e=$(now)
  t_mlflow+=("$(secs "$s" "$e")")
  got=$(filebytes "$work/mlflow"); [[ "$got" == "$bytes" ]] || { echo "mlflow got $got of $bytes bytes" >&2; exit 1; }
  rm -rf "$work/mlflow"; sync

  s=$(now)
  "$bin" pull --registry-url "$url" --model bench --alias bench --cache-dir "$work/cache" >"$work/ef.out" 2>"$work/ef.err"
  e=$(now)
  t_ef_total+=("$(secs "$s" "$e")")
  t_ef+=("$(sed -n 's/^downloaded and verified .* in \([0-9.]*\)s .*/\1/p' "$work/ef.err")")
  [[ -n "${t_ef[-1]}" ]] || { cat "$work/ef.err" >&2; exit 1; }
  "$bin" cache verify --cache-dir "$work/cache" >/dev/null
done

"$py" - "$bytes" "$model_kind" "$rounds" "${t_curl[*]}" "${t_mlflow[*]}" "${t_ef[*]}" "${t_ef_total[*]}" <<'EOF' | tee .bench/pull.md
import platform, statistics, subprocess, sys
size, kind, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
series = {k: [float(x) for x in v.split()] for k, v in zip(["curl", "mlflow", "edgeflow", "edgeflow_total"], sys.argv[4:8])}
med = {k: statistics.median(v) for k, v in series.items()}
mbs = lambda t: size / t / 1e6
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(f"Model: {kind}, {size / 1e6:.0f} MB; {rounds} rounds, medians; server: mlflow 3.17.2 `mlflow server --serve-artifacts` on 127.0.0.1 (2 uvicorn workers, sqlite backend, local artifacts), same run for all three.")
print(f"Machine: {cpu}, {subprocess.getoutput('nproc')} cores, Linux {platform.release()}.")
print()
print("| client | median time (s) | MB/s | vs curl | all rounds (s) |")
print("|---|---:|---:|---:|---|")
rows = [("curl (one process, all files, to disk)", "curl"),
        ("`mlflow artifacts download` (Python client)", "mlflow"),
        ("`edgeflow pull`: download + sha256 + fsync + publish", "edgeflow"),
        ("`edgeflow pull`: end to end (incl. smoke test: load + 4 tokens)", "edgeflow_total")]
for name, k in rows:
    print(f"| {name} | {med[k]:.2f} | {mbs(med[k]):.0f} | {med['curl'] / med[k]:.2f}x | {' '.join(f'{x:.2f}' for x in series[k])} |")
print()
print(f"edgeflow vs curl throughput: {med['curl'] / med['edgeflow']:.2f}x (target >= 0.9x); "
      f"edgeflow vs the Python client: {med['mlflow'] / med['edgeflow']:.2f}x (target >= 2x).")
EOF
