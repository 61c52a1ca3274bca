"""Runs the engine in a network namespace of its own: its internal ports reach no other user.

Engines open TCP ports besides the one they serve on: vLLM's worker listens on a dozen
loopback ports (torch.distributed's store and gloo's pairs, NCCL's bootstrap on GPUs), none
of them with a credential. On a node shared with other users, 127.0.0.1 is shared too: any
of them could connect. In a network namespace of its own the engine has a loopback nobody
else sees, and still serves the job's front through its Unix socket, which is a file in the
job's 0700 directory and works across namespaces.

``python -m hpc.job.netns MODE -- ENGINE ARGS…`` unshares the network namespace (as root
directly; as any other user inside a user namespace that maps only the user's own uid and
gid: no privilege is gained), brings the namespace's loopback up (engines bind
127.0.0.1 for their own processes) and ``exec``s the engine. ``exec`` keeps the pid, the
process group, the blocked TERM and the parent-death signal the wrapper gave this process.
Capabilities held inside the new user namespace end at ``exec`` for a non-root uid.

``MODE``: ``isolated`` fails (exit 1, ``error:`` and ``hint:`` in the job's log) where the
kernel allows no unprivileged user namespace; ``auto`` then runs the engine on the node's
network and says so in the log (a warning, once).

Containers get the same from Apptainer itself (``--net --network none``: hpc.job.engines).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys
from typing import Literal

Mode = Literal["isolated", "auto"]

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sH14x"  # struct ifreq: the name, then ifr_flags (short) in the union


class IsolationError(OSError):
    """The kernel refused a network namespace (user namespaces off, or a seccomp policy)."""


def netns_argv(python: str, mode: Mode, argv: list[str]) -> list[str]:
    """``argv`` run through this module, in a network namespace of its own."""
    return [python, "-m", "hpc.job.netns", mode, "--", *argv]


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(flags)) != 0:
        code = ctypes.get_errno()
        raise IsolationError(code, os.strerror(code))


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack(_IFREQ, b"lo", 0)
        _, flags = struct.unpack(_IFREQ, fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, request))
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))


def isolate() -> None:
    """Move this process into a new network namespace with its loopback up."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        _unshare(_CLONE_NEWNET)
    else:
        _unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
        # Only this user's own ids exist inside; setgroups stays denied (as unprivileged
        # user namespaces require), so the supplementary groups are kept, never changed.
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    try:
        _loopback_up()
    except OSError as exc:
        raise IsolationError(exc.errno or errno.EPERM, f"loopback: {exc.strerror}") from exc


def main(argv: list[str] | None = None) -> int:
    """Isolate (or, in ``auto`` mode where the kernel refuses, say so), then exec the engine."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[0] not in ("isolated", "auto") or args[1] != "--":
        print("usage: python -m hpc.job.netns isolated|auto -- ENGINE [ARGS…]", file=sys.stderr)
        return 2
    mode, command = args[0], args[2:]
    try:
        isolate()
    except IsolationError as exc:
        hint = (
            "the kernel allows no unprivileged user namespace here "
            "(sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone)"
        )
        if mode == "isolated":
            print(f"error: cannot give the engine a network of its own: {exc}", file=sys.stderr)
            print(f"hint: {hint}; or set engine_network: shared in the model", file=sys.stderr)
            return 1
        print(
            f"warning: the engine runs on the node's network ({exc}): its internal ports "
            f"are on the node's loopback; {hint}",
            file=sys.stderr,
        )
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)  # noqa: S606 - the engine's own argv, no shell
    except OSError as exc:
        print(f"netns: cannot start {command[0]}: {exc.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main())
