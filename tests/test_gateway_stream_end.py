"""A client that closes as soon as a Responses stream's last event reached it (Codex CLI does,
before the engine has ended its HTTP body) had its whole answer: the access log says 200,
not 499, while a client that leaves before that event is still a 499.

The upstream is a small aiohttp app on port 0 standing for an engine's ``/v1/responses``
(vLLM's and llama-server's event lines) that keeps its body open after the last event until
the test lets it end: the race a real engine and a quick client win or lose by chance,
held open so it is lost every time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from test_gateway_proxy import add_record, gateway

from gateway.logs import JsonFormatter

pytestmark = pytest.mark.timeout(60)

_CREATED = b'event: response.created\ndata: {"type":"response.created"}\n\n'
_DELTA = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"}\n\n'
_COMPLETED = b'event: response.completed\ndata: {"type":"response.completed"}\n\n'


@asynccontextmanager
async def _lingering_engine(events: list[bytes], release: asyncio.Event) -> AsyncIterator[str]:
    """An engine's ``/v1/responses`` that streams ``events``, then holds its body open until
    ``release`` is set; yields its OpenAI root."""

    async def responses(request: web.Request) -> web.StreamResponse:
        await request.read()
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for event in events:
            await out.write(event)
        await release.wait()
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        release.set()
        await runner.cleanup()


async def _read_until_then_close(url: str, mark: bytes) -> None:
    body = {"model": "m", "input": "hi", "stream": True}
    async with aiohttp.ClientSession() as client, client.post(url, json=body) as resp:
        assert resp.status == 200
        seen = b""
        while mark not in seen:
            chunk = await resp.content.readany()
            assert chunk, seen
            seen += chunk
        # Leaving the block closes the connection with the body unfinished.


async def _access_entry(caplog: pytest.LogCaptureFixture) -> dict[str, object]:
    for _ in range(200):  # the gateway logs once its cancelled handler has unwound
        lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "gateway.access"]
        if lines:
            entry = json.loads(lines[-1])
            assert isinstance(entry, dict)
            return entry
        await asyncio.sleep(0.05)
    raise AssertionError("no access-log line")


@pytest.mark.parametrize(
    ("events", "mark", "status", "outcome"),
    [
        ([_CREATED, _DELTA, _COMPLETED], b"response.completed", 200, "client_closed_after_end"),
        ([_CREATED, _DELTA], b"output_text.delta", 499, None),
    ],
    ids=["after-the-last-event", "before-it"],
)
async def test_a_client_closing_after_the_last_event_had_its_answer(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    events: list[bytes],
    mark: bytes,
    status: int,
    outcome: str | None,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    release = asyncio.Event()
    async with _lingering_engine(events, release) as engine:
        add_record(tmp_path / "registry", "m", engine)
        async with gateway(tmp_path) as url:
            await _read_until_then_close(url + "/v1/responses", mark)
            entry = await _access_entry(caplog)
    assert (entry["path"], entry["status"], entry["outcome"]) == (
        "/v1/responses",
        status,
        outcome,
    )
