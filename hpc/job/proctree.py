"""Stopping a process and everything it started, and telling whether a pid is still ours.

An engine is started with TERM blocked (:func:`term_blocked`) and stopped with
``ENGINE_STOP_SIGNAL`` (INT): scancel and preemption TERM every process of the job at once,
engine included, and an engine that obeyed would cut the streams its wrapper is draining.
vLLM, llama-server and uvicorn (llama-cpp-python's server) shut down on INT as on TERM.
A blocked signal stays blocked across exec and in every child; KILL cannot be blocked, so
Slurm's KILL after KillWait still ends everything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import psutil

ENGINE_STOP_SIGNAL = signal.SIGINT


@contextlib.contextmanager
def term_blocked() -> Iterator[None]:
    """TERM blocked in this thread meanwhile: a process started inside inherits the mask.

    A TERM for this process that arrives meanwhile waits, and is handled on the way out.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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


def stop_tree(
    pid: int,
    *,
    grace_s: float = 10.0,
    own_group: bool = True,
    sig: signal.Signals = signal.SIGTERM,
) -> None:
    """``sig`` (TERM) to ``pid``'s process group (or the pid and its children), KILL whatever
    outlives grace.

    Children are listed before the signal, so a child that re-parents itself to init when its
    parent dies is still found and killed.
    """
    procs = [*descendants(pid)]
    with contextlib.suppress(psutil.NoSuchProcess):
        procs.insert(0, psutil.Process(pid))
    if own_group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
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
