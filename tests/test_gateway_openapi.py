"""``/openapi.json``, and schemathesis fuzzing the gateway from it, with and without a key:
no 5xx, and every error in OpenAI's shape.

The gateway and a fake engine run in a thread with their own event loop, because
schemathesis calls the API synchronously (``requests``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_upstream import FakeUpstream
from hypothesis import HealthCheck, settings
from test_gateway_proxy import add_record, gateway

from gateway.anthropic import is_anthropic
from gateway.keys import create_key
from gateway.openapi import document

schemathesis = pytest.importorskip("schemathesis")

pytestmark = pytest.mark.timeout(120)

schema = schemathesis.openapi.from_dict(document())


class LiveGateway:
    """A gateway with a keys file and one ready fake replica of ``m``, in a thread."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.keys = tmp_path / "keys.yaml"
        self.key = create_key(self.keys, "fuzzer", requests_per_min=100_000)
        self.url = ""
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        async with FakeUpstream() as fake:
            add_record(self.tmp_path / "registry", "m", fake.base_url)
            async with gateway(self.tmp_path, keys_file=self.keys) as url:
                self.url = url
                self._ready.set()
                await self._stop.wait()

    def __enter__(self) -> LiveGateway:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    with LiveGateway(tmp_path_factory.mktemp("fuzz")) as running:
        yield running


def assert_openai_error(body: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "server_error")


def assert_anthropic_error(body: Any) -> None:
    assert isinstance(body, dict) and set(body) == {"type", "error"}, body
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_openapi_json_is_served_without_a_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    create_key(keys, "alice")
    async with (
        gateway(tmp_path, keys_file=keys) as url,
        aiohttp.ClientSession() as client,
        client.get(url + "/openapi.json") as resp,
    ):
        assert resp.status == 200
        served = await resp.json()
    assert served == document()
    assert served["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/embeddings", "/healthz"} <= set(served["paths"])


@pytest.mark.parametrize("with_key", [True, False])
@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_fuzzed_requests_get_no_5xx_and_openai_shaped_errors(
    case: Any, live: LiveGateway, with_key: bool
) -> None:
    headers = {"Authorization": f"Bearer {live.key}"} if with_key else {}
    if not with_key and case.headers:
        case.headers.pop("Authorization", None)
    if not with_key and case.headers:
        case.headers.pop("x-api-key", None)
    response = case.call(base_url=live.url, headers=headers, timeout=10)
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and is_anthropic(case.path):
        assert_anthropic_error(response.json())
    elif response.status_code >= 400:
        assert_openai_error(response.json())
    if not with_key and case.path not in ("/healthz", "/openapi.json"):
        assert response.status_code == 401
