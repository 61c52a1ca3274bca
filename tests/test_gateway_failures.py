"""The failure contract: the three timeouts, engines' in-band errors, admission control, and
a slow reader back-pressuring the engine instead of being buffered.

Upstreams are ``FakeUpstream``s (the wire format of vLLM / llama.cpp); the gateway runs
through ``server.start`` on real ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from fake_upstream import FakeUpstream, Knobs
from test_gateway_proxy import CHAT, add_record, assert_openai_error, chat, gateway

from gateway.admission import Admission

pytestmark = pytest.mark.timeout(30)


def events_of(data: bytes) -> list[bytes]:
    return [e for e in data.split(b"\n\n") if e]


async def read_all(resp: aiohttp.ClientResponse) -> bytes:
    return b"".join([chunk async for chunk in resp.content.iter_any()])


@contextlib.contextmanager
def unanswering_port() -> Iterator[str]:
    """A URL whose port is listening but whose accept queue is full: a SYN sent there gets
    no answer, like a node that is down behind a firewall that drops packets."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):  # Linux queues backlog + 1; the rest wait unanswered
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            for filler in fillers:
                filler.close()


async def test_an_upstream_that_never_accepts_is_504_upstream_connect_timeout(
    tmp_path: Path,
) -> None:
    with unanswering_port() as url_of_nobody:
        add_record(tmp_path / "registry", "m", url_of_nobody)
        async with (
            gateway(tmp_path, connect_timeout_s=0.3) as url,
            aiohttp.ClientSession() as client,
        ):
            started = time.monotonic()
            async with client.post(url + CHAT, json=chat("m")) as resp:
                assert resp.status == 504
                assert_openai_error(await resp.json(), "upstream_connect_timeout")
            assert time.monotonic() - started < 5


async def test_a_stream_silent_after_its_first_token_gets_an_idle_timeout_event(
    tmp_path: Path,
) -> None:
    # The second token would come 5 s after the first; the idle limit is 0.3 s.
    async with FakeUpstream(Knobs(tokens=3, tokens_per_s=0.2)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path, first_token_timeout_s=10, idle_timeout_s=0.3) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            assert resp.status == 200
            data = await read_all(resp)
    events = events_of(data)
    assert b"tok0" in events[0]
    error = json.loads(events[-1][len(b"data: ") :])
    assert_openai_error(error, "upstream_idle_timeout")
    assert b"[DONE]" not in data


async def test_a_slow_steady_stream_longer_than_every_timeout_is_not_cut(tmp_path: Path) -> None:
    # ~2.2 s of generation: four times each limit, yet no single wait comes near one.
    async with FakeUpstream(Knobs(ttft_s=0.2, tokens=20, tokens_per_s=10)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        limits = {"connect_timeout_s": 0.5, "first_token_timeout_s": 0.5, "idle_timeout_s": 0.5}
        async with (
            gateway(tmp_path, **limits) as url,
            aiohttp.ClientSession() as client,
        ):
            started = time.monotonic()
            async with client.post(url + CHAT, json=chat("m", stream=True)) as resp:
                data = await read_all(resp)
            took_s = time.monotonic() - started
    assert took_s > 4 * 0.5
    assert data.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in data
    assert len(events_of(data)) == 21


async def test_an_engines_in_band_error_is_passed_on_and_ends_the_stream(tmp_path: Path) -> None:
    # The fake, like vLLM, sends its error event and then the usage chunk and [DONE].
    async with FakeUpstream(Knobs(tokens=5, error_after=2)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            assert resp.status == 200
            data = await read_all(resp)
    events = events_of(data)
    assert [b"tok0" in events[0], b"tok1" in events[1]] == [True, True]
    assert len(events) == 3
    error = json.loads(events[-1][len(b"data: ") :])
    assert_openai_error(error, "upstream_error")
    assert "fake engine failed" in error["error"]["message"]
    assert b"[DONE]" not in data


def test_only_an_error_at_the_start_of_a_data_event_counts() -> None:
    from gateway.proxy.sse import engine_error_at

    # Inside content, JSON escapes the quotes: no match.
    quoted = b'data: {"choices": [{"delta": {"content": "{\\"error\\": 1}"}}]}\n\n'
    assert engine_error_at(quoted) == -1
    assert engine_error_at(b'data: {"x": {"error": 1}}\n\n') == -1
    first = b'data: {"choices": []}\n\n'
    assert engine_error_at(first + b'data: {"error": {"message": "m"}}\n\n') == len(first)
    assert engine_error_at(b'data:{"error": "oom"}\n\n') == 0


def test_admission_caps_per_model_and_in_total() -> None:
    admission = Admission(max_total=3, max_per_model=2)
    assert admission.enter("a") is None
    assert admission.enter("a") is None
    assert admission.enter("a") == "model"
    assert admission.enter("b") is None
    assert admission.enter("c") == "gateway"
    admission.leave("a")
    assert admission.enter("a") is None
    for model in ("a", "a", "b"):
        admission.leave(model)
    assert (admission.total, admission.in_flight("a")) == (0, 0)


@pytest.mark.parametrize(
    ("settings", "code"),
    [
        ({"max_in_flight_per_model": 2}, "model_at_capacity"),
        ({"max_in_flight": 2}, "gateway_at_capacity"),
    ],
)
async def test_the_request_past_the_cap_is_503_with_retry_after(
    tmp_path: Path, settings: dict[str, int], code: str
) -> None:
    n = 2
    async with FakeUpstream(Knobs(ttft_s=1.0)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path, retry_after_s=1, **settings) as url,
            aiohttp.ClientSession() as client,
        ):
            held = [
                asyncio.ensure_future(client.post(url + CHAT, json=chat("m"))) for _ in range(n)
            ]
            while fake.seen.requests < n:
                await asyncio.sleep(0.01)
            async with client.post(url + CHAT, json=chat("m")) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                assert_openai_error(await resp.json(), code)
            for answer in await asyncio.gather(*held):
                assert answer.status == 200
                answer.release()
            # The slots are free again.
            async with client.post(url + CHAT, json=chat("m")) as resp:
                assert resp.status == 200
    assert fake.seen.requests == n + 1


async def test_a_slow_reader_pauses_the_engine_instead_of_being_buffered(tmp_path: Path) -> None:
    chunk_bytes = 256 * 1024
    tokens = 200  # 50 MiB in all: more than every socket buffer on the way together
    async with FakeUpstream(Knobs(tokens=tokens, pad_bytes=chunk_bytes)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url:
            port = int(url.rsplit(":", 1)[1])
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
            body = json.dumps(chat("m", stream=True)).encode()
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            await writer.drain()
            # The client reads nothing: the engine must soon be unable to write.
            await asyncio.sleep(1.5)
            stalled_at = fake.seen.chunks_sent
            await asyncio.sleep(0.5)
            assert fake.seen.chunks_sent == stalled_at
            assert fake.seen.completed == 0
            assert stalled_at * chunk_bytes < tokens * chunk_bytes / 2
            # Reading resumes the stream, which then ends whole.
            tail = b""
            while True:
                data = await asyncio.wait_for(reader.read(1024 * 1024), 10)
                if not data:
                    break
                tail = (tail + data)[-64:]
                if b"data: [DONE]\n\n" in tail:
                    break
            writer.close()
    assert b"data: [DONE]\n\n" in tail
    assert fake.seen.chunks_sent == tokens
