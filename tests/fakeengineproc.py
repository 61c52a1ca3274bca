"""bench.fakeengine as a process of its own, for tests that need an upstream to fail or wait."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def fake_engine_process(*args: str) -> Iterator[str]:
    """``python -m bench.fakeengine ARGS`` as its own process on 127.0.0.1: its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.fakeengine", *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        yield line.split("listening on", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
