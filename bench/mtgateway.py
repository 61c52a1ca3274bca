"""`mt gateway --port 0` as a process of a benchmark: started, its URL read, stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


@contextmanager
def running_gateway(env: Mapping[str, str], *args: str) -> Iterator[str]:
    """``mt gateway --port 0 ARGS`` with ``env`` (its MT_HOME, MT_MODELS); yields its URL.

    Its own process group, stopped with TERM at the end (then waited for)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpc.cli", "gateway", "--port", "0", *args],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout is not None else ""
        if "listening on" not in line:
            raise SystemExit(f"the gateway did not start: {line!r}")
        yield line.split("listening on", 1)[1].strip()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
