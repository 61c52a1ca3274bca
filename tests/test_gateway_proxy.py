"""The gateway end to end on real ports: routing, auth, errors, streaming, cancellation.

Upstreams are ``FakeUpstream``s (the OpenAI wire format of vLLM / llama.cpp); registry
records are written with the real ``Registry``; the gateway runs through ``server.start``.

The happy paths a real engine can serve run against the session's real llama-server job
(tests/realengine.py); docs/testing.md lists which tests keep the fake, and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fake_upstream import FakeUpstream, Knobs
from pydantic import SecretStr
from realengine import RealEngine

from gateway.config import GatewayConfig
from gateway.keys import create_key
from gateway.logs import JsonFormatter
from gateway.server import start
from hpc.registry import Record, Registry, State, new_nonce

pytestmark = pytest.mark.timeout(30)

JOB_KEY = "mtj-job-key-for-tests"
CHAT = "/v1/chat/completions"


def add_record(
    registry_dir: Path,
    model: str,
    base_url: str,
    *,
    key: str = JOB_KEY,
    state: State = "ready",
    tls_sha256: str | None = None,
) -> Record:
    """Write a registry record the way a job wrapper does."""
    record = Record(
        backend="local",
        job_id=new_nonce(),
        nonce=new_nonce(),
        model=model,
        engine="llamacpp",
        state=state,
        base_url=base_url,
        api_key=SecretStr(key),
        tls_sha256=tls_sha256,
    )
    Registry(registry_dir).write(record)
    return record


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (a port just released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, **settings: Any) -> AsyncIterator[str]:
    """A running gateway on an ephemeral port; yields its base URL."""
    settings.setdefault("registry_dir", tmp_path / "registry")
    runner, port = await start(GatewayConfig(port=0, **settings))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def chat(model: str, *, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def assert_openai_error(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]


async def test_chat_completion_is_forwarded_with_the_original_body(tmp_path: Path) -> None:
    async with FakeUpstream() as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
            raw = b'{"model": "m",   "messages": [{"role": "user", "content": "hi"}]}'
            headers = {"Content-Type": "application/json"}
            async with client.post(url + CHAT, data=raw, headers=headers) as resp:
                assert resp.status == 200
                body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert fake.seen.bodies == [raw]  # byte for byte, not re-serialized


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 4}, "text"),
        ("/v1/embeddings", {"model": "m", "input": "hi"}, "embedding"),
    ],
)
async def test_completions_and_embeddings_are_forwarded(
    tmp_path: Path, path: str, payload: dict[str, Any], field: str, real_engine: RealEngine
) -> None:
    real_engine.record_in(tmp_path / "registry", "m")
    async with (
        gateway(tmp_path) as url,
        aiohttp.ClientSession() as client,
        client.post(url + path, json=payload) as resp,
    ):
        assert resp.status == 200
        body = await resp.json()
    assert len(body["data" if field == "embedding" else "choices"]) == 1
    assert field in json.dumps(body)
    assert body["usage"]["prompt_tokens"] > 0  # the engine's own count


async def test_unknown_model_is_404_model_not_found(tmp_path: Path) -> None:
    async with (
        gateway(tmp_path) as url,
        aiohttp.ClientSession() as client,
        client.post(url + CHAT, json=chat("nope")) as resp,
    ):
        assert resp.status == 404
        body = await resp.json()
    assert_openai_error(body, "model_not_found")
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "model"


async def test_configured_model_without_ready_endpoint_is_503_with_retry_after(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n  - name: qwen\n    engine: llamacpp\n    weights: {source: org/qwen}\n"
    )
    async with (
        gateway(tmp_path, models_file=models, retry_after_s=7) as url,
        aiohttp.ClientSession() as client,
        client.post(url + CHAT, json=chat("qwen")) as resp,
    ):
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "7"
        body = await resp.json()
    assert_openai_error(body, "no_ready_endpoint")
    assert "configured but has no ready endpoint" in body["error"]["message"]
    assert "mt submit qwen" in body["error"]["message"]


async def test_a_starting_job_is_503_not_404(tmp_path: Path) -> None:
    add_record(tmp_path / "registry", "warming", closed_port_url(), state="starting")
    async with (
        gateway(tmp_path) as url,
        aiohttp.ClientSession() as client,
        client.post(url + CHAT, json=chat("warming")) as resp,
    ):
        assert resp.status == 503
        assert "Retry-After" in resp.headers
        assert_openai_error(await resp.json(), "no_ready_endpoint")


async def test_keys_file_guards_v1_and_the_upstream_only_sees_the_job_key(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.yaml"
    client_key = create_key(keys, "alice")
    async with FakeUpstream(Knobs(require_key=JOB_KEY)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path, keys_file=keys) as url, aiohttp.ClientSession() as client:
            async with client.post(url + CHAT, json=chat("m")) as resp:
                assert resp.status == 401
                assert_openai_error(await resp.json(), "invalid_api_key")
            bad = {"Authorization": "Bearer mt-not-a-real-key"}
            async with client.post(url + CHAT, json=chat("m"), headers=bad) as resp:
                assert resp.status == 401
                assert_openai_error(await resp.json(), "invalid_api_key")
            async with client.get(url + "/v1/models", headers=bad) as resp:
                assert resp.status == 401
            good = {"Authorization": f"Bearer {client_key}"}
            async with client.post(url + CHAT, json=chat("m"), headers=good) as resp:
                assert resp.status == 200
            async with client.get(url + "/v1/models", headers=good) as resp:
                assert resp.status == 200
            async with client.get(url + "/healthz") as resp:
                assert resp.status == 200
            # Deny by default: paths outside /v1 (and misspelled ones) need a key too.
            for path in ("/nothing", "//v1/models", "/v1/../v1/models"):
                async with client.get(url + path) as resp:
                    assert resp.status == 401, path
    # Rejected requests never reached the upstream; the accepted one carried the job key.
    assert fake.seen.authorization == [f"Bearer {JOB_KEY}"]


async def test_logs_never_contain_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = tmp_path / "keys.yaml"
    client_key = create_key(keys, "alice")
    caplog.set_level(logging.DEBUG)
    async with FakeUpstream(Knobs(cut_after=1)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path, keys_file=keys) as url, aiohttp.ClientSession() as client:
            for key in (client_key, "mt-wrong-key"):
                headers = {"Authorization": f"Bearer {key}"}
                async with client.post(
                    url + CHAT, json=chat("m", stream=True), headers=headers
                ) as resp:
                    await resp.read()
    lines = [JsonFormatter().format(r) for r in caplog.records]
    access = [json.loads(line) for line in lines if '"msg": "request"' in line]
    assert [entry["status"] for entry in access] == [200, 401]
    assert access[0]["client"] == "alice"
    assert access[0]["model"] == "m"
    assert {"ts", "level", "request_id", "method", "path", "upstream", "duration_ms"} <= set(
        access[0]
    )
    for line in lines:
        assert client_key not in line
        assert JOB_KEY not in line
        assert "mt-wrong-key" not in line


async def test_body_over_the_limit_is_413_in_openai_shape(tmp_path: Path) -> None:
    async with FakeUpstream() as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        big = {"model": "m", "prompt": "x" * 4096}
        async with (
            gateway(tmp_path, max_body_mb=1024 / (1024 * 1024)) as url,
            aiohttp.ClientSession() as client,
            client.post(url + "/v1/completions", json=big) as resp,
        ):
            assert resp.status == 413
            assert_openai_error(await resp.json(), "request_too_large")
    assert fake.seen.requests == 0


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_body"),
        (b'{"messages": []}', "missing_model"),
        (b'{"model": 3}', "missing_model"),
    ],
)
async def test_bad_request_bodies_are_400(tmp_path: Path, raw: bytes, code: str) -> None:
    async with (
        gateway(tmp_path) as url,
        aiohttp.ClientSession() as client,
        client.post(url + CHAT, data=raw) as resp,
    ):
        assert resp.status == 400
        assert_openai_error(await resp.json(), code)


async def test_unknown_path_and_wrong_method_use_the_openai_shape(tmp_path: Path) -> None:
    async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
        async with client.get(url + "/v1/nothing-here") as resp:
            assert resp.status == 404
            assert_openai_error(await resp.json(), "not_found")
        async with client.get(url + CHAT) as resp:
            assert resp.status == 405
            assert "POST" in resp.headers["Allow"]
            assert_openai_error(await resp.json(), "method_not_allowed")


async def test_backend_down_is_503_upstream_unavailable(tmp_path: Path) -> None:
    add_record(tmp_path / "registry", "m", closed_port_url())
    async with (
        gateway(tmp_path) as url,
        aiohttp.ClientSession() as client,
        client.post(url + CHAT, json=chat("m")) as resp,
    ):
        assert resp.status == 503
        assert "Retry-After" in resp.headers
        assert_openai_error(await resp.json(), "upstream_unavailable")


async def test_one_replica_down_the_other_answers_every_request(tmp_path: Path) -> None:
    async with FakeUpstream() as fake:
        add_record(tmp_path / "registry", "m", closed_port_url())
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
            # Round robin puts the dead replica first on every other request.
            for _ in range(4):
                async with client.post(url + CHAT, json=chat("m")) as resp:
                    assert resp.status == 200
            async with client.post(url + CHAT, json=chat("m", stream=True)) as resp:
                assert resp.status == 200
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert fake.seen.requests == 5


async def test_requests_are_spread_over_live_replicas(tmp_path: Path) -> None:
    async with FakeUpstream() as one, FakeUpstream() as two:
        add_record(tmp_path / "registry", "m", one.base_url)
        add_record(tmp_path / "registry", "m", two.base_url)
        async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
            for _ in range(4):
                async with client.post(url + CHAT, json=chat("m")) as resp:
                    assert resp.status == 200
    assert (one.seen.requests, two.seen.requests) == (2, 2)


async def test_upstream_json_errors_pass_through_with_their_status(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(status=429)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            assert resp.status == 429
            body = await resp.json()
    assert body["error"]["message"] == "fake engine answers 429"


async def test_upstream_non_json_error_is_502(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(status=500, raw_error=b"<html>oops</html>")) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m")) as resp,
        ):
            assert resp.status == 502
            assert_openai_error(await resp.json(), "upstream_error")


async def test_upstream_rejecting_the_job_key_is_502_not_401(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(require_key="mtj-some-other-key")) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m")) as resp,
        ):
            assert resp.status == 502
            assert_openai_error(await resp.json(), "upstream_error")


async def test_silent_upstream_is_504_upstream_first_token_timeout(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(ttft_s=10)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path, first_token_timeout_s=0.2) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m")) as resp,
        ):
            assert resp.status == 504
            assert_openai_error(await resp.json(), "upstream_first_token_timeout")


async def _read_stream(resp: aiohttp.ClientResponse) -> tuple[bytes, list[float]]:
    data = b""
    arrivals: list[float] = []
    async for chunk in resp.content.iter_any():
        arrivals.append(time.monotonic())
        data += chunk
    return data, arrivals


async def test_stream_arrives_chunk_by_chunk(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(tokens=5, tokens_per_s=20)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["Cache-Control"] == "no-cache"
            assert resp.headers["X-Accel-Buffering"] == "no"
            data, arrivals = await _read_stream(resp)
    assert len(arrivals) > 1
    # The first chunk reached the client before the upstream had even sent its last one.
    assert fake.seen.last_chunk_at is not None
    assert arrivals[0] < fake.seen.last_chunk_at
    events = [e for e in data.split(b"\n\n") if e]
    assert len(events) == 6
    assert events[-1] == b"data: [DONE]"
    assert b'"error"' not in data


async def test_stream_cut_by_the_upstream_ends_with_an_error_event_and_no_done(
    tmp_path: Path,
) -> None:
    async with FakeUpstream(Knobs(tokens=5, cut_after=2)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            assert resp.status == 200
            data, _ = await _read_stream(resp)
    events = [e for e in data.split(b"\n\n") if e]
    assert len(events) == 3
    assert b"tok1" in events[1]
    assert events[-1].startswith(b"data: ")
    error = json.loads(events[-1][len(b"data: ") :])
    assert_openai_error(error, "upstream_error")
    assert b"[DONE]" not in data


async def test_stream_ending_without_done_gets_an_error_event(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(tokens=2, omit_done=True)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            data, _ = await _read_stream(resp)
    events = [e for e in data.split(b"\n\n") if e]
    assert len(events) == 3
    error = json.loads(events[-1][len(b"data: ") :])
    assert_openai_error(error, "upstream_error")
    assert "without [DONE]" in error["error"]["message"]


async def test_stream_without_a_first_token_in_time_is_504_before_any_byte(
    tmp_path: Path,
) -> None:
    # The upstream's 200 and headers came at once; the gateway commits its own 200 only
    # with the first event, so the client still gets a plain 504.
    async with FakeUpstream(Knobs(ttft_s=10)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path, first_token_timeout_s=0.2) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            assert resp.status == 504
            assert_openai_error(await resp.json(), "upstream_first_token_timeout")


async def test_a_stream_longer_than_the_idle_timeout_is_not_cut(tmp_path: Path) -> None:
    # 30 tokens at 20/s take ~1.5 s, three times the idle timeout; no gap comes near it.
    async with FakeUpstream(Knobs(tokens=30, tokens_per_s=20)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path, idle_timeout_s=0.5) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            data, _ = await _read_stream(resp)
    assert data.endswith(b"data: [DONE]\n\n")
    assert fake.seen.first_chunk_at is not None
    assert fake.seen.last_chunk_at is not None
    assert fake.seen.last_chunk_at - fake.seen.first_chunk_at > 0.5


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_the_upstream_request(tmp_path: Path, stream: bool) -> None:
    # The upstream "prefills" for a minute: nothing is written to the client meanwhile, so
    # only the disconnect itself can tell the gateway to stop.
    async with FakeUpstream(Knobs(ttft_s=60)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
            request = asyncio.ensure_future(client.post(url + CHAT, json=chat("m", stream=stream)))
            # Streaming or not, no header comes before the first token (the gateway
            # commits its 200 with the first event): the client gives up while waiting.
            while fake.seen.requests == 0:
                await asyncio.sleep(0.01)
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
            await asyncio.wait_for(fake.seen.cancelled_event.wait(), 10)
    assert fake.seen.cancelled == 1
    assert fake.seen.completed == 0


async def test_request_id_is_echoed_and_forwarded(tmp_path: Path) -> None:
    async with FakeUpstream() as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
            headers = {"X-Request-Id": "req-123"}
            async with client.post(url + CHAT, json=chat("m"), headers=headers) as resp:
                assert resp.headers["X-Request-Id"] == "req-123"
            async with client.post(url + CHAT, json=chat("m", stream=True)) as resp:
                generated = resp.headers["X-Request-Id"]
                await resp.read()
            async with client.get(url + "/v1/nothing") as resp:
                assert resp.headers["X-Request-Id"]
    assert len(generated) >= 16
    assert fake.seen.request_ids == ["req-123", generated]


async def test_models_and_healthz_list_ready_records_and_static_backends(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("static:\n  - name: ext\n    base_url: http://127.0.0.1:9/v1\n")
    registry = tmp_path / "registry"
    add_record(registry, "a", closed_port_url())
    add_record(registry, "a", closed_port_url())
    add_record(registry, "b", closed_port_url(), state="starting")
    async with gateway(tmp_path, models_file=models) as url, aiohttp.ClientSession() as client:
        async with client.get(url + "/v1/models") as resp:
            listing = await resp.json()
        async with client.get(url + "/healthz") as resp:
            health = await resp.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["a", "ext"]
    for entry in listing["data"]:
        assert entry["object"] == "model"
        assert entry["owned_by"] == "modeltainer"
        assert isinstance(entry["created"], int)
    replicas = {"a": {"ready": 2, "total": 2}, "ext": {"ready": 1, "total": 1}}
    assert health == {"status": "ok", "models": 2, "replicas": replicas}


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_the_openai_client_works_through_the_gateway(
    tmp_path: Path, real_engine: RealEngine
) -> None:
    openai = pytest.importorskip("openai")
    keys = tmp_path / "keys.yaml"
    client_key = create_key(keys, "alice")
    hi = [{"role": "user", "content": "hi"}]
    real_engine.record_in(tmp_path / "registry", "m")
    async with gateway(tmp_path, keys_file=keys) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=client_key, max_retries=0)
        try:
            listed = await client.models.list()
            assert [m.id for m in listed.data] == ["m"]
            reply = await client.chat.completions.create(model="m", messages=hi, max_tokens=4)
            assert reply.usage is not None
            assert 0 < reply.usage.completion_tokens <= 4
            stream = await client.chat.completions.create(
                model="m", messages=hi, max_tokens=4, stream=True
            )
            reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
            assert len(reasons) > 1  # streamed, not one block
            assert reasons[-1] in ("length", "stop")
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="nope", messages=hi, max_tokens=4)
        finally:
            await client.close()


async def test_a_dropped_connection_is_retried_once_on_the_same_replica(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(drop_requests=1)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m")) as resp,
        ):
            assert resp.status == 200
    assert fake.seen.requests == 2
    assert fake.seen.completed == 1


async def test_a_replica_that_keeps_dropping_connections_is_503(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(drop_requests=100)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m")) as resp,
        ):
            assert resp.status == 503
            assert_openai_error(await resp.json(), "upstream_unavailable")
    assert fake.seen.requests == 2


async def test_a_body_broken_after_done_is_a_whole_stream_not_an_error(tmp_path: Path) -> None:
    """llama-cpp-python's server, interrupted, sends [DONE] and then ends the chunked body
    badly; the client already has a whole stream, so no error event may follow [DONE]."""

    async def botched(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n')
        await out.write(b"data: [DONE]\n\n")
        assert request.transport is not None
        request.transport.abort()  # no terminating chunk: the client sees a payload error
        return out

    app = web.Application()
    app.router.add_post("/v1/chat/completions", botched)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        add_record(tmp_path / "registry", "m", f"http://127.0.0.1:{port}/v1")
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=chat("m", stream=True)) as resp,
        ):
            data, _ = await _read_stream(resp)
    finally:
        await runner.cleanup()
    assert resp.status == 200
    assert data.rstrip().endswith(b"data: [DONE]") and b'"error"' not in data
