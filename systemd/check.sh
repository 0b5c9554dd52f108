#!/usr/bin/env bash
# Static checks of the systemd units, for CI and before a release:
#   1. `systemd-analyze verify` of edgeflow.service and edgeflow.socket, inside a throwaway
#      root that holds the real edgeflow binary at /usr/bin/edgeflow (verify checks that
#      ExecStart= is executable) and the host's own unit files (sysinit.target, ...).
#      Any diagnostic at all (an unknown key, a bad value) fails the check.
#   2. `systemd-analyze security --offline=true`: the exposure score must be at most 2.0.
#
#   systemd/check.sh [EDGEFLOW_BINARY]     (default: target/release/edgeflow)
#
# Needs systemd-analyze (systemd >= 250 for --offline), not a running systemd.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
bin="${1:-$root/target/release/edgeflow}"
max_exposure=2.0

command -v systemd-analyze >/dev/null || { echo "check.sh: systemd-analyze not found (apt-get install systemd)" >&2; exit 2; }
[[ -x "$bin" ]] || { echo "check.sh: no edgeflow binary at $bin (build it first: make build)" >&2; exit 2; }
unit_dir=""
for d in /usr/lib/systemd/system /lib/systemd/system; do
  [[ -f "$d/sysinit.target" ]] && { unit_dir="$d"; break; }
done
[[ -n "$unit_dir" ]] || { echo "check.sh: no systemd unit files (sysinit.target) on this machine" >&2; exit 2; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/usr/bin" "$tmp/bin" "$tmp/usr/lib/systemd" "$tmp/etc/systemd/system"
ln "$bin" "$tmp/usr/bin/edgeflow" 2>/dev/null || cp "$bin" "$tmp/usr/bin/edgeflow"
cp /bin/kill "$tmp/bin/kill"
cp -a "$unit_dir" "$tmp/usr/lib/systemd/system"
cp "$here/edgeflow.service" "$here/edgeflow.socket" "$tmp/etc/systemd/system/"

fail=0
echo "== systemd-analyze verify --root=<tmp> edgeflow.service edgeflow.socket"
if ! out="$(systemd-analyze verify --root="$tmp" edgeflow.service edgeflow.socket 2>&1)" || [[ -n "$out" ]]; then
  printf '%s\n' "${out:-systemd-analyze verify failed}" >&2
  fail=1
else
  echo "ok"
fi

echo "== systemd-analyze security --offline=true systemd/edgeflow.service"
# --threshold is on the 0-100 scale behind the 0.0-10.0 score shown.
threshold="$(awk -v m="$max_exposure" 'BEGIN { printf "%d", m * 10 }')"
if report="$(systemd-analyze security --offline=true --threshold="$threshold" "$here/edgeflow.service" 2>&1)"; then sec=0; else sec=$?; fi
printf '%s\n' "$report" | grep -E '^✗' || true
overall="$(printf '%s\n' "$report" | grep -o 'Overall exposure level for edgeflow.service: [0-9.]*' || true)"
if [[ -z "$overall" ]]; then
  printf '%s\n' "$report" >&2
  echo "check.sh: no exposure score in the report" >&2
  fail=1
else
  echo "$overall (at most $max_exposure allowed)"
  ((sec == 0)) || { echo "check.sh: exposure above $max_exposure" >&2; fail=1; }
fi
exit "$fail"
