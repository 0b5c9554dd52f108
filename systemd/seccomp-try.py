#!/usr/bin/python3
"""Run a command under the seccomp filters edgeflow.service asks systemd for, without systemd.

    systemd/seccomp-try.py [--unit systemd/edgeflow.service] -- COMMAND [ARGS...]

A manual check (not CI) that the daemon's code paths (ONNX Runtime loading and running a
model, tokio, sockets, host metrics) survive the unit's sandbox on a machine where systemd is
not PID 1. It rebuilds, with libseccomp (Debian: python3-seccomp), the filters systemd 252
installs for these settings of the unit, then execs COMMAND:

- SystemCallFilter= (allow-list and ~deny-lists, groups expanded by `systemd-analyze
  syscall-filter`), SystemCallErrorNumber=EPERM, SystemCallArchitectures=native;
- MemoryDenyWriteExecute=yes: mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect adding
  PROT_EXEC and shmat with SHM_EXEC fail with EPERM (systemd's seccomp variant, stricter
  than the kernel's PR_SET_MDWE);
- RestrictAddressFamilies=: socket()/socketpair() of any other family fail;
- RestrictNamespaces=yes: clone3 fails with ENOSYS (so glibc falls back to clone), clone and
  unshare with namespace flags and setns fail;
- NoNewPrivileges=yes.

Mount-namespace settings (ProtectSystem=, ProtectProc=, PrivateTmp=, ...) are not emulated:
run COMMAND as an unprivileged user (setpriv) for the file-permission side.
"""
import errno
import os
import re
import subprocess
import sys

import seccomp

PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
FAMILIES = {"AF_UNIX": 1, "AF_LOCAL": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}
NS_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000  # CLONE_NEW*


def expand(names, groups):
    out = set()
    for n in names:
        if n.startswith("@"):
            out |= expand(groups[n], groups)
        else:
            out.add(n)
    return out


def syscall_groups():
    text = subprocess.run(["systemd-analyze", "syscall-filter"], check=True, capture_output=True, text=True).stdout
    groups, cur = {}, None
    for line in text.splitlines():
        s = line.strip()
        if line.startswith("@"):
            cur = s
            groups[cur] = []
        elif cur and s and not s.startswith("#"):
            groups[cur].append(s)
    return groups


def unit_settings(path):
    settings = {}
    for line in open(path, encoding="utf-8"):
        m = re.match(r"^([A-Za-z]+)=(.*)$", line.strip())
        if m:
            settings.setdefault(m.group(1), []).append(m.group(2))
    return settings


def main():
    args = sys.argv[1:]
    unit = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edgeflow.service")
    if args[:1] == ["--unit"]:
        unit, args = args[1], args[2:]
    if args[:1] != ["--"] or len(args) < 2:
        sys.exit(__doc__)
    command = args[1:]
    u = unit_settings(unit)
    groups = syscall_groups()

    allowed = None
    for value in u.get("SystemCallFilter", []):
        deny = value.startswith("~")
        names = expand(value.lstrip("~").split(), groups)
        if allowed is None:
            allowed = set() if deny else names
            if deny:
                sys.exit("seccomp-try: only allow-list filters are emulated")
        elif deny:
            allowed -= names
        else:
            allowed |= names
    err = getattr(errno, u.get("SystemCallErrorNumber", ["EPERM"])[0])
    families = [FAMILIES[f] for v in u.get("RestrictAddressFamilies", []) for f in v.split()]
    mdwe = u.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes"
    restrict_ns = u.get("RestrictNamespaces", ["no"])[-1] == "yes"

    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(err))
    special = {"mmap", "mmap2", "mprotect", "pkey_mprotect", "shmat", "socket", "socketpair", "clone", "clone3", "unshare", "setns"}
    unknown = 0
    for name in sorted(allowed - special):
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            unknown += 1  # not a syscall on this architecture
    A = seccomp.Arg
    for name in ("mmap", "mmap2"):
        if name in allowed:
            try:
                if mdwe:
                    for ok in (0, PROT_WRITE, PROT_EXEC):
                        f.add_rule(seccomp.ALLOW, name, A(2, seccomp.MASKED_EQ, PROT_WRITE | PROT_EXEC, ok))
                else:
                    f.add_rule(seccomp.ALLOW, name)
            except (RuntimeError, ValueError):
                pass
    for name, arg in (("mprotect", 2), ("pkey_mprotect", 2)):
        if name in allowed:
            f.add_rule(seccomp.ALLOW, name, A(arg, seccomp.MASKED_EQ, PROT_EXEC, 0)) if mdwe else f.add_rule(seccomp.ALLOW, name)
    if "shmat" in allowed:
        f.add_rule(seccomp.ALLOW, "shmat", A(2, seccomp.MASKED_EQ, SHM_EXEC, 0)) if mdwe else f.add_rule(seccomp.ALLOW, "shmat")
    for name in ("socket", "socketpair"):
        if name in allowed:
            if families:
                for fam in families:
                    f.add_rule(seccomp.ALLOW, name, A(0, seccomp.EQ, fam))
            else:
                f.add_rule(seccomp.ALLOW, name)
    if "clone" in allowed:
        # x86_64 and arm64 pass the flags in the first argument.
        f.add_rule(seccomp.ALLOW, "clone", A(0, seccomp.MASKED_EQ, NS_FLAGS, 0)) if restrict_ns else f.add_rule(seccomp.ALLOW, "clone")
    if "clone3" in allowed:
        f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3") if restrict_ns else f.add_rule(seccomp.ALLOW, "clone3")
    for name in ("unshare", "setns"):
        if name in allowed and not restrict_ns:
            f.add_rule(seccomp.ALLOW, name)
    f.set_attr(seccomp.Attr.CTL_NNP, 1)
    f.load()
    print(f"seccomp-try: {len(allowed)} syscalls allowed ({unknown} not on this arch), default errno {err}, "
          f"MDWE={'yes' if mdwe else 'no'}, families={families}, restrict_ns={restrict_ns}", file=sys.stderr)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
