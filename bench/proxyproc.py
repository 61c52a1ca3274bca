"""Server processes a benchmark starts (fake engine, `mt gateway`, LiteLLM's proxy) and
what they cost: CPU seconds and peak resident memory of the whole process tree (psutil).

Each runs in its own session (process group) so that stopping it stops its children too;
it is stopped by its own process id, never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from hpc.errors import MTError

_LISTENING = "listening on"


class ServerProcess:
    """A server started in the background; ``url`` is where it listens once it is up."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str]):
        self.name = name
        self.log_path = log_path
        self._log: IO[str] = log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.url = ""

    def wait_listening_line(self) -> str:
        """Read the ``… listening on URL`` line the server prints first; returns the URL."""
        assert_out = self.proc.stdout
        line = assert_out.readline() if assert_out is not None else ""
        if _LISTENING not in line:
            self.stop()
            raise MTError(
                f"{self.name} did not start: {line.strip() or 'no output'}\n{self.log_tail()}",
                hint=f"its log: {self.log_path}",
            )
        self.url = line.split(_LISTENING, 1)[1].strip()
        return self.url

    def wait_http_ok(self, url: str, timeout_s: float) -> None:
        """Poll ``url`` until it answers 200 (for servers that print no listening line)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise MTError(
            f"{self.name} did not answer {url} within {timeout_s:.0f} s\n{self.log_tail()}",
            hint=f"its log: {self.log_path}",
        )

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's log (its stderr)."""
        self._log.flush()
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def tree(self) -> list[psutil.Process]:
        """The process and its children, as they are now."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process tree so far."""
        total = 0.0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss_bytes(self) -> int:
        """Resident memory of the process tree now."""
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_info().rss
        return total

    def stop(self) -> None:
        """TERM the process group, then KILL it if it does not exit within 10 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@dataclass
class Usage:
    """What a server process tree used during a measurement."""

    cpu_s: float = 0.0
    peak_rss_bytes: int = 0


class UsageMeter:
    """Samples a server's memory while a measurement runs; CPU is the difference of totals."""

    def __init__(self, server: ServerProcess | None, interval_s: float = 0.05) -> None:
        self.server = server
        self.interval_s = interval_s
        self.usage = Usage()
        self._task: asyncio.Task[None] | None = None
        self._cpu_start = 0.0

    async def _sample(self) -> None:
        assert_server = self.server
        while assert_server is not None:
            rss = await asyncio.to_thread(assert_server.rss_bytes)
            self.usage.peak_rss_bytes = max(self.usage.peak_rss_bytes, rss)
            await asyncio.sleep(self.interval_s)

    async def __aenter__(self) -> UsageMeter:
        if self.server is not None:
            self._cpu_start = self.server.cpu_s()
            self.usage.peak_rss_bytes = self.server.rss_bytes()
            self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.server is not None:
            self.usage.cpu_s = self.server.cpu_s() - self._cpu_start
