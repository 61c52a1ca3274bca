"""Caps on open client connections (issue 16), over raw sockets against a real gateway: past
the total or the per-address cap a connection gets 503 + Retry-After in OpenAI's shape at
once and is closed; a place freed by a closed connection is taken by the next one."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from test_gateway_input import raw_response
from test_gateway_proxy import assert_openai_error

from gateway.config import GatewayConfig
from gateway.connections import Connections, is_loopback_address
from gateway.fdlimit import connection_cap
from gateway.keys import create_key
from gateway.protocol import REFUSED_LINGER_S
from gateway.server import start
from gateway.state import CONFIG, CONNECTIONS

pytestmark = pytest.mark.timeout(60)

_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
_METRICS = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def _gateway(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[int, Connections]]:
    """A running gateway; yields its port and its connection counts."""
    runner, port = await start(
        GatewayConfig(port=0, registry_dir=tmp_path / "registry", **settings)
    )
    try:
        yield port, runner.app[CONNECTIONS]
    finally:
        await runner.cleanup()


async def _get(conn: Conn, request: bytes = _HEALTHZ) -> tuple[int, dict[str, str], bytes]:
    reader, writer = conn
    writer.write(request)
    await writer.drain()
    return await raw_response(reader)


async def _refused(host: str, port: int, code: str) -> None:
    """A new connection is answered 503 with ``code``, then closed by the gateway, although
    its client sent a request and keeps its own side open."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        status, headers, body = await _get((reader, writer))
        assert (status, headers["content-type"]) == (503, "application/json")
        assert headers["retry-after"] == "5"
        assert headers["connection"] == "close"
        assert_openai_error(json.loads(body), code)
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


async def _served_once_a_place_is_free(host: str, port: int) -> Conn:
    """A new connection that is served: the gateway may take a moment to see a close."""
    for _ in range(100):
        conn = await asyncio.open_connection(host, port)
        status, _, _ = await _get(conn)
        if status == 200:
            return conn
        conn[1].close()
        await asyncio.sleep(0.05)
    raise AssertionError("no place came free")


async def test_connections_past_the_total_cap_are_refused_until_one_closes(
    tmp_path: Path,
) -> None:
    async with _gateway(tmp_path, max_connections=3) as (port, counts):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for conn in held:
            assert (await _get(conn))[0] == 200
        await _refused("127.0.0.1", port, "connection_limit")
        # The held connections are untouched (keep-alive), and the refusal took no place.
        status, _, text = await _get(held[0], _METRICS)
        assert status == 200
        assert "mt_gateway_connections_open 3\n" in text.decode()
        assert 'mt_gateway_connections_refused_total{limit="total"} 1\n' in text.decode()
        # A refused client that never closes its side is closed by the gateway soon after.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await raw_response(reader))[0] == 503
        for _ in range(int(REFUSED_LINGER_S * 40)):
            if counts.lingering == 0:
                break
            await asyncio.sleep(0.05)
        assert counts.lingering == 0
        writer.close()
        held[0][1].close()
        held[0] = await _served_once_a_place_is_free("127.0.0.1", port)
        for _, writer in held:
            writer.close()


def _own_address() -> str | None:
    """This host's address on its default route (no packet is sent), if not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if is_loopback_address(address) else address


async def test_connections_past_the_per_client_cap_are_refused_until_one_closes(
    tmp_path: Path,
) -> None:
    address = _own_address()
    if address is None:
        pytest.skip("this host has no address but loopback (which has no per-client cap)")
    keys = tmp_path / "keys.yaml"
    create_key(keys, "alice")  # listening beyond loopback needs keys; /healthz needs none
    settings = {"host": address, "keys_file": keys, "max_connections_per_client": 2}
    async with _gateway(tmp_path, **settings) as (port, _):
        held = [await asyncio.open_connection(address, port) for _ in range(2)]
        for conn in held:
            assert (await _get(conn))[0] == 200
        await _refused(address, port, "client_connection_limit")
        held[1][1].close()
        held[1] = await _served_once_a_place_is_free(address, port)
        for _, writer in held:
            writer.close()


async def test_loopback_clients_share_only_the_total_cap(tmp_path: Path) -> None:
    # Every SSH tunnel to a login node's gateway arrives from 127.0.0.1: one address, many
    # people. The per-client cap does not apply to it.
    async with _gateway(tmp_path, max_connections_per_client=1) as (port, _):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        for conn in held:
            assert (await _get(conn))[0] == 200
        for _, writer in held:
            writer.close()


async def test_the_default_caps_follow_the_open_file_limit(tmp_path: Path) -> None:
    runner, _ = await start(GatewayConfig(port=0, registry_dir=tmp_path / "registry"))
    try:
        config = runner.app[CONFIG]
    finally:
        await runner.cleanup()
    total = connection_cap(resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # as it left it
    assert total > 100  # far above what normal use holds open
    assert (config.max_connections, config.max_connections_per_client) == (total, total // 4)


def test_connections_are_counted_per_address_and_forgotten_at_zero() -> None:
    counts = Connections(max_total=3, max_per_client=1)
    assert counts.open("10.0.0.1") is None
    assert counts.open("10.0.0.1") == "client"
    assert counts.open("::ffff:127.0.0.1") is None  # loopback, mapped: no per-client cap
    assert counts.open("::1") is None
    assert counts.open("10.0.0.2") == "total"
    counts.close("10.0.0.1")
    assert counts.open("10.0.0.2") is None
    assert counts.refused == {"total": 1, "client": 1}
    for host in ("10.0.0.2", "::1", "::ffff:127.0.0.1"):
        counts.close(host)
    assert counts.total == 0
    assert counts.open("10.0.0.1") is None  # the address was forgotten, not left at 1
