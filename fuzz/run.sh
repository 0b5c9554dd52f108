#!/usr/bin/env bash
# Runs every fuzz target (or those named) for FUZZ_SECONDS each, one after the other, and prints
# per target: executions, corpus size, crashes. `make fuzz` calls this; see RELIABILITY.md.
#
#   FUZZ_SECONDS=120 fuzz/run.sh [target...]
#
# Each target starts from fuzz/corpus/<target> (new inputs it finds are added there: minimize
# them with `cargo +nightly fuzz cmin <target> -- -use_counters=0` before committing) and writes
# crashes, timeouts and out-of-memory inputs to fuzz/artifacts/<target>/. Logs go to
# fuzz/logs/<target>.log; dictionaries of each input format's tokens are in fuzz/dict/.
set -euo pipefail

cd "$(dirname "$0")"
SECONDS_EACH=${FUZZ_SECONDS:-60}
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
CARGO=(cargo "+$TOOLCHAIN")

if ! "${CARGO[@]}" fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz (crates.io)"
    cargo install cargo-fuzz --locked
fi

if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <("${CARGO[@]}" fuzz list)
fi

# The dictionary of tokens each target's input is made of (libFuzzer splices them in).
dict_of() {
    case "$1" in
        openai_request | mqtt_command | registry_json | genai_config) echo dict/json.dict ;;
        mlmodel_yaml) echo dict/yaml.dict ;;
        config_toml) echo dict/toml.dict ;;
        chat_template) echo dict/jinja.dict ;;
    esac
}

"${CARGO[@]}" fuzz build
mkdir -p logs
printf '%-16s %8s %12s %8s %8s %8s\n' target seconds executions exec/s corpus crashes
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    status=0
    dict=$(dict_of "$t")
    # -timeout: a single input running longer is a finding; -rss_limit_mb: so is memory past it.
    "${CARGO[@]}" fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 ${dict:+"-dict=$dict"} \
        >"logs/$t.log" 2>&1 || status=$?
    after=$(find "artifacts/$t" -type f | wc -l)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "logs/$t.log" | tail -1)
    corpus=$(find "corpus/$t" -type f | wc -l)
    crashes=$((after - before))
    printf '%-16s %8s %12s %8s %8s %8s\n' "$t" "$SECONDS_EACH" "${runs:-?}" "${rate:-?}" "$corpus" "$crashes"
    if ((status != 0 || crashes > 0)); then
        failed=1
        grep -E '^==[0-9]+== ERROR|^SUMMARY|panicked at|Test unit written to' "logs/$t.log" | head -4 | sed 's/^/    /' || true
    fi
done
exit "$failed"
