"""An engine's process: started in its own process group with TERM blocked, its output
copied to the job log with the per-job key masked (hpc.masking), the last lines kept for
the record of a failed engine, and the wait for its health. Used by the job wrapper and by
a pool's slots.
"""

from __future__ import annotations

import collections
import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO

from hpc.job.engines import EngineLaunch
from hpc.job.proctree import die_with_parent, term_blocked
from hpc.masking import Mask

TAIL_LINES = 40


class LogPump:
    """Copies the engine's output to our stdout line by line, masks the key (in every form
    hpc.masking knows: plain, percent-encoded, base64), keeps a tail."""

    def __init__(self, stream: IO[bytes], out: IO[str], secret: str) -> None:
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._stream = stream
        self._out = out
        self._mask = Mask(secret)
        self._thread = threading.Thread(target=self._run, name="engine-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for raw in iter(self._stream.readline, b""):
            line = self._mask(raw.decode("utf-8", "replace").rstrip("\n"))
            self.tail.append(line)
            with contextlib.suppress(OSError, ValueError):
                self._out.write(line + "\n")
                self._out.flush()

    def join(self, timeout_s: float = 2.0) -> list[str]:
        self._thread.join(timeout_s)
        return list(self.tail)


def start_engine(
    launch: EngineLaunch, environ: Mapping[str, str], out: IO[str], secret: str
) -> tuple[subprocess.Popen[bytes], LogPump]:
    """Start an engine in its own process group, its output pumped to ``out`` (key masked).

    TERM is blocked in the engine (hpc.job.proctree): stop it with ``ENGINE_STOP_SIGNAL``.
    The engine gets that signal too if this process dies (``die_with_parent``): a wrapper
    killed while its engine loads leaves no engine behind. Call it from the main thread.
    """
    with term_blocked():
        proc = subprocess.Popen(
            launch.argv,
            env={**environ, **launch.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, so stopping it reaches every child
            preexec_fn=die_with_parent(),  # noqa: PLW1509 - prctl only, built before the fork
        )
    if proc.stdout is None:  # cannot happen with stdout=PIPE; keeps the type checker honest
        raise OSError("engine started without a stdout pipe")
    return proc, LogPump(proc.stdout, out, secret)


def await_health(
    proc: subprocess.Popen[bytes],
    healthy: Callable[[], bool],
    stopped: Callable[[], bool],
    timeout_s: float,
) -> str:
    """'healthy', 'exited', 'stopped' (``stopped()`` said so) or 'timeout'.

    Small models answer within a second or two, large ones take minutes: probe often at
    first (a refused connect costs microseconds), then back off to 2 s.
    """
    deadline = time.monotonic() + timeout_s
    interval = 0.05
    while time.monotonic() < deadline:
        if stopped():
            return "stopped"
        if proc.poll() is not None:
            return "exited"
        if healthy():
            return "healthy"
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * 1.25, 2.0)
    return "timeout"
