"""Eviction never cuts a request in flight: the slot drains, then swaps.

The pool's app and slots run in this test's event loop; its engines are real processes of
bench.fakeengine (standing for llama.cpp's server: same routes, SSE wire format, /v1/models
health) started through the pool's launcher hook, because a stream must last for as many
tokens as the test says, which the real model cannot promise (it may stop at its EOS).
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from hpc.job.engines import EngineLaunch
from hpc.job.plan import PoolPlan
from hpc.job.poolapp import create_app
from hpc.job.slots import Slots
from hpc.spec import ModelSpec, PoolSpec

TOKENS = 40
KEY = "mtj-test-pool-key"


def fake_launcher(
    spec: ModelSpec, *, listen: Path, api_key: str, environ: Mapping[str, str]
) -> EngineLaunch:
    """bench.fakeengine in place of the model's engine: 40 tokens at 20 per second."""
    argv = [sys.executable, "-m", "bench.fakeengine", "--uds", str(listen), "--model", spec.name]
    argv += ["--tokens", str(TOKENS), "--tokens-per-s", "20"]
    return EngineLaunch(argv=argv, env={}, health_path="/v1/models", health_needs_key=False)


def _plan(tmp_path: Path) -> PoolPlan:
    specs = tuple(
        ModelSpec.model_validate(
            {"name": name, "engine": "llamacpp", "weights": {"source": "/unused.gguf"}}
        )
        for name in ("model-a", "model-b")
    )
    pool = PoolSpec(name="pool", models=("model-a", "model-b"), slots=1)
    return PoolPlan(
        pool=pool,
        catalogue=specs,
        backend="local",
        nonce="n",
        registry_dir=tmp_path,
        stop_grace_s=2,
    )


async def _status(client: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with client.get(url + "/pool/status", headers={"Authorization": f"Bearer {KEY}"}) as r:
        data: dict[str, Any] = await r.json()
    return data


async def _chat(client: aiohttp.ClientSession, url: str, model: str) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with client.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        data: dict[str, Any] = await r.json()
    return data


async def test_a_swap_waits_for_the_stream_in_flight(tmp_path: Path) -> None:
    out = io.StringIO()
    async with aiohttp.ClientSession() as client:
        slots = Slots(_plan(tmp_path), {}, out, fake_launcher)
        server = TestServer(create_app(slots, KEY), host="127.0.0.1")
        await server.start_server()
        url = str(server.make_url("")).rstrip("/")
        try:
            assert (await _chat(client, url, "model-a"))["model"] == "model-a"
            body = {
                "model": "model-a",
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            }
            headers = {"Authorization": f"Bearer {KEY}"}
            async with client.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                events = [await r.content.readline()]  # A's stream has begun
                b_answer = asyncio.create_task(_chat(client, url, "model-b"))
                while (await _status(client, url))["slots"][0]["state"] != "draining":
                    await asyncio.sleep(0.02)
                status = await _status(client, url)
                assert status["slots"][0]["model"] == "model-a"
                assert status["slots"][0]["in_flight"] == 1
                events += [line async for line in r.content]
            data = [e for e in events if e.startswith(b"data: ")]
            assert data[-1] == b"data: [DONE]\n"  # A's stream ended whole, not cut
            chunks = [json.loads(e[6:]) for e in data[:-1]]
            assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"]) >= TOKENS
            assert (await b_answer)["model"] == "model-b"
            status = await _status(client, url)
            assert status["slots"][0]["model"] == "model-b"
            assert status["slots"][0]["loads"] == 2
            log = out.getvalue()
            assert log.index("evicting model-a for model-b") < log.index("stopping model-a")
        finally:
            await slots.stop_all()
            await server.close()
