"""Stopping a process and everything it started (whether a pid lives: ``hpc.liveness``)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable

import psutil

from hpc.liveness import alive

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the child gets ``sig`` when its parent dies (Linux).

    An engine in its own process group outlives a wrapper killed with SIGKILL (or by the
    OOM killer) and then holds its GPUs with nobody to find it; this ends it. The kernel
    sends ``sig`` when the parent *thread* ends, so start the child from a thread that
    lives as long as the process (the main thread). None where ``prctl`` does not exist.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    # Everything is built before the fork: between fork and exec the child only calls.
    args = (ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(sig), *[ctypes.c_ulong(0)] * 3)
    parent = os.getpid()
    kill, getpid, getppid = os.kill, os.getpid, os.getppid

    def preexec() -> None:
        prctl(*args)
        if getppid() != parent:  # the parent died before prctl took effect
            kill(getpid(), sig)

    return preexec


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (empty if ``pid`` is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_tree(pid: int, *, grace_s: float = 10.0, own_group: bool = True) -> None:
    """TERM ``pid``'s process group (or the pid and its children), KILL whatever outlives grace.

    Children are listed before the TERM, so a child that re-parents itself to init when its
    parent dies is still found and killed.
    """
    procs = [*descendants(pid)]
    with contextlib.suppress(psutil.NoSuchProcess):
        procs.insert(0, psutil.Process(pid))
    if own_group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    if own_group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    psutil.wait_procs(left, timeout=5)


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` has exited; True if it did within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return not alive(pid)
