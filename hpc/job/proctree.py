"""Stopping a process and everything it started, and telling whether a pid is still ours."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (empty if ``pid`` is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


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
