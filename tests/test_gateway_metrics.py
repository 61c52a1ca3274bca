"""Per-request histograms on /metrics, and the tokens of abandoned streams being charged.

The gateway runs through ``server.start`` on a real port in front of a ``FakeUpstream``
(the wire format of vLLM / llama.cpp); ``/metrics`` is scraped after real requests.

The happy paths a real engine can serve run against the session's real llama-server job
(tests/realengine.py); docs/testing.md lists which tests keep the fake, and why.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import aiohttp
import pytest
from fake_upstream import FakeUpstream, Knobs
from realengine import RealEngine
from test_gateway_limits import bearer
from test_gateway_proxy import (
    CHAT,
    add_record,
    assert_openai_error,
    chat,
    closed_port_url,
    gateway,
)

from gateway.keys import create_key
from hpc.phases import Phases
from hpc.registry import Registry

pytestmark = pytest.mark.timeout(30)

_SAMPLE = re.compile(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$")


def samples(text: str) -> dict[tuple[str, str], float]:
    """``{(name, 'label="v",…'): value}`` from Prometheus' text format."""
    out = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[(match[1], match[2] or "")] = float(match[3])
    return out


async def scrape(url: str, key: str | None = None) -> dict[tuple[str, str], float]:
    headers = bearer(key) if key else None
    async with (
        aiohttp.ClientSession() as client,
        client.get(url + "/metrics", headers=headers) as resp,
    ):
        assert resp.status == 200
        return samples(await resp.text())


async def test_the_timing_histograms_count_every_answered_request(tmp_path: Path) -> None:
    # 0.3 s before the first token: every time to first token is above the 0.25 s bucket.
    async with FakeUpstream(Knobs(ttft_s=0.3, tokens=4, tokens_per_s=50)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url:
            before = await scrape(url)
            async with aiohttp.ClientSession() as client:
                for stream in (True, True, False):
                    async with client.post(url + CHAT, json=chat("m", stream=stream)) as resp:
                        assert resp.status == 200
                        await resp.read()
            after = await scrape(url)
    assert not any(name.startswith("mt_gateway_time_to_first") for name, _ in before)
    m = 'model="m"'
    ttft = "mt_gateway_time_to_first_token_seconds"
    assert after[(f"{ttft}_count", m)] == 3
    assert after[(f"{ttft}_bucket", f'{m},le="0.25"')] == 0
    assert after[(f"{ttft}_bucket", f'{m},le="+Inf"')] == 3
    assert after[(f"{ttft}_sum", m)] >= 3 * 0.3
    for name in ("mt_gateway_queue_seconds", "mt_gateway_overhead_seconds"):
        assert after[(f"{name}_count", m)] == 3
        assert after[(f"{name}_bucket", f'{m},le="+Inf"')] == 3
    # The engine's 0.3 s are not the gateway's own time.
    assert after[("mt_gateway_overhead_seconds_sum", m)] < after[(f"{ttft}_sum", m)]
    assert after[("mt_gateway_queue_seconds_sum", m)] <= after[(f"{ttft}_sum", m)]
    # Two streams of four token chunks, 20 ms apart at the engine: gaps were counted, and
    # none of the plain request's.
    itl = "mt_gateway_inter_token_latency_seconds"
    assert after[(f"{itl}_count", m)] >= 2 * 3
    assert after[(f"{itl}_bucket", f'{m},le="+Inf"')] == after[(f"{itl}_count", m)]
    assert after[(f"{itl}_sum", m)] >= 2 * 3 * 0.02


async def test_a_refused_request_moves_no_timing_histogram(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(status=400)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url:
            async with (
                aiohttp.ClientSession() as client,
                client.post(url + CHAT, json=chat("nope")) as resp,
            ):
                assert resp.status == 404
            after = await scrape(url)
    assert not [key for key in after if key[0].startswith("mt_gateway_queue_seconds")]


async def read_events(resp: aiohttp.ClientResponse, n: int) -> bytes:
    data = b""
    while data.count(b"\n\n") < n:
        chunk = await resp.content.readany()
        assert chunk
        data += chunk
    return data


async def test_an_abandoned_stream_is_charged_an_estimate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 5 tokens a minute; the client reads 6 events, then leaves: the usage event never came,
    # yet the key is charged (6+ completion, 400 chars / 4 = 100 prompt) and is refused next.
    caplog.set_level(logging.INFO, logger="gateway")
    keys = tmp_path / "keys.yaml"
    key = create_key(keys, "alice", tokens_per_min=5)
    payload = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "stream": True}
    async with FakeUpstream(Knobs(tokens=10_000, tokens_per_s=50)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path, keys_file=keys) as url:
            async with aiohttp.ClientSession() as client:
                resp = await client.post(url + CHAT, json=payload, headers=bearer(key))
                assert resp.status == 200
                relayed = (await read_events(resp, 6)).count(b"\n\n")
                resp.close()
            await asyncio.wait_for(fake.seen.cancelled_event.wait(), 10)
            while not [r for r in caplog.records if r.name == "gateway.access"]:
                await asyncio.sleep(0.01)
            async with (
                aiohttp.ClientSession() as client,
                client.post(url + CHAT, json=chat("m"), headers=bearer(key)) as resp,
            ):
                assert resp.status == 429
                assert_openai_error(await resp.json(), "rate_limit_tokens")
            metrics = await scrape(url, key)
    (line,) = [r.fields for r in caplog.records if r.name == "gateway.access"][:1]  # type: ignore[attr-defined]
    assert line["tokens_estimated"] is True
    assert line["prompt_tokens"] == 100
    assert line["completion_tokens"] >= relayed
    m = 'model="m"'
    assert metrics[("mt_gateway_estimated_tokens_total", f'{m},kind="prompt"')] == 100
    completion = metrics[("mt_gateway_estimated_tokens_total", f'{m},kind="completion"')]
    assert completion == line["completion_tokens"]
    assert metrics[("mt_gateway_tokens_total", f'{m},kind="completion"')] == completion


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_a_whole_stream_is_charged_its_real_usage_not_an_estimate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, real_engine: RealEngine
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    real_engine.record_in(tmp_path / "registry", "m")
    async with gateway(tmp_path) as url:
        async with (
            aiohttp.ClientSession() as client,
            client.post(url + CHAT, json={**chat("m", stream=True), "max_tokens": 4}) as resp,
        ):
            await resp.read()
        metrics = await scrape(url)
    (line,) = [r.fields for r in caplog.records if r.name == "gateway.access"][:1]  # type: ignore[attr-defined]
    assert line["tokens_estimated"] is None
    assert line["prompt_tokens"] > 0
    assert 0 < line["completion_tokens"] <= 4
    m = 'model="m"'
    assert (
        metrics[("mt_gateway_tokens_total", f'{m},kind="completion"')] == line["completion_tokens"]
    )
    assert not [k for k in metrics if k[0] == "mt_gateway_estimated_tokens_total"]


async def test_each_serving_jobs_start_up_phases_are_gauges(tmp_path: Path) -> None:
    # No request is sent: the gauges come from the records, so no engine is needed.
    registry = tmp_path / "registry"
    record = add_record(registry, "m", closed_port_url())
    phases = Phases(
        queued_s=4.5,
        staging_s=0.8,
        staging_bytes=253113024,
        staging_mb_s=303.1,
        engine_start_to_healthy_s=1.25,
    )
    Registry(registry).write(record.model_copy(update={"phases": phases}))
    add_record(registry, "plain", closed_port_url())  # no phases recorded: no series
    async with gateway(tmp_path) as url:
        seen = await scrape(url)
    labels = f'model="m",job="{record.key}"'
    assert seen[("mt_job_startup_phase_seconds", labels + ',phase="queued"')] == 4.5
    assert seen[("mt_job_startup_phase_seconds", labels + ',phase="staging"')] == 0.8
    phase = ',phase="engine_start_to_healthy"'
    assert seen[("mt_job_startup_phase_seconds", labels + phase)] == 1.25
    assert seen[("mt_job_staging_bytes", labels)] == 253113024
    assert ("mt_job_startup_phase_seconds", labels + ',phase="first_token"') not in seen
    assert not any('model="plain"' in labels for name, labels in seen if name.startswith("mt_job"))
