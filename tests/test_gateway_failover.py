"""Failing over to another replica while nothing has reached the client, and not after.

Two ``FakeUpstream`` replicas (the wire format of vLLM / llama.cpp) serve one model; the
route table's round robin makes each of two requests try a different replica first, so
exactly one of them meets the failing replica first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fake_upstream import FakeUpstream, Knobs
from test_gateway_proxy import CHAT, add_record, assert_openai_error, chat, gateway

pytestmark = pytest.mark.timeout(30)

WHOLE_STREAM = [b"tok0", b"tok1", b"tok2", b"[DONE]"]


def events_of(data: bytes) -> list[bytes]:
    return [e for e in data.split(b"\n\n") if e]


async def two_requests(tmp_path: Path, bad: Knobs, *, stream: bool) -> tuple[Any, ...]:
    """Two requests over a failing and a healthy replica: (answers, bad.seen, good.seen)."""
    async with FakeUpstream(bad) as failing, FakeUpstream() as healthy:
        add_record(tmp_path / "registry", "m", failing.base_url)
        add_record(tmp_path / "registry", "m", healthy.base_url)
        answers = []
        async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
            for _ in range(2):
                async with client.post(url + CHAT, json=chat("m", stream=stream)) as resp:
                    answers.append((resp.status, await resp.read()))
    return answers, failing.seen, healthy.seen


@pytest.mark.parametrize(
    "bad",
    [Knobs(status=500), Knobs(error_after=0), Knobs(cut_after=0)],
    ids=["answers-500", "first-event-is-an-error", "drops-before-first-event"],
)
async def test_a_stream_that_fails_before_its_first_event_is_answered_by_the_other_replica(
    tmp_path: Path, bad: Knobs
) -> None:
    answers, failing, healthy = await two_requests(tmp_path, bad, stream=True)
    for status, data in answers:
        assert status == 200
        events = events_of(data)
        assert [any(part in e for e in events) for part in WHOLE_STREAM] == [True] * 4
        assert b'"error"' not in data
    assert (failing.requests, healthy.requests) == (1, 2)


async def test_a_500_to_a_plain_request_is_answered_by_the_other_replica(tmp_path: Path) -> None:
    answers, failing, healthy = await two_requests(tmp_path, Knobs(status=500), stream=False)
    for status, data in answers:
        assert status == 200
        assert json.loads(data)["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert (failing.requests, healthy.requests) == (1, 2)


@pytest.mark.parametrize(
    "bad", [Knobs(tokens=5, cut_after=1), Knobs(tokens=5, error_after=1)], ids=["cut", "error"]
)
async def test_a_failure_after_the_first_event_is_not_retried(tmp_path: Path, bad: Knobs) -> None:
    answers, failing, healthy = await two_requests(tmp_path, bad, stream=True)
    assert [status for status, _ in answers] == [200, 200]
    cut = [data for _, data in answers if b"[DONE]" not in data]
    assert len(cut) == 1
    events = events_of(cut[0])
    assert b"tok0" in events[0]
    assert_openai_error(json.loads(events[-1][len(b"data: ") :]), "upstream_error")
    assert (failing.requests, healthy.requests) == (1, 1)


async def test_a_4xx_is_passed_on_and_never_retried(tmp_path: Path) -> None:
    answers, failing, healthy = await two_requests(tmp_path, Knobs(status=400), stream=False)
    assert sorted(status for status, _ in answers) == [200, 400]
    assert (failing.requests, healthy.requests) == (1, 1)


@pytest.mark.parametrize(
    ("upstream_status", "status", "code"),
    [(500, 502, "upstream_error"), (503, 503, "upstream_unavailable")],
)
@pytest.mark.parametrize("stream", [True, False])
async def test_when_every_replica_fails_the_client_gets_one_error(
    tmp_path: Path, upstream_status: int, status: int, code: str, stream: bool
) -> None:
    knobs = Knobs(status=upstream_status, retry_after="3")
    async with FakeUpstream(knobs) as one, FakeUpstream(knobs) as two:
        add_record(tmp_path / "registry", "m", one.base_url)
        add_record(tmp_path / "registry", "m", two.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=stream)) as resp,
        ):
            assert resp.status == status
            body = await resp.json()
            retry_after = resp.headers.get("Retry-After")
    assert_openai_error(body, code)
    assert f"fake engine answers {upstream_status}" in body["error"]["message"]
    assert retry_after == ("3" if status == 503 else None)
    assert (one.seen.requests, two.seen.requests) == (1, 1)


async def test_a_first_event_error_from_the_only_replica_is_one_502(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(error_after=0)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            assert resp.status == 502
            assert resp.content_type == "application/json"
            body = await resp.json()
    assert_openai_error(body, "upstream_error")
    assert "fake engine failed" in body["error"]["message"]


@pytest.mark.parametrize("stream", [True, False])
async def test_a_first_token_timeout_is_final_not_retried(tmp_path: Path, stream: bool) -> None:
    # The clock is the request's: a second replica would start with none of it left.
    async with FakeUpstream(Knobs(ttft_s=10)) as one, FakeUpstream(Knobs(ttft_s=10)) as two:
        add_record(tmp_path / "registry", "m", one.base_url)
        add_record(tmp_path / "registry", "m", two.base_url)
        async with (
            gateway(tmp_path, first_token_timeout_s=0.2) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=stream)) as resp,
        ):
            assert resp.status == 504
            assert_openai_error(await resp.json(), "upstream_first_token_timeout")
    assert one.seen.requests + two.seen.requests == 1


_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/opt/engine/server.py", line 412, in create_embedding\n'
    "    raise RuntimeError('this model does not do embeddings')\n"
    "RuntimeError: this model does not do embeddings"
)


async def _engine_answering(status: int, message: str) -> tuple[web.AppRunner, str]:
    """A stand-in engine (an aiohttp app: the wire format of llama-cpp-python's server) that
    answers every request with ``status`` and an OpenAI-shaped error of ``message``."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        error = {"message": message, "type": "internal_server_error", "code": status}
        return web.json_response({"error": error}, status=status)

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"


@pytest.mark.parametrize(
    ("engine_status", "counts"), [(500, False), (503, True)], ids=["500", "503"]
)
async def test_an_engines_500_keeps_its_traceback_in_the_log_and_the_replica_in_rotation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, engine_status: int, counts: bool
) -> None:
    runner, base_url = await _engine_answering(engine_status, _TRACEBACK)
    try:
        add_record(tmp_path / "registry", "m", base_url)
        async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
            for _ in range(4):  # more than the failures in a row that skip a replica
                async with client.post(url + "/v1/embeddings", json={"model": "m"}) as resp:
                    assert resp.status in (502, 503)
                    error = (await resp.json())["error"]
                assert "Traceback" not in error["message"] and "File" not in error["message"]
                assert "its message is in the gateway's log" in error["message"]
            async with client.get(url + "/healthz") as resp:
                ready = (await resp.json())["replicas"]["m"]["ready"]
    finally:
        await runner.cleanup()
    # A 500 is one request's failure, not the replica's; a 503 says the replica is down.
    assert ready == (0 if counts else 1)
    logged = [getattr(r, "fields", {}).get("detail") for r in caplog.records]
    assert _TRACEBACK in logged
