"""The gateway's HTTP/1.1 upstream client (gateway/proxy/http1.py, pool.py) against real
servers: aiohttp apps, and raw sockets for what aiohttp never sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from gateway.proxy.http1 import (
    Head,
    UpstreamConnection,
    UpstreamError,
    UpstreamUnreachable,
    request_bytes,
)
from gateway.proxy.pool import Pool, endpoint

pytestmark = pytest.mark.asyncio


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def _sse(request: web.Request) -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    for i in range(int(request.query.get("n", "5"))):
        await out.write(b'data: {"i": %d}\n\n' % i)
    await out.write(b"data: [DONE]\n\n")
    await out.write_eof()
    return out


async def _json(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"echo": body.decode(), "auth": request.headers.get("Authorization")})


@pytest.fixture
async def server() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/sse", _sse)
    app.router.add_post("/json", _json)
    app.router.add_get("/empty", lambda r: web.Response(status=204))
    runner, port = await _serve(app)
    yield port
    await runner.cleanup()


async def _exchange(
    pool: Pool, port: int, method: str, path: str, body: bytes = b""
) -> tuple[Head, bytes, UpstreamConnection, bool]:
    conn, reused = await pool.connect("http", "127.0.0.1", port)
    auth = {"Authorization": "Bearer k"}
    head = await conn.send(request_bytes(method, path, f"127.0.0.1:{port}", auth, body))
    parts = []
    while chunk := await conn.read():
        parts.append(chunk)
    return head, b"".join(parts), conn, reused


async def test_pulls_a_chunked_stream_and_reuses_the_connection(server: int) -> None:
    pool = Pool(connect_timeout_s=5)
    head, body, conn, reused = await _exchange(pool, server, "GET", "/sse?n=50")
    assert head.status == 200 and head.content_type == "text/event-stream"
    assert body.count(b"\n\n") == 51 and body.endswith(b"data: [DONE]\n\n")
    assert not reused
    pool.release(conn)
    head, body, conn2, reused = await _exchange(pool, server, "POST", "/json", b"hello")
    assert reused and conn2 is conn
    assert head.status == 200 and b'"echo": "hello"' in body and b"Bearer k" in body
    pool.release(conn2)
    head, body, _, reused = await _exchange(pool, server, "GET", "/empty")
    assert head.status == 204 and body == b"" and reused
    pool.close()


async def test_pushes_a_stream_piece_by_piece(server: int) -> None:
    pool = Pool(connect_timeout_s=5)
    conn, _ = await pool.connect("http", "127.0.0.1", server)
    await conn.send(request_bytes("GET", "/sse?n=200", "x", {}, b""))
    first = await conn.read()
    got: list[bytes] = [first]
    done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    class Sink:
        def feed(self, data: bytes) -> None:
            got.append(data)

        def end(self, exc: BaseException | None) -> None:
            done.set_result(exc)

    conn.push_to(Sink())
    assert await asyncio.wait_for(done, 10) is None
    body = b"".join(got)
    assert body.count(b"\n\n") == 201 and body.endswith(b"data: [DONE]\n\n")
    assert conn.reusable
    pool.close()


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _raw_server(answer: Answer) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_chunk_sizes_split_anywhere_and_close_delimited_bodies() -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for i in range(len(wire)):  # one byte per write: every split point
            writer.write(wire[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        await reader.read()  # keep-alive: the client closes

    srv, port = await _raw_server(trickle)
    pool = Pool(connect_timeout_s=5)
    head, body, conn, _ = await _exchange(pool, port, "GET", "/")
    assert head.status == 200 and body == b"hello world" and conn.reusable
    pool.close()
    srv.close()

    async def to_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    srv, port = await _raw_server(to_close)
    head, body, conn, _ = await _exchange(pool, port, "GET", "/")
    assert body == b"all of it" and not conn.reusable
    srv.close()


async def test_a_cut_stream_and_garbage_are_errors() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        await writer.drain()
        writer.close()

    srv, port = await _raw_server(cut)
    pool = Pool(connect_timeout_s=5)
    with pytest.raises(UpstreamError, match="closed the connection"):
        await _exchange(pool, port, "GET", "/")
    srv.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()

    srv, port = await _raw_server(garbage)
    with pytest.raises(UpstreamError, match=r"not HTTP/1\.1"):
        await _exchange(pool, port, "GET", "/")
    srv.close()


async def test_connection_refused_is_an_upstream_error() -> None:
    srv, port = await _raw_server(lambda r, w: asyncio.sleep(0))
    srv.close()
    await srv.wait_closed()
    with pytest.raises(UpstreamError, match="cannot connect"):
        await Pool(connect_timeout_s=5).connect("http", "127.0.0.1", port)


async def test_a_pooled_connection_the_upstream_closed_is_retried_on_a_fresh_one() -> None:
    connections = 0

    async def drops_its_second_request(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # A keep-alive connection the engine closes just as it is reused: the second
        # request on it is read, then dropped without a byte of an answer.
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    srv, port = await _raw_server(drops_its_second_request)
    pool = Pool(connect_timeout_s=5)
    target = endpoint(f"http://127.0.0.1:{port}/v1")
    assert target.path == "/v1" and target.host_header == f"127.0.0.1:{port}"
    data = request_bytes("POST", "/v1/x", target.host_header, {}, b"{}")
    conn, head = await pool.request(target, data)
    assert head.status == 200 and await conn.read() == b"ok" and await conn.read() == b""
    pool.release(conn)
    conn2, head = await pool.request(target, data)  # reuses conn, which is dropped: retried
    assert head.status == 200 and await conn2.read() == b"ok"
    assert conn2 is not conn and conn.closed and connections == 2
    pool.close()
    srv.close()


async def test_a_bad_base_url_is_unreachable() -> None:
    with pytest.raises(UpstreamUnreachable):
        endpoint("unix:///tmp/x.sock")
