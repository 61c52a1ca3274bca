"""Where a pid means something: the host (and boot) a process runs on, and whether it lives.

A pid is only a fact on the host that started it, and only until that host reboots: a login
node that shares ``$HOME`` with another sees the other's records and lock files, but not its
processes. Every judgment of a recorded pid (the local backend's pid files, records' wrapper
and engine pids, the registry's lock files) asks :func:`judged_here` first.
"""

from __future__ import annotations

import socket
from pathlib import Path

import psutil

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def this_host() -> str:
    """This machine's host name, as records, pid files and lock files name it."""
    return socket.gethostname()


def boot_id() -> str | None:
    """This boot's id (Linux); None where the kernel does not say."""
    try:
        return _BOOT_ID.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def judged_here(host: str | None, boot: str | None = None) -> bool:
    """True if pids recorded on ``host`` (during boot ``boot``, if known) can be checked here.

    Another host's pids mean nothing here; this host's pids from before a reboot name
    processes that are gone (and maybe numbers reused since), so they are not judged either.
    """
    if host is None or host != this_host():
        return False
    return boot is None or boot == boot_id()


def alive(pid: int, started_at: float | None = None) -> bool:
    """True if ``pid`` runs and is not a zombie (and, given ``started_at``, is the same process).

    ``started_at`` guards against pid reuse: a recycled pid has another create time.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started_at is None or abs(proc.create_time() - started_at) < 1.0
    except psutil.NoSuchProcess:
        return False


def create_time(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), or None if it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
