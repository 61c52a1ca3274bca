"""The usage event the gateway adds when a client asked for one and the engine sent none.

llama-cpp-python's server sends no usage event even with ``stream_options.include_usage``;
the ``FakeUpstream`` with ``no_usage`` speaks that wire format (and vLLM's with it off), so
the counts are exact here; tests/test_gateway_usage_llamacpp.py runs the real server.

An engine that sends its own usage is the session's real llama-server job
(tests/realengine.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_upstream import FakeUpstream, Knobs
from realengine import RealEngine
from test_gateway_limits import bearer
from test_gateway_metrics import scrape
from test_gateway_proxy import CHAT, add_record, assert_openai_error, gateway

from gateway.keys import create_key
from gateway.proxy.usage import content_events, stream_id

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(30)

PROMPT = [{"role": "user", "content": "x" * 40}]  # estimated at 40 / 4 = 10 tokens


def streamed(usage: bool | None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": PROMPT, "stream": True, **extra}
    if usage is not None:
        body["stream_options"] = {"include_usage": usage}
    return body


def events(raw: bytes) -> list[bytes]:
    return [e.strip() for e in raw.split(b"\n\n") if e.strip()]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]


async def test_the_openai_client_gets_a_usage_chunk_the_engine_never_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    async with FakeUpstream(Knobs(tokens=5, no_usage=True)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            async with client:
                stream = await client.chat.completions.create(
                    model="m",
                    messages=PROMPT,  # type: ignore[arg-type]
                    stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = [chunk async for chunk in stream]
            metrics = await scrape(url)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (10, 5)
    assert last.usage.total_tokens == 15
    assert last.id == "cmpl-fake"  # the stream's own id
    assert [c for c in chunks if c.usage is not None] == [last]
    line = access_lines(caplog)[0]
    assert line["tokens_estimated"] is True
    assert (line["prompt_tokens"], line["completion_tokens"]) == (10, 5)
    m = 'model="m"'
    assert metrics[("mt_gateway_estimated_tokens_total", f'{m},kind="completion"')] == 5
    assert metrics[("mt_gateway_tokens_total", f'{m},kind="completion"')] == 5


async def test_usage_before_done_and_nothing_added_for_a_client_that_did_not_ask(
    tmp_path: Path,
) -> None:
    async with FakeUpstream(Knobs(tokens=3, no_usage=True)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
            bodies = []
            for usage in (True, None, False):
                async with client.post(url + CHAT, json=streamed(usage)) as resp:
                    assert resp.status == 200
                    bodies.append(events(await resp.read()))
    asked, unasked, off = bodies
    assert asked[-1] == b"data: [DONE]"
    usage = json.loads(asked[-2][len(b"data: ") :])
    assert usage["usage"]["completion_tokens"] == 3
    assert usage["choices"] == []
    assert usage["object"] == "chat.completion.chunk"
    assert usage["model"] == "m"
    # Without include_usage the stream is the engine's, byte for byte (minus nothing).
    assert len(unasked) == len(off) == 4
    assert not [e for e in unasked + off if b'"usage"' in e]
    assert unasked[-1] == off[-1] == b"data: [DONE]"


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_an_engine_that_sends_usage_keeps_its_own_exact_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, real_engine: RealEngine
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    real_engine.record_in(tmp_path / "registry", "m")
    async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
        bodies = []
        for _ in range(2):  # the second time the replica is known to send usage
            async with client.post(url + CHAT, json=streamed(True, max_tokens=4)) as resp:
                assert resp.status == 200
                bodies.append(events(await resp.read()))
    for body in bodies:
        (usage,) = [json.loads(e[6:])["usage"] for e in body if b'"usage"' in e]
        # llama-server's own usage object, passed on: a field the gateway never makes up
        assert "prompt_tokens_details" in usage
        assert 0 < usage["completion_tokens"] <= 4
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert body[-1] == b"data: [DONE]"
    assert [line["tokens_estimated"] for line in access_lines(caplog)] == [None, None]


async def test_a_completions_stream_gets_its_usage_too(tmp_path: Path) -> None:
    body = {"model": "m", "prompt": "y" * 20, "stream": True}
    body["stream_options"] = {"include_usage": True}
    async with FakeUpstream(Knobs(tokens=6, no_usage=True)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + "/v1/completions", json=body) as resp,
        ):
            got = events(await resp.read())
    usage = json.loads(got[-2][6:])
    assert usage["object"] == "text_completion"
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}


async def test_a_broken_stream_gets_its_error_event_and_no_made_up_usage(
    tmp_path: Path,
) -> None:
    async with FakeUpstream(Knobs(tokens=5, no_usage=True, error_after=2)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path) as url,
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json=streamed(True)) as resp,
        ):
            got = events(await resp.read())
    assert b"fake engine failed" in got[-1]
    assert not [e for e in got if b'"usage"' in e or e == b"data: [DONE]"]


async def test_tokens_per_minute_sees_the_counted_tokens(tmp_path: Path) -> None:
    # 10 prompt (estimated) + 10 counted completion tokens; a limit of 25 lets the first
    # stream in and refuses the second, as it would with an engine that reports usage.
    keys = tmp_path / "keys.yaml"
    key = create_key(keys, "alice", tokens_per_min=25)
    async with FakeUpstream(Knobs(tokens=10, no_usage=True)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path, keys_file=keys) as url, aiohttp.ClientSession() as client:
            statuses = []
            for _ in range(3):
                async with client.post(url + CHAT, json=streamed(True), headers=bearer(key)) as r:
                    statuses.append(r.status)
                    body = await r.read()
    assert statuses == [200, 200, 429]  # the second starts with 5 tokens left
    assert_openai_error(json.loads(body), "rate_limit_tokens")


def test_content_events_counts_events_that_carry_text() -> None:
    role = b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}'
    token = b'data: {"choices": [{"delta": {"content": "Hel"}}]}'
    compact = b'data: {"choices":[{"delta":{"content":"lo"}}]}'
    tool = b'data: {"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\\"a"}}]}}]}'
    text = b'data: {"choices": [{"text": " x", "index": 0}]}'
    quoted = b'data: {"choices": [{"delta": {"content": "say \\"text\\": \\"\\""}}]}'
    finish = b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}'
    null = b'data: {"choices": [{"delta": {"content": null}}]}'
    chunk = b"\n\n".join([role, token, compact, tool, text, quoted, finish, null, b"data: [DONE]"])
    assert content_events(chunk + b"\n\n") == 5
    assert stream_id(b'data: {"id": "chatcmpl-7", "choices": []}\n\n') == "chatcmpl-7"
    assert stream_id(b"data: {}\n\n") is None
