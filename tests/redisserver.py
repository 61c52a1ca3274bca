"""A real Redis for the tests: Debian's ``redis-server`` on a free loopback port, with a
password, no persistence, in a private temporary directory; killed and restarted at will.

The ``redis_server`` fixture (tests/conftest.py) skips without ``redis-server`` or the
``redis`` package, and fails instead when ``MT_TEST_REQUIRE`` names ``redis``.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

# How long a started redis-server has to answer PING.
START_TIMEOUT_S = 15


def unavailable() -> str | None:
    """Why no test Redis can run here (None if it can)."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install -e '.[dev]')"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process; ``url`` (with its password) reaches it while it runs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.chmod(0o700)
        self.port = _free_port()
        self.password = secrets.token_hex(16)
        # The password goes into a 0600 config file, not onto redis-server's command line.
        self.config = directory / "redis.conf"
        self.config.write_text(
            "bind 127.0.0.1\n"
            f"port {self.port}\n"
            f"requirepass {self.password}\n"
            'save ""\n'
            "appendonly no\n"
            f"dir {directory}\n"
            f"logfile {directory / 'redis.log'}\n"
            "daemonize no\n",
            encoding="utf-8",
        )
        self.config.chmod(0o600)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/0``."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (again, on the same port, empty) and wait until it answers PING."""
        import redis

        self._proc = subprocess.Popen(
            ["redis-server", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    log = self.directory / "redis.log"
                    raise AssertionError(
                        "redis-server did not start: "
                        + (log.read_text()[-2000:] if log.exists() else "no log")
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL it (an outage: nothing is saved) and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)
        self._proc = None
