#!/usr/bin/env bash
# Run edgeflow.service under a real systemd on a machine where systemd is not PID 1 (a CI
# VM, a container host): systemd (the installed one) boots as PID 1 of a private PID and
# mount namespace, with the host's units that would touch the machine (udev, sysctl,
# binfmt, modules, networking, timesyncd, ...) masked, and starts the unit from systemd/
# unchanged except for a drop-in. Manual check, needs root; not part of CI.
#
#   systemd/try-under-systemd.sh [--socket] [--keep] [--set KEY=VALUE]... -- EXECSTART...
#
#   EXECSTART   the command line that replaces ExecStart= (paths must be outside /tmp,
#               /var/tmp and /home, which the unit hides), e.g.
#               "$PWD/target/release/edgeflow run --config $PWD/target/try/config.toml"
#   --socket    start edgeflow.socket and let the first connection start the service
#   --keep      leave the namespace running; prints how to enter it and how to end it
#   --set K=V   another [Service] line in the drop-in, e.g. --set Type=simple --set WatchdogSec=0
#               for a command that does not speak sd_notify (`edgeflow serve`)
#
# Everything else is the real unit: Type=notify (so READY=1 must come), the watchdog,
# User=edgeflow (added to a private copy of /etc/passwd), the state and runtime directories
# (under target/systemd-try/), the whole sandbox. Prints the unit's state, the journal, and
# a GET /v1/models over the socket from a client in the edgeflow-api group and one outside it,
# and that client's attempt to list the state directory.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
usage="usage: $0 [--socket] [--keep] [--set KEY=VALUE]... -- EXECSTART..."
socket=0 keep=0 extra=()
while (($#)); do
  case "$1" in
    --socket) socket=1; shift ;;
    --keep) keep=1; shift ;;
    --set) extra+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "$usage" >&2; exit 64 ;;
  esac
done
(($#)) || { echo "$usage" >&2; exit 64; }
[[ $EUID -eq 0 ]] || { echo "try-under-systemd: needs root (namespaces, mounts)" >&2; exit 2; }
[[ -x /lib/systemd/systemd ]] || { echo "try-under-systemd: systemd is not installed" >&2; exit 2; }
[[ ! -d /run/systemd/system ]] || { echo "try-under-systemd: systemd already runs this machine: use systemctl" >&2; exit 2; }
command -v curl >/dev/null || { echo "try-under-systemd: needs curl" >&2; exit 2; }

work="$root/target/systemd-try"
rm -rf "$work"
mkdir -p "$work/etc-systemd/edgeflow.service.d" "$work/varlib"
cp /etc/passwd /etc/group "$work/"
# A system id free as a uid and as a gid.
uid=$(awk -F: '$3 >= 900 && $3 < 1000 { u[$3] = 1 } END { for (i = 999; i >= 900; i--) if (!(i in u)) { print i; exit } }' /etc/passwd /etc/group)
grep -q '^edgeflow:' "$work/passwd" || echo "edgeflow:x:$uid:$uid:edgeflow LLM endpoint:/var/lib/edgeflow:/usr/sbin/nologin" >> "$work/passwd"
grep -q '^edgeflow:' "$work/group" || echo "edgeflow:x:$uid:" >> "$work/group"
gid=$(awk -F: '$1 == "edgeflow" { print $3 }' "$work/group")
# The API clients' group (edgeflow.sysusers: `g edgeflow-api -`), the unit's Group=.
api=$(awk -F: '$3 >= 900 && $3 < 1000 { u[$3] = 1 } END { for (i = 998; i >= 900; i--) if (!(i in u)) { print i; exit } }' "$work/passwd" "$work/group")
grep -q '^edgeflow-api:' "$work/group" || echo "edgeflow-api:x:$api:" >> "$work/group"
api=$(awk -F: '$1 == "edgeflow-api" { print $3 }' "$work/group")

# Only the units edgeflow needs run: everything the host would start at boot is masked.
units="$work/etc-systemd"
for d in /lib/systemd/system/sysinit.target.wants /etc/systemd/system/sysinit.target.wants /lib/systemd/system/sockets.target.wants; do
  for u in "$d"/*; do
    [[ -e "$u" || -L "$u" ]] || continue
    case "$(basename "$u")" in systemd-journald.service|systemd-journald.socket|systemd-journald-dev-log.socket) continue ;; esac
    ln -sf /dev/null "$units/$(basename "$u")"
  done
done
for u in systemd-udevd.service systemd-udev-trigger.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
  systemd-remount-fs.service local-fs.target remote-fs.target swap.target systemd-hwdb-update.service ldconfig.service \
  systemd-journal-catalog-update.service systemd-update-done.service network-online.target networking.service \
  systemd-networkd-wait-online.service getty.target console-getty.service; do
  ln -sf /dev/null "$units/$u"
done
cp "$here/edgeflow.service" "$here/edgeflow.socket" "$units/"
{
  echo "[Service]"
  echo "ExecStart="
  printf 'ExecStart='; printf '%q ' "$@"; echo
  for line in "${extra[@]}"; do echo "$line"; done
} > "$units/edgeflow.service.d/try.conf"
printf '[Unit]\nDescription=edgeflow try-under-systemd\n' > "$units/edgeflow-try.target"

cat > "$work/boot.sh" <<EOF
#!/bin/sh
set -e
mount --make-rprivate /
mount -t proc proc /proc
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
mount -t tmpfs -o mode=755 tmpfs /run
umount -l /sys/fs/cgroup 2>/dev/null || true
mount --bind /sys /sys && mount -o remount,bind,ro /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind "$units" /etc/systemd/system
mount --bind "$work/passwd" /etc/passwd
mount --bind "$work/group" /etc/group
mount --bind "$work/varlib" /var/lib
export container=edgeflow-try
exec /lib/systemd/systemd --system --unit=edgeflow-try.target --show-status=0
EOF
chmod +x "$work/boot.sh"
unshare --pid --fork --mount --uts --ipc "$work/boot.sh" > "$work/boot.log" 2>&1 < /dev/null &
ns=$!
pid=""
for _ in $(seq 50); do
  # unshare's one child is the namespace's PID 1.
  pid=$(pgrep -P "$ns" || true)
  [[ -n "$pid" ]] && [[ "$(cat /proc/"$pid"/comm 2>/dev/null)" == systemd ]] && break
  pid=""
  sleep 0.2
done
[[ -n "$pid" ]] || { cat "$work/boot.log" >&2; echo "try-under-systemd: systemd did not start" >&2; exit 1; }
in_ns() { nsenter -t "$pid" -m -p "$@"; }
end() {
  # PID 1 of the namespace: killing it ends every process in it.
  kill -KILL "$pid" 2>/dev/null || true
  wait "$ns" 2>/dev/null || true
  # The cgroups it made in the host's cgroup2 hierarchy, deepest first.
  local cg
  cg=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)
  [[ -n "$cg" ]] && find "$cg/system.slice" "$cg/init.scope" -depth -type d -exec rmdir {} + 2>/dev/null || true
}
((keep)) || trap end EXIT
for _ in $(seq 100); do
  state=$(in_ns systemctl is-system-running 2>/dev/null || true)
  [[ "$state" == running || "$state" == degraded ]] && break
  sleep 0.2
done
echo "== systemd $(in_ns systemctl --version | head -1 | cut -d' ' -f2) as PID 1 of a private namespace (host pid $pid): $state"

if ((socket)); then
  in_ns systemctl start edgeflow.socket
else
  in_ns systemctl start --no-block edgeflow.service
fi
sleep 1
models() { # uid gid
  in_ns setpriv --reuid="$1" --regid="$2" --clear-groups curl -sS -m 30 --unix-socket /run/edgeflow/api.sock http://edgeflow/v1/models 2>&1 | cut -c1-300 || true
}
echo "== GET /v1/models as uid 1234 in group edgeflow-api ($api):"; models 1234 "$api"; echo
for _ in $(seq 150); do
  sub=$(in_ns systemctl show -p SubState --value edgeflow.service)
  [[ "$sub" != start && "$sub" != start-pre && "$sub" != auto-restart ]] && break
  sleep 0.2
done
echo "== edgeflow.service:"
in_ns systemctl show edgeflow.service -p ActiveState -p SubState -p Result -p StatusText -p NRestarts -p ExecMainStatus -p WatchdogUSec -p MainPID
echo "== GET /v1/models as uid 1234 in group edgeflow-api ($api):"; models 1234 "$api"; echo
echo "== GET /v1/models as uid 1234, group 1234 (expected: refused):"; models 1234 1234; echo
echo "== the same API client lists /var/lib/edgeflow (expected: permission denied):"
in_ns setpriv --reuid=1234 --regid="$api" --clear-groups ls /var/lib/edgeflow 2>&1 | head -3 || true
echo "== /run/edgeflow and /var/lib/edgeflow:"
in_ns ls -la /run/edgeflow /var/lib/edgeflow
if ((keep)); then
  in_ns journalctl --no-pager -o short-precise -u edgeflow.service -u edgeflow.socket | sed 's/\x1b\[[0-9;]*m//g'
  echo "namespace kept, edgeflow running: nsenter -t $pid -m -p systemctl status edgeflow; end it with kill -KILL $pid"
  exit 0
fi
echo "== stop"
in_ns systemctl stop edgeflow.service edgeflow.socket
in_ns systemctl show edgeflow.service -p Result -p ExecMainStatus -p ExecMainCode
echo "== journal"
in_ns journalctl --no-pager -o short-precise -u edgeflow.service -u edgeflow.socket | sed 's/\x1b\[[0-9;]*m//g'
