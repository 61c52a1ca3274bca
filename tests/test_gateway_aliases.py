"""Aliases and fallback models from models.yaml, through the gateway on real ports.

Upstreams are ``FakeUpstream``s (the wire format of vLLM / llama.cpp) listed as static
backends or as registry records; the gateway runs through ``server.start``.

The openai client's fallback answer comes from the session's bare llama-server as a static
backend (tests/realengine.py); docs/testing.md lists which tests keep the fake, and why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_upstream import FakeUpstream, Knobs
from realengine import BareEngine
from test_gateway_proxy import CHAT, add_record, assert_openai_error, chat, gateway

from gateway.keys import create_key
from gateway.routes import build_routes
from hpc.spec import ModelsFile

pytestmark = pytest.mark.timeout(30)

SERVED = "x-mt-served-model"


def models_yaml(tmp_path: Path, big: str, small: str, *, big_static: bool = True) -> Path:
    """``big`` (alias ``large``, falls back to ``tiny`` = ``small``) and ``small``."""
    if big_static:
        big_entry = f"static:\n  - name: big\n    base_url: {big}\n"
    else:  # configured as a model: routable only through a registry record
        big_entry = "models:\n  - name: big\n    engine: vllm\n    weights: {source: org/big}\n"
        big_entry += "    aliases: [large]\n    fallbacks: [tiny]\nstatic:\n"
    text = big_entry
    if big_static:
        text += "    aliases: [large]\n    fallbacks: [tiny]\n"
    text += f"  - name: small\n    base_url: {small}\n    aliases: [tiny]\n"
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_the_route_table_resolves_aliases_and_lists_them() -> None:
    models = ModelsFile.model_validate(
        {
            "models": [
                {
                    "name": "big",
                    "engine": "vllm",
                    "weights": {"source": "org/big"},
                    "aliases": ["large"],
                    "fallbacks": ["tiny"],
                }
            ],
            "static": [{"name": "small", "base_url": "http://h/v1", "aliases": ["tiny"]}],
        }
    )
    table = build_routes([], models, {})
    assert table.resolve("large") == "big"
    assert table.resolve("big") == "big"
    assert table.fallbacks("big") == ("small",)
    assert table.fallbacks("small") == ()
    # big has no replica: its alias is known but not listed; small's alias is listed.
    assert table.names() == ["small", "tiny"]
    assert table.is_known("large")
    assert [u.model for u in table.pick("tiny")] == []  # pick takes model names, not aliases


async def post(
    url: str, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as client,
        client.post(url + CHAT, json=payload, headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def test_an_alias_routes_to_its_model_under_the_models_own_name(tmp_path: Path) -> None:
    async with FakeUpstream() as big, FakeUpstream() as small:
        models = models_yaml(tmp_path, big.base_url, small.base_url)
        async with gateway(tmp_path, models_file=models) as url:
            status, headers, _ = await post(url, chat("large"))
            async with aiohttp.ClientSession() as client, client.get(url + "/v1/models") as resp:
                listed = [m["id"] for m in (await resp.json())["data"]]
    assert status == 200
    assert headers[SERVED] == "big"
    assert json.loads(big.seen.bodies[0])["model"] == "big"
    assert small.seen.requests == 0
    assert listed == ["big", "large", "small", "tiny"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_model_without_a_ready_replica_is_served_by_its_fallback(
    tmp_path: Path, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    async with FakeUpstream() as small:
        models = models_yaml(tmp_path, "", small.base_url, big_static=False)
        async with gateway(tmp_path, models_file=models) as url:
            status, headers, data = await post(url, chat("big", stream=stream))
            async with aiohttp.ClientSession() as client, client.get(url + "/metrics") as resp:
                metrics = await resp.text()
    assert status == 200
    assert headers[SERVED] == "small"
    assert b"tok2" in data
    sent = json.loads(small.seen.bodies[0])
    assert sent["model"] == "small"
    assert sent["messages"] == chat("big")["messages"]
    assert 'mt_gateway_fallbacks_total{model="big",served_model="small"} 1' in metrics
    (line,) = [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "gateway.access" and r.fields["path"] == CHAT  # type: ignore[attr-defined]
    ]
    assert (line["model"], line["served_model"]) == ("big", "small")


async def test_a_model_whose_replicas_all_fail_is_served_by_its_fallback(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(status=500)) as big, FakeUpstream() as small:
        models = models_yaml(tmp_path, big.base_url, small.base_url)
        async with gateway(tmp_path, models_file=models) as url:
            status, headers, data = await post(url, chat("big", stream=True))
    assert status == 200
    assert headers[SERVED] == "small"
    assert data.endswith(b"data: [DONE]\n\n")
    assert (big.seen.requests, small.seen.requests) == (1, 1)


async def test_a_healthy_model_never_uses_its_fallback(tmp_path: Path) -> None:
    async with FakeUpstream() as big, FakeUpstream() as small:
        models = models_yaml(tmp_path, big.base_url, small.base_url)
        async with gateway(tmp_path, models_file=models) as url:
            for stream in (False, True):
                status, headers, _ = await post(url, chat("big", stream=stream))
                assert (status, headers[SERVED]) == (200, "big")
    assert (big.seen.requests, small.seen.requests) == (2, 0)


async def test_a_stream_cut_after_its_first_event_is_not_moved_to_the_fallback(
    tmp_path: Path,
) -> None:
    async with FakeUpstream(Knobs(tokens=5, cut_after=1)) as big, FakeUpstream() as small:
        models = models_yaml(tmp_path, big.base_url, small.base_url)
        async with gateway(tmp_path, models_file=models) as url:
            status, headers, data = await post(url, chat("big", stream=True))
    assert (status, headers[SERVED]) == (200, "big")
    assert b"tok0" in data
    assert b"[DONE]" not in data
    assert small.seen.requests == 0


async def test_a_fallback_the_key_may_not_use_is_skipped(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    key = create_key(keys, "alice", models=("big",))
    async with FakeUpstream(Knobs(status=500)) as big, FakeUpstream() as small:
        models = models_yaml(tmp_path, big.base_url, small.base_url)
        async with gateway(tmp_path, models_file=models, keys_file=keys) as url:
            status, _, data = await post(
                url, chat("big"), headers={"Authorization": f"Bearer {key}"}
            )
    assert status == 502
    assert_openai_error(json.loads(data), "upstream_error")
    assert small.seen.requests == 0


async def test_a_registry_replica_of_an_aliased_model_serves_the_alias(tmp_path: Path) -> None:
    async with FakeUpstream() as fake:
        models = models_yaml(tmp_path, "", "http://127.0.0.1:9/v1", big_static=False)
        add_record(tmp_path / "registry", "big", fake.base_url)
        async with gateway(tmp_path, models_file=models) as url:
            status, headers, _ = await post(url, chat("large"))
    assert (status, headers[SERVED]) == (200, "big")
    assert json.loads(fake.seen.bodies[0])["model"] == "big"


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_the_openai_client_gets_the_fallbacks_answer(
    tmp_path: Path, bare_engine: BareEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    openai = pytest.importorskip("openai")
    models = models_yaml(tmp_path, "", bare_engine.base_url, big_static=False)
    # small is the real llama-server, run bare as a static backend is: it wants its key.
    text = models.read_text().replace(
        "    aliases: [tiny]\n", "    aliases: [tiny]\n    api_key_env: SMALL_ENGINE_KEY\n"
    )
    models.write_text(text)
    monkeypatch.setenv("SMALL_ENGINE_KEY", bare_engine.key)
    async with gateway(tmp_path, models_file=models) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        async with client:
            raw = await client.chat.completions.with_raw_response.create(
                model="big", messages=chat("big")["messages"], max_tokens=4
            )
            reply = raw.parse()
            stream = await client.chat.completions.create(
                model="large", messages=chat("big")["messages"], max_tokens=4, stream=True
            )
            reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert raw.headers[SERVED] == "small"
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 4
    assert len(reasons) > 1  # streamed, not one block
    assert reasons[-1] in ("length", "stop")
