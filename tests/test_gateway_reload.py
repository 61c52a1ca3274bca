"""Hot reload of the registry, models.yaml and keys.yaml; the last good config stays.

The happy paths a real engine can serve run against the session's real llama-server job
(tests/realengine.py); docs/testing.md lists which tests keep the fake, and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_upstream import FakeUpstream
from pydantic import SecretStr
from realengine import RealEngine

from gateway.config import GatewayConfig
from gateway.keys import create_key
from gateway.logs import JsonFormatter
from gateway.reload import Reloader
from gateway.server import start
from hpc.errors import ConfigError
from hpc.registry import Record, Registry, new_nonce

pytestmark = pytest.mark.timeout(30)

INTERVAL_S = 0.05
CHAT = "/v1/chat/completions"


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, **settings: Any) -> AsyncIterator[str]:
    settings.setdefault("registry_dir", tmp_path / "registry")
    settings.setdefault("reload_interval_s", INTERVAL_S)
    runner, port = await start(GatewayConfig(port=0, **settings))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def eventually(check: Callable[[], Awaitable[object]], timeout_s: float = 10) -> None:
    """Poll an async check until it holds; fail with its last answer after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"still not true after {timeout_s} s: {check.__name__}")
        await asyncio.sleep(INTERVAL_S)


async def model_ids(client: aiohttp.ClientSession, url: str) -> list[str]:
    async with client.get(url + "/v1/models") as resp:
        return [m["id"] for m in (await resp.json())["data"]]


def static_yaml(*backends: tuple[str, str]) -> str:
    lines = ["static:"]
    for name, base_url in backends:
        lines += [f"  - name: {name}", f"    base_url: {base_url}"]
    return "\n".join(lines) + "\n"


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_a_record_turning_ready_becomes_routable(
    tmp_path: Path, real_engine: RealEngine
) -> None:
    registry = Registry(tmp_path / "registry")
    record = Record(
        backend="local",
        job_id="job1",
        nonce=new_nonce(),
        model="m",
        engine="llamacpp",
        state="starting",
        api_key=SecretStr(real_engine.key),
    )
    registry.write(record)
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
        assert await model_ids(client, url) == []
        async with client.post(url + CHAT, json=ask) as resp:
            assert resp.status == 503

        registry.update(
            record.key,
            state="ready",
            base_url=real_engine.base_url,
            tls_sha256=real_engine.tls_sha256,
        )

        async def listed() -> bool:
            return await model_ids(client, url) == ["m"]

        await eventually(listed)
        async with client.post(url + CHAT, json=ask) as resp:
            assert resp.status == 200
            assert (await resp.json())["usage"]["completion_tokens"] > 0

        registry.update(record.key, state="gone")

        async def unlisted() -> bool:
            return await model_ids(client, url) == []

        await eventually(unlisted)
        async with client.post(url + CHAT, json=ask) as resp:
            assert resp.status == 404


async def test_a_bad_models_edit_keeps_the_last_good_config_until_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    models = tmp_path / "models.yaml"
    async with FakeUpstream() as first, FakeUpstream() as second:
        models.write_text(static_yaml(("first", first.base_url)))
        async with gateway(tmp_path, models_file=models) as url, aiohttp.ClientSession() as client:
            assert await model_ids(client, url) == ["first"]

            # Line 4: a typo in a field name.
            models.write_text(static_yaml(("first", first.base_url)) + "    api_key_evn: X\n")

            async def rejected() -> bool:
                return any("config rejected" in r.getMessage() for r in caplog.records)

            await eventually(rejected)
            line = next(
                JsonFormatter().format(r)
                for r in caplog.records
                if "config rejected" in r.getMessage()
            )
            logged = json.loads(line)
            assert logged["level"] == "error"
            assert "models.yaml:4: static[0].api_key_evn: unknown field" in logged["msg"]
            assert logged["file"] == str(models)
            # Still served from the last good config.
            assert await model_ids(client, url) == ["first"]
            async with client.post(url + CHAT, json={"model": "first"}) as resp:
                assert resp.status == 200

            models.write_text(static_yaml(("second", second.base_url)))

            async def fixed() -> bool:
                return await model_ids(client, url) == ["second"]

            await eventually(fixed)
            async with client.post(url + CHAT, json={"model": "second"}) as resp:
                assert resp.status == 200
    assert (first.seen.requests, second.seen.requests) == (1, 1)
    assert any("config accepted" in r.getMessage() for r in caplog.records)


async def test_keys_reload_live_and_a_bad_keys_file_keeps_auth_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    keys = tmp_path / "keys.yaml"
    alice = create_key(keys, "alice")

    def rejected_with(text: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return any(
                "config rejected" in r.getMessage() and text in r.getMessage()
                for r in caplog.records
            )

        return check

    async with gateway(tmp_path, keys_file=keys) as url, aiohttp.ClientSession() as client:

        def status_with(key: str) -> Callable[[], Awaitable[int]]:
            async def check() -> int:
                headers = {"Authorization": f"Bearer {key}"}
                async with client.get(url + "/v1/models", headers=headers) as resp:
                    return resp.status

            return check

        assert await status_with(alice)() == 200
        bob = create_key(keys, "bob")

        async def bob_accepted() -> bool:
            return await status_with(bob)() == 200

        await eventually(bob_accepted)

        keys.write_text("keys: [oops\n")  # broken YAML: the old keys must stay in force
        await eventually(rejected_with("YAML syntax"))
        assert await status_with(alice)() == 200
        assert await status_with(bob)() == 200
        assert await status_with("mt-anything")() == 401
        async with client.get(url + "/v1/models") as resp:
            assert resp.status == 401

        keys.unlink()  # a missing keys file never turns auth off either
        await eventually(rejected_with("file not found"))
        async with client.get(url + "/v1/models") as resp:
            assert resp.status == 401
        assert await status_with(alice)() == 200


@pytest.mark.parametrize("which", ["models", "keys"])
async def test_a_bad_config_file_fails_startup_with_file_and_line(
    tmp_path: Path, which: str
) -> None:
    path = tmp_path / f"{which}.yaml"
    if which == "models":
        path.write_text("static:\n  - name: x\n    base_url: not-a-url\n")
        settings = {"models_file": path}
        expected = r"models.yaml:3: static\[0\].base_url"
    else:
        path.write_text("keys:\n  - name: x\n    sha256: nothex\n")
        settings = {"keys_file": path}
        expected = r"keys.yaml:3: keys\[0\].sha256"
    with pytest.raises(ConfigError, match=expected):
        await start(GatewayConfig(port=0, registry_dir=tmp_path / "registry", **settings))


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_poll_rebuilds_only_when_a_source_changes(tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    Registry(registry_dir).ensure()
    models = tmp_path / "models.yaml"
    models.write_text(static_yaml(("a", "http://127.0.0.1:9/v1")))
    _age(models, 60)
    _age(registry_dir, 60)
    config = GatewayConfig(registry_dir=registry_dir, models_file=models)
    reloader = Reloader(config=config, env={})
    first = reloader.load_initial()
    assert first.routes.names() == ["a"]
    now = time.monotonic()
    assert reloader.poll(now=now) is None  # nothing changed, no rebuild

    models.write_text(static_yaml(("b", "http://127.0.0.1:9/v1")))
    _age(models, 30)
    changed = reloader.poll(now=now)
    assert changed is not None
    assert changed.routes.names() == ["b"]
    assert reloader.poll(now=now) is None

    # A full rebuild is due every few seconds even when no mtime moved (NFS can lag).
    full = reloader.poll(now=now + 60)
    assert full is not None
    assert full.routes.names() == ["b"]


def test_a_just_written_source_is_read_again_on_the_next_poll(tmp_path: Path) -> None:
    registry_dir = tmp_path / "registry"
    Registry(registry_dir).ensure()
    reloader = Reloader(config=GatewayConfig(registry_dir=registry_dir), env={})
    reloader.load_initial()
    now = time.monotonic()
    # The directory's mtime is fresh: a second write in the same mtime tick would not move
    # it, so the reloader keeps looking until the mtime is safely in the past.
    assert reloader.poll(now=now) is not None
    _age(registry_dir, 60)
    assert reloader.poll(now=now) is not None  # the mtime moved (to the past): re-read
    assert reloader.poll(now=now) is None
