"""Limits shared by gateway replicas through a real Redis (gateway/redislimits.py).

Two ``SharedLimits`` on one Redis stand for two replicas in the first tests; the last ones
run two real ``mt gateway`` processes in front of the fake engine (bench.fakeengine: the
limit logic is what is tested, not the engine), kill Redis under them and start it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
import pytest
from fakeengineproc import fake_engine_process
from redisserver import RedisServer
from test_gateway_reload import eventually

from gateway.admission import Admission
from gateway.keys import create_key
from gateway.ratelimit import Limiter
from gateway.redislimits import SharedLimits
from gateway.redisurl import where
from hpc.errors import MTError

pytestmark = pytest.mark.timeout(120)

MODEL = "fake-chat"


@asynccontextmanager
async def replica(
    server: RedisServer,
    max_total: int | None = None,
    max_per_model: int | None = None,
    **timing: float,
) -> AsyncIterator[SharedLimits]:
    """One replica's shared limits, started (reaching Redis) and closed at the end."""
    limiter, admission = Limiter(), Admission(max_total, max_per_model)
    shared = SharedLimits(server.url, "t", limiter, admission, max_total, max_per_model, **timing)
    await shared.start()
    try:
        yield shared
    finally:
        await shared.close()


# --- two replicas in one process ------------------------------------------------------


async def test_two_replicas_share_one_requests_bucket(redis_server: RedisServer) -> None:
    async with replica(redis_server) as a, replica(redis_server) as b:
        assert a.up and b.up
        said = []
        for shared in (a, b, a, b, a, b):
            found = await shared.admit("alice", 3, None)
            assert found is not None
            said.append(found[0])
        assert [v.allowed for v in said] == [True, True, True, False, False, False]
        assert said[0].headers["x-ratelimit-limit-requests"] == "3"
        assert said[0].headers["x-ratelimit-remaining-requests"] == "2"
        assert said[2].headers["x-ratelimit-remaining-requests"] == "0"
        assert said[3].limited == "requests" and said[3].retry_after_s >= 1
        # Another key has its own bucket; a key without limits is not limited at all.
        other = await b.admit("bob", 3, None)
        assert other is not None and other[0].allowed
        assert await a.admit("carol", None, None) is None


async def test_a_changed_limit_starts_a_full_bucket(redis_server: RedisServer) -> None:
    async with replica(redis_server) as a:
        for _ in range(2):
            found = await a.admit("alice", 2, None)
            assert found is not None and found[0].allowed
        refused = await a.admit("alice", 2, None)
        assert refused is not None and not refused[0].allowed
        raised = await a.admit("alice", 3, None)  # keys.yaml now says 3: a fresh bucket
        assert raised is not None and raised[0].allowed
        assert raised[0].headers["x-ratelimit-remaining-requests"] == "2"


async def test_tokens_spent_on_one_replica_limit_the_other(redis_server: RedisServer) -> None:
    async with replica(redis_server) as a, replica(redis_server) as b:
        found = await a.admit("alice", None, 100)
        assert found is not None and found[0].allowed
        found[1].spend_tokens(150)  # in the background: the bucket goes below zero

        async def b_refuses() -> bool:
            got = await b.admit("alice", None, 100)
            return got is not None and got[0].limited == "tokens"

        await eventually(b_refuses)
        refused = await b.admit("alice", None, 100)
        assert refused is not None
        assert refused[0].headers["x-ratelimit-remaining-tokens"] == "0"


async def test_in_flight_caps_hold_across_replicas(redis_server: RedisServer) -> None:
    async with replica(redis_server, 3, 2) as a, replica(redis_server, 3, 2) as b:
        first = await a.enter("m")
        second = await b.enter("m")
        assert first[0] is None and second[0] is None
        assert (await a.enter("m"))[0] == "model"  # two of m in flight, one on each replica
        third = await a.enter("n")
        assert third[0] is None
        assert (await b.enter("o"))[0] == "gateway"  # three in all
        a.leave("m", first[1])
        await a.settled()
        again = await b.enter("m")  # a's slot is free again
        assert again[0] is None
        for shared, (_, slot), model in ((b, second, "m"), (a, third, "n"), (b, again, "m")):
            shared.leave(model, slot)
        assert (await a.enter("o"))[0] is None


async def test_a_crashed_replica_stops_counting(redis_server: RedisServer) -> None:
    timing = {"heartbeat_s": 0.2, "replica_ttl_s": 1.0}
    async with replica(redis_server, 1, None, **timing) as b:
        crashed = SharedLimits(
            redis_server.url, "t", Limiter(), Admission(1, None), 1, None, **timing
        )
        await crashed.start()
        assert (await crashed.enter("m"))[0] is None
        # It dies holding its slot: no more heartbeats, no leave, no close.
        for task in list(crashed._tasks):
            task.cancel()
        assert (await b.enter("m"))[0] == "gateway"

        async def b_admitted() -> bool:
            full, slot = await b.enter("m")
            if full is None:
                b.leave("m", slot)
            return full is None

        await eventually(b_admitted)
        await crashed._redis.aclose()


async def test_a_lost_leave_is_mended_by_the_heartbeat(redis_server: RedisServer) -> None:
    async with replica(redis_server, 1, None, heartbeat_s=0.2) as a:
        full, slot = await a.enter("m")
        assert full is None
        # The slot is given back here, but Redis never hears of it (as when the call fails).
        a._live.discard(slot)
        a._admission.leave("m")
        assert (await a.enter("m"))[0] == "gateway"

        async def admitted() -> bool:
            full, slot = await a.enter("m")
            if full is None:
                a.leave("m", slot)
            return full is None

        await eventually(admitted)


async def test_an_outage_falls_back_per_replica_then_shares_again(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    async with (
        replica(redis_server, None, 1, probe_s=0.1) as a,
        replica(redis_server, None, 1, probe_s=0.1) as b,
    ):
        held, slot = await a.enter("m")
        assert held is None
        redis_server.kill()
        # Each replica alone: a has its one request for m in flight, b has none.
        assert (await a.enter("m"))[0] == "model"
        full, b_slot = await b.enter("m")
        assert full is None and b_slot == 0
        assert (await b.enter("m"))[0] == "model"
        for shared in (a, b):
            allowed = [(await shared.admit("alice", 2, None)) for _ in range(3)]
            assert [v is not None and v[0].allowed for v in allowed] == [True, True, False]
        assert not a.up and not b.up
        assert (a.outages, b.outages) == (1, 1)
        warnings = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        assert len(warnings) == 2  # once per replica, not once per request
        logged = json.dumps([getattr(r, "fields", None) for r in caplog.records])
        assert redis_server.password not in logged + caplog.text
        assert "mt_gateway_shared_limits_up 0" in a.render()
        assert "mt_gateway_shared_limits_outages_total 1" in a.render()
        a.leave("m", slot)
        b.leave("m", b_slot)

        redis_server.start()  # empty: a Redis restarted without persistence

        async def both_up() -> bool:
            return a.up and b.up

        await eventually(both_up)
        assert any("limits are shared again" in r.getMessage() for r in caplog.records)
        allowed = [(await shared.admit("alice", 2, None)) for shared in (a, b, a)]
        assert [v is not None and v[0].allowed for v in allowed] == [True, True, False]
        first = await a.enter("m")
        assert first[0] is None
        assert (await b.enter("m"))[0] == "model"
        a.leave("m", first[1])


async def test_redis_down_at_start_is_a_warning_not_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    server = RedisServer(tmp_path)  # never started: nothing listens on its port
    async with replica(server, None, 1, probe_s=0.1) as a:
        assert not a.up and a.outages == 1
        assert (await a.enter("m"))[0] is None
        found = await a.admit("alice", 1, None)
        assert found is not None and found[0].allowed
        (warning,) = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        logged = json.dumps(warning.fields)  # type: ignore[attr-defined]
        assert f"redis://127.0.0.1:{server.port}/0" in logged
        assert server.password not in logged + caplog.text


def test_urls_are_shown_without_their_password() -> None:
    assert where("redis://:s3cret@db.example:6380/2") == "redis://db.example:6380/2"
    assert where("rediss://user:s3cret@db/0") == "rediss://db/0"
    assert where("unix:///run/redis.sock") == "unix:///run/redis.sock"
    # A password with a slash or a colon in it breaks the URL: none of it is shown.
    assert "ss" not in where("redis://:pa/ss@host:6379/0")
    assert where("redis://:pa:ss@host:xx/0") == "redis://…"


def test_a_url_redis_cannot_use_is_refused_without_its_password() -> None:
    for url in ("http://:s3cret@host:1/0", "redis://:s3cret@host:port/0"):
        with pytest.raises(MTError) as caught:
            SharedLimits(url, "t", Limiter(), Admission(None, None), None, None)
        assert "s3cret" not in str(caught.value) and caught.value.hint


# --- two real `mt gateway` processes ----------------------------------------------------


@contextmanager
def mt_gateway(tmp_path: Path, name: str, *args: str) -> Iterator[tuple[str, Path]]:
    """`mt gateway --port 0 ARGS` in the background: its URL and its log file (stderr)."""
    log = tmp_path / f"{name}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hpc.cli", "gateway", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line + log.read_text()
        yield line.split("listening on", 1)[1].strip(), log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


@pytest.fixture
def deployment(
    tmp_path: Path,
    engine_url: str,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Path, Path, str]:
    """models.yaml (the fake engine as ``fake-chat``), keys.yaml with alice at 4 requests a
    minute, and the Redis URL in a private file: (keys file, URL file, alice's key)."""
    models = tmp_path / "models.yaml"
    models.write_text(
        f"static:\n  - name: {MODEL}\n    base_url: {json.dumps(engine_url)}\n", encoding="utf-8"
    )
    monkeypatch.setenv("MT_MODELS", str(models))
    keys = tmp_path / "keys.yaml"
    key = create_key(keys, "alice", requests_per_min=4)
    url_file = tmp_path / "redis.url"
    url_file.write_text(redis_server.url + "\n", encoding="utf-8")
    url_file.chmod(0o600)
    return keys, url_file, key


async def statuses(
    session: aiohttp.ClientSession, urls: list[str], key: str, stream: bool = False
) -> list[int]:
    """One chat completion through each gateway of ``urls`` in turn: their statuses."""
    out = []
    for url in urls:
        async with session.post(
            f"{url}/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            },
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            await resp.read()
            out.append(resp.status)
    return out


async def shared_up(session: aiohttp.ClientSession, url: str, key: str) -> str:
    """The gateway's ``mt_gateway_shared_limits_up`` value."""
    async with session.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}) as resp:
        text = await resp.text()
    found = re.search(r"^mt_gateway_shared_limits_up (\d)$", text, re.MULTILINE)
    return found.group(1) if found else "absent"


async def test_two_gateways_admit_exactly_the_keys_requests_per_minute(
    tmp_path: Path, deployment: tuple[Path, Path, str], redis_server: RedisServer
) -> None:
    keys, url_file, key = deployment
    common = ("--keys", str(keys), "--redis-url-file", str(url_file))
    with (
        mt_gateway(tmp_path, "a", *common) as (a, log_a),
        mt_gateway(tmp_path, "b", *common) as (b, log_b),
    ):
        async with aiohttp.ClientSession() as session:
            # A burst of 12 at once across both: 4 pass (not 8), whichever gateway they reach.
            burst = [statuses(session, [url], key) for url in [a, b] * 6]
            got = [status for answer in await asyncio.gather(*burst) for status in answer]
            assert sorted(got) == [200] * 4 + [429] * 8, got

            # Redis dies mid-run: each gateway now limits alone, and keeps serving.
            redis_server.kill()
            got_a = await statuses(session, [a] * 6, key)
            got_b = await statuses(session, [b] * 6, key)
            assert got_a == [200] * 4 + [429] * 2, got_a
            assert got_b == [200] * 4 + [429] * 2, got_b
            for log in (log_a, log_b):
                text = log.read_text()
                assert text.count("Redis unreachable") == 1, text
                assert redis_server.password not in text
            assert await shared_up(session, a, key) == "0"

            # Redis is back (empty): the limits are shared again.
            redis_server.start()
            for url in (a, b):

                async def up(url: str = url) -> bool:
                    return await shared_up(session, url, key) == "1"

                await eventually(up)
            got = await statuses(session, [b, a] * 5, key)
            assert sorted(got) == [200] * 4 + [429] * 6, got
            for log in (log_a, log_b):
                assert "limits are shared again" in log.read_text()


@pytest.fixture
def slow_engine_url() -> Iterator[str]:
    """The fake engine answering after 60 s: requests stay in flight until cancelled."""
    with fake_engine_process("--tokens", "2", "--ttft-ms", "60000") as url:
        yield url


async def test_two_gateways_share_the_in_flight_cap(
    tmp_path: Path,
    slow_engine_url: str,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import redis.asyncio

    models = tmp_path / "models.yaml"
    models.write_text(
        f"static:\n  - name: {MODEL}\n    base_url: {json.dumps(slow_engine_url)}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("MT_MODELS", str(models))
    keys = tmp_path / "keys.yaml"
    key = create_key(keys, "alice")
    url_file = tmp_path / "redis.url"
    url_file.write_text(redis_server.url, encoding="utf-8")
    url_file.chmod(0o600)
    common = ("--keys", str(keys), "--redis-url-file", str(url_file))
    cap = ("--max-in-flight-per-model", "2")
    store = redis.asyncio.from_url(redis_server.url)

    async def in_flight() -> int:
        total = 0
        async for name in store.scan_iter("mt:inflight:*"):
            total += int(await store.hget(name, "t") or 0)
        return total

    with (
        mt_gateway(tmp_path, "a", *common, *cap) as (a, _),
        mt_gateway(tmp_path, "b", *common, *cap) as (b, _),
    ):
        async with aiohttp.ClientSession() as session:
            held = [
                asyncio.ensure_future(statuses(session, [url], key, stream=True)) for url in (a, b)
            ]

            async def two() -> bool:
                return await in_flight() == 2

            await eventually(two)
            # One in flight on each: the cap of two is the deployment's.
            assert await statuses(session, [a, b], key) == [503, 503]
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)

            async def none() -> bool:
                return await in_flight() == 0

            await eventually(none)
            again = asyncio.ensure_future(statuses(session, [a], key, stream=True))

            async def one() -> bool:
                return await in_flight() == 1

            await eventually(one)
            again.cancel()
            await asyncio.gather(again, return_exceptions=True)
    await store.aclose()


def test_a_redis_url_file_others_can_read_is_refused(
    tmp_path: Path, deployment: tuple[Path, Path, str]
) -> None:
    keys, url_file, _ = deployment
    url_file.chmod(0o644)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc.cli",
            "gateway",
            "--port",
            "0",
            "--keys",
            str(keys),
            "--redis-url-file",
            str(url_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "error:" in done.stderr and "hint:" in done.stderr
    assert str(url_file) in done.stderr
    assert "redis://" not in done.stderr


async def test_the_url_may_come_from_the_environment_and_never_shows(
    tmp_path: Path,
    deployment: tuple[Path, Path, str],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys, _, key = deployment
    monkeypatch.setenv("MT_REDIS_URL", redis_server.url)
    with mt_gateway(tmp_path, "env", "--keys", str(keys)) as (url, log):
        async with aiohttp.ClientSession() as session:
            assert await shared_up(session, url, key) == "1"
            assert await statuses(session, [url] * 5, key) == [200] * 4 + [429]
    assert redis_server.password not in log.read_text()


def test_without_a_url_no_redis_client_is_loaded(tmp_path: Path) -> None:
    """The single-process path: no redis import, no shared-limits state, no metrics."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gateway.app import create_app\n"
        "from gateway.config import GatewayConfig\n"
        "from gateway.redislimits import SHARED_LIMITS\n"
        f"app = create_app(GatewayConfig(registry_dir=Path({str(tmp_path)!r})))\n"
        "print(SHARED_LIMITS in app, 'redis' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["False", "False"]
