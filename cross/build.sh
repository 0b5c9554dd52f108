#!/usr/bin/env bash
# Cross-build the release binary with Debian's cross toolchains, no container needed:
#
#   cross/build.sh aarch64|armv7|x86_64 [cargo build flags...]
#
# Needs the Rust target (`rustup target add <triple>`) and, for the C in `ring`, Debian's
# cross compilers: gcc-aarch64-linux-gnu (aarch64), gcc-arm-linux-gnueabihf (armv7). It
# installs nothing. The binary lands in $CARGO_TARGET_DIR/<triple>/release/edgeflow
# (default target/); ONNX Runtime is loaded at run time, so nothing of it is needed to build.
# With Docker available, `cross build --release --target <triple>` does the same in the
# images named in Cross.toml.
set -euo pipefail

arch="${1:-}"
case "$arch" in
  aarch64|arm64) triple=aarch64-unknown-linux-gnu;     prefix=aarch64-linux-gnu ;;
  armv7|armhf)   triple=armv7-unknown-linux-gnueabihf; prefix=arm-linux-gnueabihf ;;
  x86_64|amd64)  triple=x86_64-unknown-linux-gnu;      prefix=x86_64-linux-gnu ;;
  *) echo "usage: cross/build.sh aarch64|armv7|x86_64 [cargo build flags...]" >&2; exit 64 ;;
esac
shift

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo="${CARGO:-cargo}"

if [[ "$triple" != "$(rustc -vV | sed -n 's/^host: //p')" ]]; then
  if ! command -v "$prefix-gcc" >/dev/null; then
    pkg="gcc-$prefix"
    echo "cross/build.sh: $prefix-gcc not found; install it with: apt-get install $pkg" >&2
    exit 2
  fi
  if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$triple"; then
    echo "cross/build.sh: the Rust standard library for $triple is missing: rustup target add $triple" >&2
    exit 2
  fi
  # The linker for rustc, and the C compiler and archiver for ring's build script (cc-rs).
  upper="$(tr 'a-z-' 'A-Z_' <<<"$triple")"
  lower="$(tr '-' '_' <<<"$triple")"
  export "CARGO_TARGET_${upper}_LINKER=$prefix-gcc"
  export "CC_${lower}=$prefix-gcc" "AR_${lower}=$prefix-ar"
fi

start=$SECONDS
"$cargo" build --release --locked --target "$triple" "$@"
out="${CARGO_TARGET_DIR:-$root/target}/$triple/release/edgeflow"
echo "cross/build.sh: $out ($((SECONDS - start)) s)" >&2
file -b "$out" 2>/dev/null || true
