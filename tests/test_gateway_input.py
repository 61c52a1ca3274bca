"""Hostile and oversized input to the gateway (issue 16): clients that trickle their bodies,
bodies nested too deeply to parse, bodies over (and under) a raised size limit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
from fake_upstream import FakeUpstream
from test_gateway_proxy import CHAT, add_record, assert_openai_error, chat, gateway

# Headers that promise a 1,000-byte body, then one byte of it.
_TRICKLE = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
)


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    """The status and JSON body of the one response on a raw connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = await asyncio.wait_for(reader.readexactly(length), 30)
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


def test_the_cli_sets_both_limits() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hpc.cli", "gateway", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "--max-body-mb" in out and "--body-timeout" in out
