"""Usage chunks, /metrics, disconnect cancellation in every phase, and replica balancing.

The happy paths a real engine can serve run against the session's real llama-server job
(tests/realengine.py); docs/testing.md lists which tests keep the fake, and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import aiohttp
import pytest
from fake_upstream import FakeUpstream, Knobs
from realengine import RealEngine
from test_gateway_proxy import CHAT, add_record, chat, gateway

from gateway.balancer import FAILURES_TO_SKIP, Balancer
from gateway.routes import Upstream

pytestmark = pytest.mark.timeout(30)


def events_of(data: bytes) -> list[bytes]:
    return [e for e in data.split(b"\n\n") if e]


@pytest.mark.parametrize("client_asked", [False, True])
async def test_usage_is_forced_upstream_and_stripped_unless_asked(
    tmp_path: Path, client_asked: bool
) -> None:
    payload = chat("m", stream=True)
    if client_asked:
        payload["stream_options"] = {"include_usage": True}
    async with FakeUpstream(Knobs(tokens=4)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
            async with client.post(url + CHAT, json=payload) as resp:
                data = await resp.read()
            async with client.get(url + "/metrics") as resp:
                metrics = await resp.text()
    sent = json.loads(fake.seen.bodies[0])
    assert sent["stream_options"] == {"include_usage": True}
    events = events_of(data)
    assert events[-1] == b"data: [DONE]"
    has_usage = [b'"usage"' in e for e in events]
    assert has_usage == [False] * 4 + [client_asked, False][: 2 if client_asked else 1]
    assert len(events) == (6 if client_asked else 5)
    assert 'mt_gateway_tokens_total{model="m",kind="completion"} 4' in metrics
    assert 'mt_gateway_tokens_total{model="m",kind="prompt"} 1' in metrics


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_metrics_count_requests_by_model_and_status(
    tmp_path: Path, real_engine: RealEngine
) -> None:
    real_engine.record_in(tmp_path / "registry", "m")
    async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
        for model in ("m", "m", "nope", "nope2"):
            async with client.post(url + CHAT, json={**chat(model), "max_tokens": 2}) as resp:
                await resp.read()
        async with client.get(url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    assert 'mt_gateway_requests_total{model="m",status="200"} 2' in text
    # Unknown names share one label: clients cannot grow the series.
    assert 'mt_gateway_requests_total{model="-",status="404"} 2' in text
    assert 'mt_gateway_upstream_latency_seconds_count{model="m"} 2' in text
    assert "mt_gateway_in_flight 1" in text  # the /metrics request itself


@pytest.mark.parametrize("phase", ["first_token", "mid_stream", "non_streaming"])
async def test_client_disconnect_cancels_the_upstream_within_a_second(
    tmp_path: Path, phase: str
) -> None:
    knobs = {
        "first_token": Knobs(ttft_s=60),
        "mid_stream": Knobs(tokens=10_000, tokens_per_s=50),
        "non_streaming": Knobs(ttft_s=60),
    }[phase]
    async with FakeUpstream(knobs) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:
            stream = phase != "non_streaming"
            headers = {"X-Request-Id": f"gone-{phase}"}
            request = asyncio.ensure_future(
                client.post(url + CHAT, json=chat("m", stream=stream), headers=headers)
            )
            if phase == "mid_stream":
                resp = await asyncio.wait_for(request, 10)
                assert resp.status == 200
                assert b"tok0" in await resp.content.readany()
                left_at = time.monotonic()
                resp.close()
            else:
                # No header comes before the first token, streaming or not.
                while fake.seen.requests == 0:
                    await asyncio.sleep(0.01)
                left_at = time.monotonic()
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await request
            await asyncio.wait_for(fake.seen.cancelled_event.wait(), 5)
            aborted_after_s = time.monotonic() - left_at
    assert fake.seen.completed == 0
    assert fake.seen.cancelled == 1
    assert fake.seen.request_ids == [f"gone-{phase}"]
    assert aborted_after_s < 1.0


def upstream(n: int) -> Upstream:
    return Upstream(model="m", base_url=f"http://r{n}/v1", api_key=None, source=f"r{n}")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_least_outstanding_requests_goes_first() -> None:
    balancer = Balancer(FakeClock())
    a, b, c = upstream(1), upstream(2), upstream(3)
    assert balancer.order([a, b, c]) == [a, b, c]
    balancer.started(a)
    balancer.started(a)
    balancer.started(b)
    assert balancer.order([a, b, c]) == [c, b, a]
    balancer.finished(a)
    balancer.finished(a)
    assert balancer.order([a, b, c]) == [a, c, b]


def test_one_failure_never_ejects_and_a_streak_skips_for_a_growing_time() -> None:
    clock = FakeClock()
    balancer = Balancer(clock)
    a, b = upstream(1), upstream(2)
    balancer.failed(a)
    assert balancer.order([a, b]) == [a, b]
    for _ in range(FAILURES_TO_SKIP - 1):
        balancer.failed(a)
    assert balancer.order([a, b]) == [b, a]  # skipped, yet still a last resort
    clock.now += 1.01
    assert balancer.order([a, b]) == [a, b]  # the skip is over: tried again
    balancer.failed(a)
    clock.now += 1.01
    assert balancer.order([a, b]) == [b, a]  # the next skip is longer (2 s)
    clock.now += 1.0
    assert balancer.order([a, b]) == [a, b]
    balancer.succeeded(a)
    balancer.failed(a)
    assert balancer.order([a, b]) == [a, b]  # the streak was reset by the success
    assert balancer.snapshot()["r1"] == (0, True)


async def test_requests_go_to_the_replica_with_fewer_in_flight(tmp_path: Path) -> None:
    async with (
        FakeUpstream(Knobs(ttft_s=1.0)) as slow,
        FakeUpstream() as fast,
    ):
        add_record(tmp_path / "registry", "m", slow.base_url)
        add_record(tmp_path / "registry", "m", fast.base_url)
        async with gateway(tmp_path) as url, aiohttp.ClientSession() as client:

            async def one() -> None:
                async with client.post(url + CHAT, json=chat("m")) as resp:
                    assert resp.status == 200

            pending = asyncio.ensure_future(one())
            while slow.seen.requests + fast.seen.requests == 0:
                await asyncio.sleep(0.01)
            # One request is held by whichever replica got it; the next three all go to
            # the other one, which has nothing in flight (round robin would alternate).
            busy = slow if slow.seen.requests else fast
            idle = fast if busy is slow else slow
            if busy is fast:
                pytest.skip("the fast replica answered the first request at once")
            for _ in range(3):
                await one()
            await pending
    assert busy.seen.requests == 1
    assert idle.seen.requests == 3
