"""Hostile and oversized input to the gateway (issue 16): clients that trickle their bodies,
bodies nested too deeply to parse, bodies over (and under) a raised size limit, requests
aiohttp itself cannot parse (answered in OpenAI's shape, not aiohttp's plain text)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from fake_upstream import FakeUpstream
from test_gateway_proxy import CHAT, add_record, assert_openai_error, chat, gateway

from gateway.app import create_app
from gateway.config import GatewayConfig

# Headers that promise a 1,000-byte body, then one byte of it.
_TRICKLE = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
)


async def raw_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """The status, headers (lower-cased names) and body of the next response on a raw
    connection (bounded only so a broken gateway fails the test instead of hanging it)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {
        name.strip().lower(): value.strip()
        for name, value in (line.split(":", 1) for line in lines[1:] if line)
    }
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 30)
    return status, headers, body


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    """The status and JSON body of the one response on a raw connection."""
    status, _, body = await raw_response(reader)
    return status, json.loads(body)


async def test_clients_that_trickle_their_bodies_are_capped_then_timed_out(
    tmp_path: Path,
) -> None:
    async with FakeUpstream() as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path, max_in_flight=2, body_timeout_s=1.0) as url:
            port = int(url.rsplit(":", 1)[1])
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
            for _, writer in conns[:2]:
                writer.write(_TRICKLE)
                await writer.drain()
            await asyncio.sleep(0.2)  # the first two now hold the gateway's two places
            for _, writer in conns[2:]:
                writer.write(_TRICKLE)
                await writer.drain()
            # Past the cap: refused at once, before any body is read.
            for reader, _ in conns[2:]:
                status, body = await _answer(reader)
                assert status == 503
                assert_openai_error(body, "gateway_at_capacity")
            # The two that hold a place get 408 once the body timeout runs out, and their
            # connections are closed (after aiohttp's lingering read of up to 10 s, which
            # keeps the 408 from being lost to a reset).
            for reader, _ in conns[:2]:
                status, body = await _answer(reader)
                assert status == 408
                assert_openai_error(body, "request_timeout")
            for reader, _ in conns[:2]:
                assert await asyncio.wait_for(reader.read(), 30) == b""
            for _, writer in conns:
                writer.close()
            # The places are free again.
            async with (
                aiohttp.ClientSession() as client,
                client.post(url + CHAT, json=chat("m")) as resp,
            ):
                assert resp.status == 200
    assert fake.seen.requests == 1


async def test_a_body_nested_too_deeply_is_400_not_500(tmp_path: Path) -> None:
    deep = b"[" * 5000 + b"]" * 5000
    async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
        for raw in (deep, b'{"model": "m", "x": ' + deep + b"}", b"[" * 5000):
            async with client.post(url + CHAT, data=raw) as resp:
                assert resp.status == 400
                assert_openai_error(await resp.json(), "invalid_json")


async def test_a_raised_body_limit_takes_a_large_image(tmp_path: Path) -> None:
    image = "data:image/png;base64," + "A" * (6 * 1024 * 1024)  # over the 4 MiB default
    big = {**chat("m"), "messages": [{"role": "user", "content": image}]}
    async with FakeUpstream() as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=big) as resp,
        ):
            assert resp.status == 413
            assert_openai_error(await resp.json(), "request_too_large")
        async with (
            gateway(tmp_path, max_body_mb=8) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=big) as resp,
        ):
            assert resp.status == 200
    assert fake.seen.requests == 1


def test_the_cli_sets_the_limits() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hpc.cli", "gateway", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "--max-body-mb" in out and "--body-timeout" in out
    assert "--max-connections" in out and "--max-connections-per-client" in out


_CHUNKED = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@pytest.mark.parametrize(
    ("parts", "status", "code"),
    [
        (
            [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 16384 + b"\r\n\r\n"],
            431,
            "header_too_large",
        ),
        (
            [
                b"GET /healthz HTTP/1.1\r\n"
                + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
                + b"\r\n"
            ],
            431,
            "header_too_large",
        ),
        ([b"GET /" + b"a" * 16384 + b" HTTP/1.1\r\nHost: x\r\n\r\n"], 431, "header_too_large"),
        (
            [
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ],
            400,
            "malformed_request",
        ),
        ([b"GARBAGE\r\n\r\n"], 400, "malformed_request"),
        ([b"GET /healthz HTTX/1.1\r\nHost: x\r\n\r\n"], 400, "malformed_request"),
        ([b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n"], 400, "malformed_request"),
        (
            [b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: x1\r\n\r\n"],
            400,
            "malformed_request",
        ),
        ([_CHUNKED + b"zz\r\n{}\r\n0\r\n\r\n"], 400, "malformed_request"),
        # The headers first, the bad chunk later: the handler is reading the body by then.
        ([_CHUNKED, b"2\r\n{}\r\nzz\r\n"], 400, "malformed_request"),
    ],
    ids=[
        "16KiB-header",
        "200-headers",
        "16KiB-url",
        "content-length-and-transfer-encoding",
        "bad-request-line",
        "bad-protocol-name",
        "bad-header-name",
        "bad-content-length",
        "bad-chunk-size",
        "bad-chunk-after-the-headers",
    ],
)
async def test_requests_aiohttp_cannot_parse_get_openai_errors(
    tmp_path: Path, parts: list[bytes], status: int, code: str
) -> None:
    async with gateway(tmp_path) as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.1)
        got, headers, body = await raw_response(reader)
        assert (got, headers["content-type"]) == (status, "application/json")
        error = json.loads(body)
        assert_openai_error(error, code)
        assert error["error"]["type"] == "invalid_request_error"
        assert error["error"]["param"] is None
        assert b"Traceback" not in body
        # The parser has lost its place in the stream: the connection is closed after it.
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()


async def test_an_exception_in_a_handler_is_a_json_500_without_its_detail(
    tmp_path: Path,
) -> None:
    app = create_app(GatewayConfig(port=0, registry_dir=tmp_path / "registry"))

    async def broken(_request: web.Request) -> web.Response:
        """A handler with a bug (added to the real app, behind its real middleware)."""
        raise RuntimeError("secret detail")

    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{port}/broken") as resp,
        ):
            assert resp.status == 500
            assert resp.content_type == "application/json"
            text = await resp.text()
    finally:
        await runner.cleanup()
    assert_openai_error(json.loads(text), "internal_error")
    assert "secret detail" not in text and "Traceback" not in text
