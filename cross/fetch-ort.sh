#!/usr/bin/env bash
# Obtain libonnxruntime.so for one target architecture from the official
# `onnxruntime` Python wheel, pinned by version and sha256.
#
#   cross/fetch-ort.sh [x86_64|aarch64] [DEST]     (default: this machine, .ort/<arch>)
#
# ort's own build-time download cannot work here, so edgeflow uses ort's
# `load-dynamic` feature and ships this library next to the binary
# (`lib/libonnxruntime.so`), or points at it with --ort-lib / ORT_DYLIB_PATH.
#
# armv7: Microsoft publishes no armv7 wheel; see cross/README.md.
set -euo pipefail

ORT_VERSION="1.32.0"
declare -A PLATFORM=(
  [x86_64]="manylinux_2_28_x86_64"
  [aarch64]="manylinux_2_28_aarch64"
)
# sha256 of onnxruntime-${ORT_VERSION}-cp311-cp311-<platform>.whl
declare -A WHEEL_SHA256=(
  [x86_64]="5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d"
  [aarch64]="2303372a85299b6757b0e11e1cbf13e410ddf7e10c37f4b37e99d1c90e7daf7c"
)

arch="${1:-$(uname -m)}"
case "$arch" in
  arm64) arch=aarch64 ;;
  amd64) arch=x86_64 ;;
esac
if [[ -z "${PLATFORM[$arch]:-}" ]]; then
  echo "fetch-ort: no onnxruntime wheel for architecture '$arch' (supported: ${!PLATFORM[*]})" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${2:-$root/.ort/$arch}"
lib="$dest/libonnxruntime.so"
stamp="$dest/.version"

if [[ -f "$lib" && -f "$stamp" && "$(cat "$stamp")" == "$ORT_VERSION ${WHEEL_SHA256[$arch]}" ]]; then
  exit 0
fi

python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-ort: downloading onnxruntime==$ORT_VERSION for $arch (${PLATFORM[$arch]})" >&2
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --platform "${PLATFORM[$arch]}" --python-version 3.11 --implementation cp --abi cp311 \
  --dest "$tmp" "onnxruntime==$ORT_VERSION"
wheel="$(ls "$tmp"/onnxruntime-"$ORT_VERSION"-*.whl)"
actual="$(sha256sum "$wheel" | cut -d' ' -f1)"
if [[ "$actual" != "${WHEEL_SHA256[$arch]}" ]]; then
  echo "fetch-ort: sha256 mismatch for $(basename "$wheel"): expected ${WHEEL_SHA256[$arch]}, got $actual" >&2
  exit 1
fi
"$python" - "$wheel" "$tmp/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.startswith("onnxruntime/capi/libonnxruntime.so.")]
    if len(names) != 1:
        sys.exit(f"fetch-ort: expected one libonnxruntime.so.* in the wheel, found {names}")
    z.extract(names[0], sys.argv[2])
    print(names[0])
PY
mkdir -p "$dest"
so="$(ls "$tmp"/x/onnxruntime/capi/libonnxruntime.so.*)"
install -m 0644 "$so" "$dest/$(basename "$so").tmp"
mv -f "$dest/$(basename "$so").tmp" "$dest/$(basename "$so")"
ln -sfn "$(basename "$so")" "$lib"
echo "$ORT_VERSION ${WHEEL_SHA256[$arch]}" > "$stamp"
echo "fetch-ort: $lib -> $(basename "$so")" >&2
