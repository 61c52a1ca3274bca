"""The official ``openai`` client against the gateway: chat (streaming and not), embeddings,
errors it raises, and its retries on 429/503 honouring the ``Retry-After`` it is sent.

The happy paths a real engine can serve run against the session's real llama-server job
(tests/realengine.py); docs/testing.md lists which tests keep the fake, and why.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fake_upstream import FakeUpstream, Knobs
from realengine import RealEngine
from test_gateway_proxy import add_record, gateway

from gateway.keys import create_key

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(30)

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_chat_streaming_and_not_and_embeddings(
    tmp_path: Path, real_engine: RealEngine
) -> None:
    keys = tmp_path / "keys.yaml"
    client_key = create_key(keys, "alice")
    real_engine.record_in(tmp_path / "registry", "m")
    async with gateway(tmp_path, keys_file=keys) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=client_key, max_retries=0)
        async with client:
            reply = await client.chat.completions.create(model="m", messages=HI, max_tokens=4)
            assert reply.choices[0].message.role == "assistant"
            assert reply.usage is not None
            assert 0 < reply.usage.completion_tokens <= 4

            stream = await client.chat.completions.create(
                model="m", messages=HI, max_tokens=4, stream=True
            )
            chunks = [c async for c in stream]  # the client reads up to [DONE]
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] is not None

            embedded = await client.embeddings.create(model="m", input="hi")
            assert len(embedded.data) == 1
            assert len(embedded.data[0].embedding) > 1
            assert all(isinstance(x, float) for x in embedded.data[0].embedding)

            completion = await client.completions.create(
                model="m", prompt="Once upon a time", max_tokens=4
            )
            assert completion.usage is not None
            assert 0 < completion.usage.completion_tokens <= 4


async def test_an_in_band_engine_error_is_raised_by_the_client(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(tokens=5, error_after=2)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            async with client:
                stream = await client.chat.completions.create(model="m", messages=HI, stream=True)
                parts: list[str] = []
                with pytest.raises(openai.APIError, match="fake engine failed"):
                    async for chunk in stream:
                        parts.append(chunk.choices[0].delta.content or "")
    assert parts == ["tok0 ", "tok1 "]


@pytest.mark.parametrize("status", [429, 503])
async def test_the_client_retries_and_honours_retry_after(tmp_path: Path, status: int) -> None:
    # 0.9 s twice is more than the client's own backoff (0.5 s then 1 s, less jitter) can
    # add up to, so the time taken shows it waited as told.
    knobs = Knobs(status=status, status_first=2, retry_after="0.9")
    async with FakeUpstream(knobs) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=2)
            async with client:
                started = time.monotonic()
                reply = await client.chat.completions.create(model="m", messages=HI)
                took_s = time.monotonic() - started
    assert reply.choices[0].message.content == "tok0 tok1 tok2 "
    assert fake.seen.requests == 3
    assert 1.8 <= took_s < 5


@pytest.mark.parametrize("status", [429, 503])
async def test_without_retries_the_client_raises_the_status_with_retry_after(
    tmp_path: Path, status: int
) -> None:
    async with FakeUpstream(Knobs(status=status, retry_after="7")) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            async with client:
                with pytest.raises(openai.APIStatusError) as caught:
                    await client.chat.completions.create(model="m", messages=HI)
    assert caught.value.status_code == status
    assert caught.value.response.headers["Retry-After"] == "7"
    assert fake.seen.requests == 1


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_the_gateways_own_rate_limit_is_a_rate_limit_error(
    tmp_path: Path, real_engine: RealEngine
) -> None:
    keys = tmp_path / "keys.yaml"
    client_key = create_key(keys, "alice", requests_per_min=1)
    real_engine.record_in(tmp_path / "registry", "m")
    async with gateway(tmp_path, keys_file=keys) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=client_key, max_retries=0)
        async with client:
            await client.chat.completions.create(model="m", messages=HI, max_tokens=2)
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(model="m", messages=HI, max_tokens=2)
    assert int(caught.value.response.headers["Retry-After"]) > 0
