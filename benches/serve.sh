#!/usr/bin/env bash
# Serving overhead of the local API (issue 4): a streamed request over the Unix socket vs the
# engine called directly, and 1/4/16 concurrent clients. See BENCHMARKS.md.
#
#   benches/serve.sh [serve_overhead options...]
#
# Benches the tiny GQA fixture and, when present, the Phi-3-mini-shaped int4 model in
# .models/phi3-mini-int4 (see benches/run.sh for how to build it). Results: .bench/serve.json
# and a Markdown report on stdout. Options (see benches/serve_overhead.rs): --runs N,
# --concurrency 1,4,16, --requests-per-client N, --threads N, --stream-interval DURATION, --engine-nice N,
# --model NAME=DIR:TOKENS:CONC_TOKENS.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
arch="$(uname -m)"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$root/.ort/$arch/libonnxruntime.so}"
[[ -f "$ORT_DYLIB_PATH" ]] || cross/fetch-ort.sh "$arch"

target="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release --locked --bin edgeflow
cargo build --release --locked --bench serve_overhead
bench="$(ls -t "$target"/release/deps/serve_overhead-* | grep -v '\.d$' | head -1)"

echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
if [[ " $* " == *" --model "* ]]; then
  exec "$bench" --bin "$target/release/edgeflow" --out .bench/serve.json "$@"
fi
# tiny: 128 new tokens for the overhead runs and the concurrent clients. With the defaults
# (text paced at 5 ms, engine threads at nice +5), then each of the two off, then both off.
tiny="phi3-tiny-gqa=tests/fixtures/models/phi3-tiny-gqa:128:128"
"$bench" --bin "$target/release/edgeflow" --out .bench/serve-tiny.json --model "$tiny" "$@"
"$bench" --bin "$target/release/edgeflow" --out .bench/serve-tiny-nice0.json --engine-nice 0 --model "$tiny" "$@"
"$bench" --bin "$target/release/edgeflow" --out .bench/serve-tiny-unpaced.json --stream-interval 0ms --model "$tiny" "$@"
"$bench" --bin "$target/release/edgeflow" --out .bench/serve-tiny-unpaced-nice0.json --stream-interval 0ms --engine-nice 0 --model "$tiny" "$@"
if [[ -f .models/phi3-mini-int4/genai_config.json ]]; then
  # Phi-3-mini int4 makes a few tokens/s on 2 cores: 32 tokens per overhead run, 16 per
  # concurrent request, fewer runs, so the whole bench takes minutes rather than an hour.
  "$bench" --bin "$target/release/edgeflow" --out .bench/serve-phi3-mini.json --runs 7 --requests-per-client 2 \
    --model "phi3-mini-int4=.models/phi3-mini-int4:32:16" "$@"
else
  echo "== .models/phi3-mini-int4 not found: benched the tiny model only" >&2
fi
