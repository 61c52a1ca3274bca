"""HTTP over the engine's Unix socket (stdlib): how the job wrapper asks its engine for health.

The engine listens only on a socket in the job's 0700 directory (hpc.job.engines); the
wrapper, the one process besides the front that talks to it, uses ``http.client`` there.
"""

from __future__ import annotations

import http.client
import socket
from pathlib import Path


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("engine", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def probe(engine_socket: Path, path: str, key: str | None, timeout_s: float = 2.0) -> bool:
    """True if the engine on ``engine_socket`` answers ``GET path`` with 200."""
    conn = _UnixHTTPConnection(engine_socket, timeout_s)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
