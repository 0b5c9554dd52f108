#!/usr/bin/env bash
# `make bench`: edgeflow's engine side by side with onnxruntime-genai (the reference runtime).
#
#   benches/run.sh [engine_bench.py options...]
#   benches/run.sh --prefix [prefix_bench.py options...]   (`make bench-prefix`)
#   benches/run.sh --batch [batch_bench.py options...]     (`make bench-batch`)
#
# - sets up .venv/bench from benches/requirements.txt (pinned: onnxruntime-genai 0.18.0,
#   onnxruntime 1.32.0, tokenizers, numpy, onnx), again whenever that file changes;
# - builds the Phi-3-mini-shaped int4 model into .models/phi3-mini-int4 when missing
#   (tests/gen/phi3_mini.py: random weights, 2.7 GB, ~20 s);
# - builds target/release/edgeflow when missing or older than its sources;
# - benches the tiny GQA fixture and the Phi-3-mini-shaped model (the prefix and batch benches:
#   SmolLM2 from `make smollm2` too); results go to .bench/*.json.
# Other options go to the bench script (--threads N, --runs N, --only tiny|smollm2|phi3-mini,
# --model NAME=DIR replaces the default models, ...; see its --help).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
arch="$(uname -m)"
venv="$root/.venv/bench"
phi3="$root/.models/phi3-mini-int4"
GENAI_VERSION="0.18.0"

prefix=0
batch=0
args=()
for a in "$@"; do
  case "$a" in
    --build-phi3) ;;  # accepted for old command lines: the model is built when missing
    --prefix) prefix=1 ;;
    --batch) batch=1 ;;
    *) args+=("$a") ;;
  esac
done

# 1. Python environment for the reference runtime and the model builder, from pinned
#    requirements (recreated when benches/requirements.txt changes).
req="$root/benches/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "== setting up $venv from benches/requirements.txt (onnxruntime-genai==$GENAI_VERSION, onnx, tokenizers, numpy)"
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$req"
  "$venv/bin/python" -c "import onnxruntime_genai as og, onnx, tokenizers, numpy; assert og.__version__ == '$GENAI_VERSION'"
  echo "$want" > "$stamp"
fi

# The Phi-3-mini-shaped int4 model (random weights, 2.7 GB) is built on first use by
# tests/gen/phi3_mini.py (numpy + onnx, ~20 s, a few hundred MB of RAM), unless --model names
# the models to bench.
has_model=0
for a in "${args[@]+"${args[@]}"}"; do [[ $a == --model || $a == --model=* ]] && has_model=1; done
if [[ $has_model == 0 && ! -f "$phi3/genai_config.json" ]]; then
  echo "== building the Phi-3-mini-shaped int4 model into $phi3 (tests/gen/phi3_mini.py)"
  "$venv/bin/python" tests/gen/phi3_mini.py --out "$phi3"
fi

# 2. ONNX Runtime for edgeflow, and the release binary.
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/.ort/$arch/libonnxruntime.so}"
if [[ ! -f "$ORT_DYLIB_PATH" ]]; then
  cross/fetch-ort.sh "$arch"
fi
# (--edgeflow PATH benches that binary instead and skips the build.)
bin="$root/target/release/edgeflow"
custom_bin=0
for a in "${args[@]+"${args[@]}"}"; do [[ $a == --edgeflow || $a == --edgeflow=* ]] && custom_bin=1; done
if [[ $custom_bin == 1 ]]; then
  :
elif [[ ! -x "$bin" ]] || [[ -n "$(find src Cargo.toml Cargo.lock -newer "$bin" -print -quit 2>/dev/null)" ]]; then
  echo "== building $bin"
  cargo build --release --locked
fi

# 3. Models (--model NAME=DIR replaces the defaults).
if [[ $prefix == 1 || $batch == 1 ]]; then
  # Prefix reuse and batching: the trained model (make smollm2), when built Phi-3-mini, and
  # for prefix reuse the tiny fixture.
  if [[ $has_model == 0 ]]; then
    [[ $prefix == 1 ]] && args+=(--model "phi3-tiny-gqa=tests/fixtures/models/phi3-tiny-gqa")
    [[ -f .models/smollm2-135m-instruct/genai_config.json ]] && args+=(--model "smollm2=.models/smollm2-135m-instruct")
    [[ -f "$phi3/genai_config.json" ]] && args+=(--model "phi3-mini-int4=$phi3")
  fi
  [[ $custom_bin == 1 ]] || args+=(--edgeflow "$bin")
  script=benches/prefix_bench.py
  [[ $batch == 1 ]] && script=benches/batch_bench.py
  exec "$venv/bin/python" "$script" --genai-python "$venv/bin/python" "${args[@]+"${args[@]}"}"
fi
tiny="$root/tests/fixtures/models/phi3-tiny-gqa"
if [[ $has_model == 0 && ! -f "$tiny/genai_config.json" ]]; then
  echo "benches/run.sh: the tiny fixture $tiny is missing (make models regenerates the fixtures)" >&2
  exit 1
fi
# 4. The benchmark.
exec "$venv/bin/python" benches/engine_bench.py "${args[@]+"${args[@]}"}"
