"""Per-key allow-lists, expiry, revocation and rate limits, end to end and as properties.

Buckets are tested with an injected clock, never wall time; the gateway runs on real ports
against ``FakeUpstream``.

The happy paths a real engine can serve run against the session's real llama-server job
(tests/realengine.py); docs/testing.md lists which tests keep the fake, and why.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_upstream import FakeUpstream, Knobs
from hypothesis import given, settings
from hypothesis import strategies as st
from realengine import RealEngine
from test_gateway_proxy import CHAT, add_record, assert_openai_error, chat, gateway
from test_gateway_reload import eventually

from gateway.keys import create_key, list_keys, load_keys, revoke_key
from gateway.ratelimit import KeyBuckets, TokenBucket
from hpc.errors import MTError

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- keys.yaml -------------------------------------------------------------------------


def test_allow_list_globs_match_whole_names_case_sensitively(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = create_key(path, "alice", models=("gemma-*", "Qwen3-*"))
    client = load_keys(path).find(key)
    assert client is not None
    assert client.allows("gemma-3-270m")
    assert client.allows("Qwen3-8B")
    assert not client.allows("qwen3-8b")
    assert not client.allows("my-gemma-3")
    assert not client.allows("llama")
    everything = load_keys(tmp_path / "keys.yaml")
    bob = create_key(path, "bob")
    everything = load_keys(path)
    found = everything.find(bob)
    assert found is not None and found.allows("anything at all")


def test_an_empty_allow_list_allows_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = create_key(path, "alice", models=())
    client = load_keys(path).find(key)
    assert client is not None and not client.allows("m")


def test_limits_and_expiry_round_trip_and_list_hides_hashes(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    expires = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    create_key(path, "alice", requests_per_min=60, tokens_per_min=1000, expires_at=expires)
    create_key(path, "bob")
    alice, bob = list_keys(path)
    assert (alice.requests_per_min, alice.tokens_per_min, alice.expires_at) == (60, 1000, expires)
    assert (bob.models, bob.requests_per_min, bob.expires_at) == (None, None, None)
    assert "tokens_per_min: 1000" in path.read_text()
    assert not alice.expired(expires - timedelta(seconds=1))
    assert alice.expired(expires)


def test_bad_limits_are_refused_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    with pytest.raises(MTError, match="requests_per_min"):
        create_key(path, "alice", requests_per_min=0)
    assert not path.exists()


def test_revoke_removes_only_that_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    alice = create_key(path, "alice")
    bob = create_key(path, "bob")
    revoke_key(path, "alice")
    store = load_keys(path)
    assert store.check(alice) is None
    assert store.check(bob) == "bob"
    with pytest.raises(MTError, match="no key named 'alice'") as info:
        revoke_key(path, "alice")
    assert "bob" in (info.value.hint or "")


def test_keys_cli_list_and_revoke(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hpc.cli import app

    path = tmp_path / "keys.yaml"
    runner = CliRunner()
    created = runner.invoke(
        app,
        ["keys", "create", "alice", "--keys", str(path), "--model", "gemma-*", "--rpm", "5"],
    )
    assert created.exit_code == 0, created.output
    listed = runner.invoke(app, ["keys", "list", "--keys", str(path), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert rows == [
        {
            "name": "alice",
            "models": ["gemma-*"],
            "requests_per_min": 5,
            "tokens_per_min": None,
            "expires_at": None,
            "max_on_demand_jobs": None,
        }
    ]
    assert list_keys(path)[0].sha256 not in listed.output
    table = runner.invoke(app, ["keys", "list", "--keys", str(path)])
    assert "alice" in table.stdout and "gemma-*" in table.stdout
    assert list_keys(path)[0].sha256 not in table.output
    revoked = runner.invoke(app, ["keys", "revoke", "alice", "--keys", str(path)])
    assert revoked.exit_code == 0, revoked.output
    assert list_keys(path) == ()
    missing = runner.invoke(app, ["keys", "revoke", "alice", "--keys", str(path)])
    assert missing.exit_code == 1


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_a_model_outside_the_allow_list_is_403(
    tmp_path: Path, real_engine: RealEngine
) -> None:
    keys = tmp_path / "keys.yaml"
    key = create_key(keys, "alice", models=("gemma-*",))
    real_engine.record_in(tmp_path / "registry", "gemma-3")
    real_engine.record_in(tmp_path / "registry", "llama")
    async with gateway(tmp_path, keys_file=keys) as url, aiohttp.ClientSession() as client:
        async with client.post(url + CHAT, json=chat("llama"), headers=bearer(key)) as resp:
            assert resp.status == 403
            body = await resp.json()
        ask = {**chat("gemma-3"), "max_tokens": 2}
        async with client.post(url + CHAT, json=ask, headers=bearer(key)) as resp:
            assert resp.status == 200
    assert_openai_error(body, "model_not_allowed")
    assert body["error"]["param"] == "model"


async def test_an_expired_key_is_401(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    past = datetime.now(timezone.utc) - timedelta(minutes=1)
    key = create_key(keys, "alice", expires_at=past)
    async with (
        gateway(tmp_path, keys_file=keys) as url,
        aiohttp.ClientSession() as client,
        client.get(url + "/v1/models", headers=bearer(key)) as resp,
    ):
        assert resp.status == 401
        body = await resp.json()
    assert_openai_error(body, "invalid_api_key")
    assert "expired" in body["error"]["message"]


async def test_revoking_a_key_takes_effect_on_reload_without_restart(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    alice = create_key(keys, "alice")
    bob = create_key(keys, "bob")
    async with (
        gateway(tmp_path, keys_file=keys, reload_interval_s=0.05) as url,
        aiohttp.ClientSession() as client,
    ):

        async def status(key: str) -> int:
            async with client.get(url + "/v1/models", headers=bearer(key)) as resp:
                return resp.status

        assert await status(alice) == 200
        revoke_key(keys, "alice")

        async def alice_refused() -> bool:
            return await status(alice) == 401

        await eventually(alice_refused)
        assert await status(bob) == 200


# --- rate limits -----------------------------------------------------------------------


async def test_a_burst_of_b_plus_k_gets_exactly_k_429s(tmp_path: Path) -> None:
    burst, extra = 6, 4
    keys = tmp_path / "keys.yaml"
    key = create_key(keys, "alice", requests_per_min=burst)
    async with FakeUpstream() as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path, keys_file=keys) as url, aiohttp.ClientSession() as client:

            async def one() -> tuple[int, dict[str, str], dict[str, Any]]:
                async with client.post(url + CHAT, json=chat("m"), headers=bearer(key)) as resp:
                    return resp.status, dict(resp.headers), await resp.json()

            results = await asyncio.gather(*(one() for _ in range(burst + extra)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * burst + [429] * extra
    assert fake.seen.requests == burst
    for status, headers, body in results:
        assert headers["x-ratelimit-limit-requests"] == str(burst)
        assert "x-ratelimit-remaining-requests" in headers
        assert "x-ratelimit-reset-requests" in headers
        if status == 429:
            assert_openai_error(body, "rate_limit_requests")
            assert int(headers["Retry-After"]) >= 1
            assert headers["x-ratelimit-remaining-requests"] == "0"


async def test_tokens_per_minute_counts_the_upstreams_usage(tmp_path: Path) -> None:
    # Each answer uses 1 prompt + 10 completion tokens; 15 tokens/min lets two requests in
    # (the second starts while one token is left) and refuses the third.
    keys = tmp_path / "keys.yaml"
    key = create_key(keys, "alice", tokens_per_min=15)
    async with FakeUpstream(Knobs(tokens=10)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path, keys_file=keys) as url, aiohttp.ClientSession() as client:
            statuses = []
            for stream in (False, True, False):
                async with client.post(
                    url + CHAT, json=chat("m", stream=stream), headers=bearer(key)
                ) as resp:
                    statuses.append(resp.status)
                    await resp.read()
                    if resp.status == 429:
                        body = json.loads(await resp.read())
                        headers = resp.headers
    assert statuses == [200, 200, 429]
    assert_openai_error(body, "rate_limit_tokens")
    assert headers["x-ratelimit-limit-tokens"] == "15"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(headers["Retry-After"]) >= 1


def test_bucket_refills_at_its_rate_and_caps_at_its_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(capacity=3, rate_per_s=1, clock=clock)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_s() == pytest.approx(1)
    clock.now += 0.5
    assert not bucket.try_take()
    clock.now += 0.5
    assert bucket.try_take()
    clock.now += 100
    assert bucket.level() == 3
    bucket.debit(10)
    assert bucket.level() == -7
    assert bucket.wait_s() == pytest.approx(8)


@settings(max_examples=200, deadline=None)
@given(
    rpm=st.integers(min_value=1, max_value=600),
    gaps=st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), max_size=300),
)
def test_accepted_requests_in_any_window_stay_within_burst_plus_rate(
    rpm: int, gaps: list[float]
) -> None:
    clock = FakeClock()
    buckets = KeyBuckets(rpm, None, clock)
    rate = rpm / 60
    accepted: list[float] = []
    for gap in gaps:
        clock.now += gap
        if buckets.admit().allowed:
            accepted.append(clock.now)
    # Every window that starts and ends at accepted requests (the tightest ones).
    for i, start in enumerate(accepted):
        for j in range(i, len(accepted)):
            window = accepted[j] - start
            assert j - i + 1 <= rpm + rate * window + 1e-6
