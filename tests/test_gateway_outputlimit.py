"""A model's max_tokens default and cap (``limits:`` in models.yaml), and requests with tools
and image parts passing through the gateway unchanged.

The gateway runs on real ports in front of a ``FakeUpstream`` (the OpenAI wire format of
vLLM / llama.cpp), which records the bodies it receives.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_upstream import FakeUpstream, Knobs
from test_gateway_proxy import CHAT, add_record, assert_openai_error, gateway

from gateway.proxy.outputlimit import limit_output
from hpc.configfile import load_models
from hpc.errors import ConfigError
from hpc.specserving import TokenLimits

pytestmark = pytest.mark.timeout(30)

HI = [{"role": "user", "content": "hi"}]


def models_yaml(tmp_path: Path, limits: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        "  - name: m\n"
        "    engine: vllm\n"
        "    weights: {source: org/m}\n"
        "    aliases: [em]\n"
        f"    limits: {limits}\n"
    )
    return path


async def post(url: str, path: str, raw: bytes) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as client,
        client.post(url + path, data=raw, headers=headers) as resp,
    ):
        return resp.status, await resp.read()


async def test_requests_get_the_default_and_are_clamped_to_the_cap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    models = models_yaml(tmp_path, "{max_tokens_default: 5, max_tokens_cap: 8}")
    sent: list[dict[str, Any]] = [
        {"model": "m", "messages": HI},  # none: the default
        {"model": "m", "messages": HI, "max_tokens": 32000},  # over: the cap
        {"model": "em", "messages": HI, "max_completion_tokens": 100},  # by its alias
        {"model": "m", "messages": HI, "max_tokens": 3},  # within: untouched
        {"model": "m", "messages": HI, "stream": True},  # streams too
        {"model": "m", "prompt": "hi", "max_tokens": 9},  # /v1/completions
    ]
    async with FakeUpstream(Knobs(tokens=20, use_max_tokens=True)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path, models_file=models) as url:
            for payload in sent:
                path = "/v1/completions" if "prompt" in payload else CHAT
                raw = json.dumps(payload).encode()
                status, _ = await post(url, path, raw)
                assert status == 200
    got = [json.loads(body) for body in fake.seen.bodies]
    limits = [(b.get("max_tokens"), b.get("max_completion_tokens")) for b in got]
    assert limits == [(5, None), (8, None), (None, 8), (3, None), (5, None), (8, None)]
    assert fake.seen.bodies[3] == json.dumps(sent[3]).encode()  # byte for byte
    logged = [r.fields["output_limit"] for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]
    assert logged == [
        "default 5",
        "clamped 32000 to 8",
        "clamped 100 to 8",
        None,
        "default 5",
        "clamped 9 to 8",
    ]


async def test_a_cap_alone_is_also_the_limit_of_a_request_without_one(tmp_path: Path) -> None:
    models = models_yaml(tmp_path, "{max_tokens_cap: 7}")
    async with FakeUpstream() as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path, models_file=models) as url:
            for payload in ({"model": "m", "messages": HI}, {"model": "m", "input": "hi"}):
                path = "/v1/embeddings" if "input" in payload else CHAT
                status, _ = await post(url, path, json.dumps(payload).encode())
                assert status == 200
    chat, embed = (json.loads(body) for body in fake.seen.bodies)
    assert chat["max_tokens"] == 7
    assert "max_tokens" not in embed  # embeddings have no output to limit


def test_each_api_s_own_field_is_limited() -> None:
    limits = TokenLimits(max_tokens_default=100, max_tokens_cap=1000)
    responses: dict[str, Any] = {"model": "m", "input": "hi"}
    assert limit_output("/v1/responses", responses, limits) == "default 100"
    assert responses["max_output_tokens"] == 100
    messages: dict[str, Any] = {"model": "m", "max_tokens": 32000}
    assert limit_output("/v1/messages", messages, limits) == "clamped 32000 to 1000"
    assert messages["max_tokens"] == 1000
    odd: dict[str, Any] = {"model": "m", "max_tokens": "many"}
    assert limit_output("/v1/chat/completions", odd, limits) is None  # the engine says 400
    assert odd["max_tokens"] == "many"
    assert limit_output("/v1/embeddings", {"model": "m"}, limits) is None


def test_a_default_above_the_cap_is_a_config_error(tmp_path: Path) -> None:
    models = models_yaml(tmp_path, "{max_tokens_default: 9, max_tokens_cap: 8}")
    with pytest.raises(ConfigError) as caught:
        load_models(models)
    assert "max_tokens_default (9) is above max_tokens_cap (8)" in str(caught.value.issues)


async def test_tools_and_image_parts_pass_through_unchanged(tmp_path: Path) -> None:
    # A 5 MiB image as a base64 data URL: over the default 4 MiB limit, under --max-body-mb 8.
    image = base64.b64encode(b"\x89PNG" + b"\0" * (5 * 1024 * 1024)).decode()
    payload = {
        "model": "m",
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                ],
            }
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    }
    raw = json.dumps(payload, separators=(",", ":")).encode()
    models = models_yaml(tmp_path, "{max_tokens_cap: 8}")
    async with FakeUpstream() as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path, models_file=models) as url:
            status, body = await post(url, CHAT, raw)
            assert status == 413
            assert_openai_error(json.loads(body), "request_too_large")
        async with gateway(tmp_path, models_file=models, max_body_mb=8) as url:
            status, _ = await post(url, CHAT, raw)
            assert status == 200
    assert fake.seen.bodies == [raw]  # the very bytes the client sent
