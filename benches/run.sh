#!/usr/bin/env bash
# `make bench`: edgeflow's engine side by side with onnxruntime-genai (the reference runtime).
#
#   benches/run.sh [--build-phi3] [engine_bench.py options...]
#   benches/run.sh --prefix [prefix_bench.py options...]   (`make bench-prefix`)
#   benches/run.sh --batch [batch_bench.py options...]     (`make bench-batch`)
#
# - sets up .venv/bench (onnxruntime-genai 0.18.0, which pulls onnxruntime 1.32.0, tokenizers,
#   numpy) when missing;
# - builds target/release/edgeflow when missing or older than its sources;
# - benches the tiny GQA fixture and, when present, the Phi-3-mini-shaped int4 model in
#   .models/phi3-mini-int4 (with --build-phi3 it is built first, which needs .venv/gen and
#   about an hour); results go to .bench/engine.json.
# Other options go to benches/engine_bench.py (--threads N, --runs N, --only tiny|phi3-mini,
# --model NAME=DIR, --warmup N, --no-bandwidth; see --help).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
arch="$(uname -m)"
venv="$root/.venv/bench"
phi3="$root/.models/phi3-mini-int4"
GENAI_VERSION="0.18.0"

build_phi3=0
prefix=0
batch=0
args=()
for a in "$@"; do
  case "$a" in
    --build-phi3) build_phi3=1 ;;
    --prefix) prefix=1 ;;
    --batch) batch=1 ;;
    *) args+=("$a") ;;
  esac
done

# 1. Python environment for the reference runtime.
if ! "$venv/bin/python" -c "import onnxruntime_genai as og, tokenizers, numpy; assert og.__version__ == '$GENAI_VERSION'" 2>/dev/null; then
  echo "== setting up $venv (onnxruntime-genai==$GENAI_VERSION, tokenizers, numpy)"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "onnxruntime-genai==$GENAI_VERSION" tokenizers numpy
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
has_model=0
for a in "${args[@]+"${args[@]}"}"; do [[ $a == --model || $a == --model=* ]] && has_model=1; done
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
if [[ $has_model == 0 && ! -f "$phi3/genai_config.json" ]]; then
  if [[ $build_phi3 == 1 ]]; then
    if [[ ! -x "$root/.venv/gen/bin/python" ]]; then
      echo "benches/run.sh: --build-phi3 needs .venv/gen (torch, transformers, onnxruntime-genai's builder); see tests/gen" >&2
      exit 1
    fi
    echo "== building the Phi-3-mini-shaped int4 model into $phi3 (random weights, ~2.2 GB; ~1 h on 2 cores, peak RSS ~10 GB)"
    "$root/.venv/gen/bin/python" tests/gen/make_model.py --preset phi3-mini
  else
    echo "== $phi3 not found: benching the tiny model only."
    echo "   To include the Phi-3-mini-shaped int4 model (~2.2 GB, random weights; ~1 h and ~10 GB RAM on 2 cores), build it once with"
    echo "     .venv/gen/bin/python tests/gen/make_model.py --preset phi3-mini"
    echo "   or run: benches/run.sh --build-phi3"
    only=0
    for a in "${args[@]+"${args[@]}"}"; do [[ $a == --only || $a == --only=* ]] && only=1; done
    [[ $only == 1 ]] || args+=(--only tiny)
  fi
fi

# 4. The benchmark.
exec "$venv/bin/python" benches/engine_bench.py "${args[@]+"${args[@]}"}"
