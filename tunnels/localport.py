"""The laptop side of a tunnel: 127.0.0.1 only, and a clear error when the port is taken."""

from __future__ import annotations

import contextlib
import errno
import socket

import psutil

from tunnels.errors import LocalPortInUseError, TunnelError

LOOPBACK = "127.0.0.1"


def holder_of(port: int) -> str | None:
    """``name (pid N)`` of the process listening on ``port``, if psutil may see it."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr[1] == port:
            if conn.pid is None:
                return None
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                return f"pid {conn.pid}"
            return f"{name} (pid {conn.pid})"
    return None


def bind_local(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:``port`` (never another address).

    LocalPortInUseError names the port and, if found, the process holding it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # TIME_WAIT leftovers of our own earlier tunnel must not block a restart; a live
    # listener still does (SO_REUSEADDR does not allow two listeners on Linux).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise LocalPortInUseError(port, holder_of(port)) from exc
        raise TunnelError(
            f"cannot listen on {LOOPBACK}:{port}: {exc.strerror}", local_port=port
        ) from exc
    return sock


def ensure_free(port: int) -> None:
    """Raise LocalPortInUseError unless 127.0.0.1:``port`` can be bound now."""
    bind_local(port).close()


def listening(port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout_s):
        return True
    return False
