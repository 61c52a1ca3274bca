"""The soak's measuring instrument: how bench.chaos.clients files an answer whose
connection ended, against a raw HTTP/1.1 server on loopback that ends it as told."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from bench.chaos.clients import one_request

CHUNK = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'


def _serve(sock: socket.socket, tail: bytes) -> None:
    conn, _ = sock.accept()
    time.sleep(0.2)  # the whole request is in
    conn.recv(65536)
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    conn.sendall(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK) + tail)
    conn.shutdown(socket.SHUT_WR)  # a FIN, as a tunnel's closed channel gives
    time.sleep(0.2)
    conn.close()


@pytest.mark.parametrize(
    ("tail", "kind"),
    [
        (b"", "cut"),  # closed at a chunk boundary: readline() alone would call it an end
        (b"5\r\nda", "cut"),  # closed mid-chunk
        (b"0\r\n\r\n", "lost"),  # a whole body that never sent [DONE] or an error
        (b"%x\r\ndata: [DONE]\n\n\r\n0\r\n\r\n" % len(b"data: [DONE]\n\n"), "whole"),
    ],
)
def test_a_broken_connection_is_cut_and_a_short_stream_is_lost(tail: bytes, kind: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        server = threading.Thread(target=_serve, args=(sock, tail))
        server.start()
        got, detail = one_request("127.0.0.1", sock.getsockname()[1], "m", True, 10)
        server.join()
    assert got == kind, detail
