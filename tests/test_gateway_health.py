"""Health-checked, load-informed balancing: the background prober against real endpoints.

Replicas are ``FakeUpstream``s standing for vLLM (``/health``, ``/metrics`` in vLLM's
format), registered with the real ``Registry``; the gateway runs through ``server.start``
with a short probe interval. Tests wait on state the gateway exposes (``/metrics``,
``/healthz``) or on what the fakes counted, never on the clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from fake_upstream import FakeUpstream, Knobs
from mtcli import GEMMA, gemma_models_yaml, mt, owner_headers, running_gateway
from pydantic import SecretStr
from test_gateway_balance import FakeClock
from test_gateway_proxy import CHAT, JOB_KEY, chat, gateway

from gateway.balancer import FAILURE_MEMORY_S, FAILURES_TO_SKIP, Balancer
from gateway.health import engine_root
from gateway.routes import Upstream
from hpc.job.engineload import EngineLoad, parse_engine_load, parse_slots
from hpc.registry import Record, Registry, State, new_nonce

pytestmark = pytest.mark.timeout(30)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def add_job(
    registry_dir: Path, fake: FakeUpstream, *, engine: str = "vllm", state: State = "ready"
) -> str:
    """A job's record for ``fake`` as the job wrapper writes it; returns the record key."""
    record = Record(
        backend="local",
        job_id=new_nonce(),
        nonce=new_nonce(),
        model="m",
        engine=engine,
        state=state,
        base_url=fake.base_url,
        api_key=SecretStr(JOB_KEY),
        health_path="/health",
    )
    Registry(registry_dir).write(record)
    return record.key


def scrape(text: str) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}``."""
    out = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[match[1] + (match[2] or "")] = float(match[3])
    return out


async def wait_for_metrics(
    client: aiohttp.ClientSession,
    url: str,
    ready: Callable[[dict[str, float]], bool],
    headers: dict[str, str] | None = None,
) -> dict[str, float]:
    """Scrape until ``ready`` holds (the test's timeout bounds the wait); ``headers``: the
    owner key's, for a `mt gateway` process."""
    while True:
        async with client.get(url + "/metrics", headers=headers) as resp:
            samples = scrape(await resp.text())
        if ready(samples):
            return samples
        await asyncio.sleep(0.02)


def healthy(key: str) -> str:
    return f'mt_gateway_replica_healthy{{replica="{key}"}}'


def probe_ok(key: str) -> str:
    return f'mt_gateway_replica_probe_ok{{replica="{key}"}}'


def engine_requests(key: str, kind: str) -> str:
    return f'mt_gateway_replica_engine_requests{{replica="{key}",kind="{kind}"}}'


async def send(client: aiohttp.ClientSession, url: str, n: int) -> None:
    for _ in range(n):
        async with client.post(url + CHAT, json=chat("m")) as resp:
            assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("failure", ["status 503", "hang"])
async def test_a_failing_replica_is_ejected_after_k_probes_and_back_on_the_first_good_one(
    tmp_path: Path, failure: str
) -> None:
    bad_knobs = Knobs(health_status=503) if failure == "status 503" else Knobs(health_hang=True)
    async with FakeUpstream(bad_knobs) as bad, FakeUpstream() as good:
        bad_key = add_job(tmp_path / "registry", bad)
        add_job(tmp_path / "registry", good)
        settings = {"health_interval_s": 0.05, "health_timeout_s": 0.3}
        async with (
            gateway(tmp_path, health_failures_to_eject=2, **settings) as url,
            aiohttp.ClientSession() as client,
        ):
            await wait_for_metrics(client, url, lambda m: m.get(healthy(bad_key)) == 0)
            assert bad.seen.health_probes >= 2
            async with client.get(url + "/healthz") as resp:
                assert (await resp.json())["replicas"] == {"m": {"ready": 1, "total": 2}}
            await send(client, url, 6)
            assert (bad.seen.requests, good.seen.requests) == (0, 6)

            bad.knobs = dataclasses.replace(bad.knobs, health_status=200, health_hang=False)
            samples = await wait_for_metrics(client, url, lambda m: m.get(healthy(bad_key)) == 1)
            assert samples[probe_ok(bad_key)] == 1
            await send(client, url, 6)
    assert bad.seen.requests > 0  # back in the rotation
    # Every probe carried the per-job key.
    assert set(bad.seen.probe_authorization) == {f"Bearer {JOB_KEY}"}


async def test_one_missed_probe_never_ejects_a_replica(tmp_path: Path) -> None:
    # A long interval: the round at startup is the only one this test sees.
    async with FakeUpstream(Knobs(health_status=503)) as flaky, FakeUpstream() as other:
        flaky_key = add_job(tmp_path / "registry", flaky)
        add_job(tmp_path / "registry", other)
        async with (
            gateway(tmp_path, health_interval_s=600) as url,
            aiohttp.ClientSession() as client,
        ):
            samples = await wait_for_metrics(client, url, lambda m: probe_ok(flaky_key) in m)
            assert samples[probe_ok(flaky_key)] == 0
            assert samples[healthy(flaky_key)] == 1
            await send(client, url, 4)
    assert flaky.seen.health_probes == 1
    assert flaky.seen.requests == 2  # its share of the rotation, as before


async def test_a_replica_whose_engine_reports_a_queue_gets_no_new_requests(
    tmp_path: Path,
) -> None:
    async with FakeUpstream(Knobs(engine_waiting=50)) as queued, FakeUpstream() as idle:
        queued_key = add_job(tmp_path / "registry", queued)
        idle_key = add_job(tmp_path / "registry", idle)
        async with (
            gateway(tmp_path, health_interval_s=0.05) as url,
            aiohttp.ClientSession() as client,
        ):
            waiting = engine_requests(queued_key, "waiting")
            samples = await wait_for_metrics(client, url, lambda m: m.get(waiting) == 50)
            assert samples[engine_requests(idle_key, "waiting")] == 0
            await send(client, url, 10)
            # Concurrent ones too: the idle replica's own queue through us stays under 50.
            await asyncio.gather(*(send(client, url, 1) for _ in range(10)))
            # The queue drains: the replica is used again.
            queued.knobs = dataclasses.replace(queued.knobs, engine_waiting=0)
            await wait_for_metrics(client, url, lambda m: m.get(waiting) == 0)
            await send(client, url, 4)
    assert queued.seen.requests == 2
    assert idle.seen.requests == 22


async def test_a_hung_health_endpoint_blocks_neither_requests_nor_other_probes(
    tmp_path: Path,
) -> None:
    async with FakeUpstream(Knobs(health_hang=True)) as hung, FakeUpstream() as other:
        add_job(tmp_path / "registry", hung)
        add_job(tmp_path / "registry", other)
        settings = {"health_interval_s": 0.05, "health_timeout_s": 25}
        async with gateway(tmp_path, **settings) as url, aiohttp.ClientSession() as client:
            while other.seen.health_probes < 5 or hung.seen.health_probes < 1:
                await asyncio.sleep(0.02)
            await send(client, url, 6)
            # Still in its first probe: no round started a second one, none waited for it.
            assert hung.seen.health_probes == 1
    assert hung.seen.requests == 3  # not ejected while its one probe is pending
    assert other.seen.requests == 3


async def test_draining_records_and_static_backends_are_not_probed(tmp_path: Path) -> None:
    async with FakeUpstream() as ready, FakeUpstream() as draining, FakeUpstream() as static:
        add_job(tmp_path / "registry", ready)
        add_job(tmp_path / "registry", draining, state="draining")
        models = tmp_path / "models.yaml"
        models.write_text(f"static:\n  - name: s\n    base_url: {static.base_url}\n")
        async with (
            gateway(tmp_path, models_file=models, health_interval_s=0.05) as url,
            aiohttp.ClientSession() as client,
        ):
            while ready.seen.health_probes < 3:
                await asyncio.sleep(0.02)
            await send(client, url, 4)
            async with client.post(url + CHAT, json=chat("s")) as resp:
                assert resp.status == 200
    assert (ready.seen.requests, draining.seen.requests) == (4, 0)
    assert draining.seen.health_probes == 0
    assert static.seen.requests == 1
    assert static.seen.health_probes == 0


def upstream(n: int) -> Upstream:
    return Upstream(model="m", base_url=f"http://r{n}/v1", api_key=None, source=f"r{n}")


def test_ejection_needs_k_failed_probes_in_a_row_and_one_good_probe_ends_it() -> None:
    balancer = Balancer(eject_after=3)
    a, b = upstream(1), upstream(2)
    for _ in range(2):
        balancer.probed("r1", ok=False)
    balancer.probed("r1", ok=True)
    balancer.probed("r1", ok=False)
    balancer.probed("r1", ok=False)
    assert balancer.order([a, b]) == [a, b]  # never three in a row
    balancer.probed("r1", ok=False)
    assert balancer.order([a, b]) == [b]
    assert balancer.order([a]) == [a]  # the only replica is still tried
    balancer.probed("r2", ok=False)
    balancer.probed("r2", ok=False)
    balancer.probed("r2", ok=False)
    assert balancer.order([a, b]) == [a, b]  # all ejected: all tried, none refused
    balancer.probed("r1", ok=True)
    assert balancer.order([a, b]) == [a]
    assert balancer.snapshot() == {"r1": (0, True), "r2": (0, False)}


def test_passive_failures_far_apart_are_no_streak() -> None:
    clock = FakeClock()
    balancer = Balancer(clock)
    a, b = upstream(1), upstream(2)
    for _ in range(FAILURES_TO_SKIP - 1):
        balancer.failed(a)
        clock.now += FAILURE_MEMORY_S + 1
    balancer.failed(a)
    assert balancer.order([a, b]) == [a, b]  # one at a time, each forgotten: not skipped
    for _ in range(FAILURES_TO_SKIP - 1):
        balancer.failed(a)
    assert balancer.order([a, b]) == [b, a]  # now a streak


def test_engine_load_counts_only_what_is_not_this_gateways() -> None:
    balancer = Balancer()
    a, b = upstream(1), upstream(2)
    balancer.started(a)
    balancer.started(a)
    # The engine's 3 running include our 2: one other client, so a counts 2 + 1.
    balancer.probed("r1", ok=True, load=EngineLoad(running=3, waiting=0))
    for _ in range(2):
        balancer.started(b)
    assert balancer.order([a, b]) == [b, a]
    balancer.started(b)
    assert balancer.order([a, b]) == [a, b]
    assert balancer.probes() == {"r1": (True, (3, 0))}


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 4.0
vllm:num_requests_running{engine="1",model_name="qwen"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen"} 7.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="qwen",reason="capacity"} 99.0
vllm:num_requests_swapped{engine="0",model_name="qwen"} 1.0
"""

LLAMACPP_METRICS = """\
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 3
llamacpp:prompt_tokens_total 120
"""


def test_engine_load_parsers() -> None:
    assert parse_engine_load(VLLM_METRICS) == EngineLoad(running=6, waiting=7)
    assert parse_engine_load(LLAMACPP_METRICS) == EngineLoad(running=1, waiting=3)
    assert parse_engine_load("# nothing\nprocess_cpu_seconds_total 3\n") is None
    slots = [{"id": 0, "is_processing": True}, {"id": 1, "is_processing": False}, {"state": 1}]
    assert parse_slots(slots) == EngineLoad(running=2, waiting=0)
    assert parse_slots({"error": "x"}) is None
    assert engine_root("http://node:8000/v1") == "http://node:8000"
    assert engine_root("http://node:8000/v1/") == "http://node:8000"


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_the_real_llamacpp_engine_is_probed_through_its_own_endpoint(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # llama-server with the flag users write for its Prometheus text (`--metrics`).
    models = gemma_models_yaml(
        tmp_path / "models.yaml", gemma_gguf, engine_args=("--ctx-size", "1024", "--metrics")
    )
    monkeypatch.setenv("MT_MODELS", str(models))
    record = json.loads((await asyncio.to_thread(mt, "submit", GEMMA, "--wait", "--json")).stdout)
    key, engine_pid = record["key"], record["engine_pid"]
    try:
        # llama-server's /health answers while it generates: the gateway probes it.
        assert record["health_path"] == "/health"
        registry = Path(os.environ["MT_HOME"]) / "registry"
        settings = {"health_interval_s": 0.1, "health_timeout_s": 1, "health_failures_to_eject": 2}
        async with (
            gateway(tmp_path, registry_dir=registry, **settings) as url,
            aiohttp.ClientSession() as client,
        ):
            samples = await wait_for_metrics(client, url, lambda m: m.get(probe_ok(key)) == 1)
            assert samples[healthy(key)] == 1
            # Its load, from its own /metrics (llamacpp:requests_processing/deferred).
            samples = await wait_for_metrics(
                client, url, lambda m: engine_requests(key, "running") in m
            )
            assert samples[engine_requests(key, "running")] == 0
            assert samples[engine_requests(key, "waiting")] == 0

            # A frozen engine answers nothing: ejected after two probes, back once thawed.
            os.kill(engine_pid, signal.SIGSTOP)
            try:
                await wait_for_metrics(client, url, lambda m: m.get(healthy(key)) == 0)
                async with client.get(url + "/healthz") as resp:
                    assert (await resp.json())["replicas"] == {GEMMA: {"ready": 0, "total": 1}}
            finally:
                os.kill(engine_pid, signal.SIGCONT)
            await wait_for_metrics(client, url, lambda m: m.get(healthy(key)) == 1)
            body = {**chat(GEMMA), "max_tokens": 4}
            async with client.post(url + CHAT, json=body) as resp:
                assert resp.status == 200, await resp.text()
            # Probes every 0.1 s never cut a stream short.
            body = {**chat(GEMMA, stream=True), "max_tokens": 48, "temperature": 0}
            async with client.post(url + CHAT, json=body) as resp:
                data = await resp.read()
            events = [e for e in data.split(b"\n\n") if e.startswith(b"data: {")]
            assert b'"error"' not in data and data.rstrip().endswith(b"data: [DONE]")
            finish = [json.loads(e[6:])["choices"][0].get("finish_reason") for e in events]
            assert finish[-1] in ("stop", "length"), finish[-3:]
    finally:
        await asyncio.to_thread(mt, "cancel", key)


async def test_mt_gateway_takes_the_probe_settings_from_its_options(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(health_status=503)) as down, FakeUpstream() as up:
        registry = Path(os.environ["MT_HOME"]) / "registry"
        down_key = add_job(registry, down)
        add_job(registry, up)
        options = ("--health-interval", "0.05", "--health-timeout", "1", "--health-failures", "99")
        with running_gateway(*options) as url:
            # Twenty rounds take a second at 0.05 s (the default 5 s would outlast the test).
            while up.seen.health_probes < 20 or down.seen.health_probes < 20:
                await asyncio.sleep(0.02)
            async with aiohttp.ClientSession() as client:
                samples = await wait_for_metrics(
                    client, url, lambda m: probe_ok(down_key) in m, owner_headers()
                )
    # Twenty failed probes in a row, yet not ejected: 99 are needed (the default is 3).
    assert samples[probe_ok(down_key)] == 0
    assert samples[healthy(down_key)] == 1


async def test_an_older_record_of_an_engine_without_health_is_probed_on_its_models_path(
    tmp_path: Path,
) -> None:
    # llama-cpp-python's server has no /health (404 here); its record predates health_path.
    async with FakeUpstream(Knobs(health_status=404)) as fake:
        record = Record(
            backend="local",
            job_id=new_nonce(),
            nonce=new_nonce(),
            model="m",
            engine="llamacpp",
            state="ready",
            base_url=fake.base_url,
            api_key=SecretStr(JOB_KEY),
        )
        Registry(tmp_path / "registry").write(record)
        async with (
            gateway(tmp_path, health_interval_s=0.05) as url,
            aiohttp.ClientSession() as client,
        ):
            await wait_for_metrics(client, url, lambda m: m.get(probe_ok(record.key)) == 1)
            while fake.seen.health_probes == 0:
                await asyncio.sleep(0.02)
    assert fake.seen.health_probes == 1  # asked once, then /v1/models every round


class FakeLlamaServer:
    """llama.cpp's ``llama-server`` without ``--metrics``: ``/health``, ``/slots``, and a 501
    for ``/metrics`` (its answer when the endpoint is off). Counts what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> FakeLlamaServer:
        app = web.Application()
        app.router.add_get("/{path:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        self.asked.append(request.path)
        if request.path == "/health":
            return web.json_response({"status": "ok"})
        if request.path == "/slots":
            slots = [{"id": 0, "is_processing": True}, {"id": 1, "is_processing": False}]
            return web.json_response(slots)
        message = {"code": 501, "message": "This server does not support metrics endpoint."}
        return web.json_response({"error": message}, status=501)


async def test_llama_server_without_metrics_reports_its_load_through_slots(
    tmp_path: Path,
) -> None:
    async with FakeLlamaServer() as server:
        record = Record(
            backend="local",
            job_id=new_nonce(),
            nonce=new_nonce(),
            model="m",
            engine="llamacpp",
            state="ready",
            base_url=server.base_url,
            api_key=SecretStr(JOB_KEY),
            health_path="/health",
        )
        Registry(tmp_path / "registry").write(record)
        async with (
            gateway(tmp_path, health_interval_s=0.05) as url,
            aiohttp.ClientSession() as client,
        ):
            running = engine_requests(record.key, "running")
            samples = await wait_for_metrics(client, url, lambda m: running in m)
            while server.asked.count("/slots") < 3:
                await asyncio.sleep(0.02)
    assert samples[running] == 1
    assert samples[engine_requests(record.key, "waiting")] == 0
    assert server.asked.count("/metrics") == 1  # a 501 means "not here": not asked again


async def test_when_every_replica_fails_its_probes_one_is_tried_on_a_short_clock(
    tmp_path: Path,
) -> None:
    # Hung: its health endpoint and its answers never come (a SIGSTOPped engine).
    hung_knobs = Knobs(health_hang=True, ttft_s=120)
    async with FakeUpstream(hung_knobs) as hung:
        key = add_job(tmp_path / "registry", hung)
        settings = {"health_interval_s": 0.05, "health_timeout_s": 0.3}
        async with (
            gateway(
                tmp_path,
                health_failures_to_eject=2,
                unhealthy_first_token_timeout_s=1,
                retry_after_s=3,
                **settings,
            ) as url,
            aiohttp.ClientSession() as client,
        ):
            await wait_for_metrics(client, url, lambda m: m.get(healthy(key)) == 0)
            for body in (chat("m"), chat("m", stream=True)):
                async with client.post(url + CHAT, json=body) as resp:
                    assert resp.status == 503
                    assert resp.headers["Retry-After"] == "3"
                    error = (await resp.json())["error"]
            assert error["code"] == "upstream_unavailable"
            assert "every replica of model 'm' is failing its health checks" in error["message"]
    assert hung.seen.requests == 2  # one try each, not a refusal without trying

    # Probes that are wrong (the engine serves, its health endpoint says 503): still served.
    async with FakeUpstream(Knobs(health_status=503)) as misprobed:
        key = add_job(tmp_path / "registry2", misprobed)
        async with (
            gateway(
                tmp_path,
                registry_dir=tmp_path / "registry2",
                health_failures_to_eject=2,
                unhealthy_first_token_timeout_s=1,
                **settings,
            ) as url,
            aiohttp.ClientSession() as client,
        ):
            await wait_for_metrics(client, url, lambda m: m.get(healthy(key)) == 0)
            async with client.post(url + CHAT, json=chat("m")) as resp:
                assert resp.status == 200
