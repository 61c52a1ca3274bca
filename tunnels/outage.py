"""While the SSH connection is down, local requests fail at once with a clear HTTP error.

The tunnel carries HTTP to the gateway, so instead of a hang or a bare reset the client
gets ``503`` in OpenAI's error shape with ``Retry-After``: the openai client and curl both
show the message. A request is read (briefly) before answering, so closing does not reset
the connection under the client.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading

_READ_S = 0.5


def answer_down(conn: socket.socket, message: str, *, retry_after_s: int = 2) -> None:
    """Answer one accepted connection with 503 + ``message`` and close it."""
    try:
        conn.settimeout(_READ_S)
        head = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                head += chunk
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "tunnel_down",
                    "param": None,
                    "code": "tunnel_down",
                }
            }
        ).encode()
        response = (
            b"HTTP/1.1 503 Service Unavailable\r\n"
            b"Content-Type: application/json\r\n"
            + f"Retry-After: {retry_after_s}\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Connection: close\r\n\r\n"
            + body
        )
        with contextlib.suppress(OSError):
            conn.sendall(response)
            conn.shutdown(socket.SHUT_WR)
    finally:
        conn.close()


class DownResponder:
    """Holds the local port while the tunnel is down and answers every connection with 503."""

    def __init__(self, listener: socket.socket, message: str) -> None:
        self._listener = listener
        self.message = message
        self._thread = threading.Thread(target=self._serve, name="mt-tunnel-down", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed by close()
            answer_down(conn, self.message)

    def close(self) -> None:
        """Release the port (for the engine to listen on it again)."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)
