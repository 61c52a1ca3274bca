"""Stopping a process and everything it started (whether a pid lives: ``hpc.liveness``).

An engine is started with TERM blocked (:func:`term_blocked`) and stopped with
``ENGINE_STOP_SIGNAL`` (INT): scancel and preemption TERM every process of the job at once,
engine included, and an engine that obeyed would cut the streams its wrapper is draining.
vLLM, llama-server and uvicorn (llama-cpp-python's server) shut down on INT as on TERM.
A blocked signal stays blocked across exec and in every child; KILL cannot be blocked, so
Slurm's KILL after KillWait still ends everything. The engine also gets INT when its
wrapper dies (:func:`die_with_parent`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

import psutil

from hpc.liveness import alive

ENGINE_STOP_SIGNAL = signal.SIGINT
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = ENGINE_STOP_SIGNAL) -> Callable[[], None] | None:
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
    exit_now, getppid = os._exit, os.getppid

    def preexec() -> None:
        prctl(*args)
        if getppid() != parent:  # the parent died before prctl took effect: do not start
            exit_now(1)

    return preexec


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
