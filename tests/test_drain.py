"""How the job wrapper counts an engine's requests in flight, and when a drain ends.

The load endpoints are real HTTP servers on loopback: ``bench.fakeengine`` for vLLM's
``/metrics`` (its real Prometheus text), small aiohttp apps for llama-server's ``/slots`` and
for an engine with neither (llama-cpp-python's server answers 404 to both); the TCP count is
read from this machine's real /proc/net/tcp with real connections open.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from bench.fakeengine import FakeUpstream, Knobs
from hpc.job.drain import InFlight, drain
from hpc.job.engineload import established_connections
from hpc.job.engines import EngineLaunch
from hpc.job.plan import JobPlan, warning_drain_s
from hpc.job.proctree import ENGINE_STOP_SIGNAL, stop_tree
from hpc.job.wrapper import start_engine
from hpc.liveness import alive
from hpc.spec import DEFAULT_DRAIN_S, ModelSpec

pytestmark = pytest.mark.timeout(30)

KEY = "mtj-drain-test-key"


async def test_vllm_metrics_count_running_and_waiting() -> None:
    async with FakeUpstream(Knobs(engine_running=2, engine_waiting=1)) as fake:
        counter = InFlight(f"http://127.0.0.1:{fake.port}", KEY, "vllm", fake.port)
        assert await asyncio.to_thread(counter.count) == 3
        assert counter.method == "/metrics"
        fake.knobs = dataclasses.replace(fake.knobs, engine_running=0, engine_waiting=0)
        assert await asyncio.to_thread(counter.count) == 0
        assert fake.seen.probe_authorization[-1] == f"Bearer {KEY}"


@contextlib.asynccontextmanager
async def _app(routes: web.RouteTableDef) -> AsyncIterator[int]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def test_llama_server_without_metrics_is_counted_by_its_slots() -> None:
    routes = web.RouteTableDef()

    @routes.get("/metrics")
    async def metrics(_request: web.Request) -> web.Response:
        return web.json_response({"error": "metrics are disabled"}, status=501)

    @routes.get("/slots")
    async def slots(_request: web.Request) -> web.Response:
        return web.json_response([{"id": 0, "is_processing": True}, {"id": 1}])

    async with _app(routes) as port:
        counter = InFlight(f"http://127.0.0.1:{port}", KEY, "llamacpp", port)
        assert await asyncio.to_thread(counter.count) == 1
        assert counter.method == "/slots"


async def test_an_engine_without_load_endpoints_is_counted_by_its_connections() -> None:
    routes = web.RouteTableDef()

    @routes.get("/v1/models")
    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"data": []})

    async with _app(routes) as port:
        counter = InFlight(f"http://127.0.0.1:{port}", KEY, "llamacpp", port)
        assert await asyncio.to_thread(counter.count) == 0  # its own GETs are closed
        assert counter.method == "tcp"
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            await asyncio.sleep(0.1)
            assert await asyncio.to_thread(counter.count) == 2
        finally:
            for client in clients:
                client.close()
        await asyncio.sleep(0.2)
        assert established_connections(port) == 0


class _Proc:
    def __init__(self, code: int | None = None) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code


@dataclasses.dataclass
class _Counter:
    answers: list[int | None]
    method: str = "fake"

    def count(self) -> int | None:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_a_drain_waits_out_the_settle_time_then_ends_when_idle() -> None:
    deadline = time.monotonic() + 10
    drained = drain(_Proc(), _Counter([2, 1, 0]), lambda: deadline, settle_s=0.3, poll_s=0.05)
    assert drained.why == "idle" and drained.in_flight == 0
    assert 0.3 <= drained.waited_s < 2


def test_a_drain_ends_at_the_budget_and_a_later_signal_only_shortens_it() -> None:
    deadlines = [time.monotonic() + 10]
    counter = _Counter([1])
    started = time.monotonic()
    # A second signal (Slurm's TERM at the time limit, after USR1) moves the deadline closer.
    deadlines.append(time.monotonic() + 0.4)
    drained = drain(_Proc(), counter, lambda: min(deadlines), poll_s=0.05)
    assert drained.why == "budget" and drained.in_flight == 1
    assert 0.4 <= time.monotonic() - started < 1.5


def test_a_drain_ends_when_the_engine_exits() -> None:
    drained = drain(_Proc(0), _Counter([1]), lambda: time.monotonic() + 10)
    assert drained.why == "exited"


def test_budgets_after_each_signal() -> None:
    spec = ModelSpec.model_validate(
        {"name": "m", "engine": "vllm", "weights": {"source": "org/m"}, "drain_s": 20}
    )
    plan = JobPlan(
        spec=spec,
        backend="slurm",
        nonce="n",
        registry_dir=Path("/r"),
        drain_s=spec.drain_s,
        warning_drain_s=warning_drain_s(spec.slurm.signal_grace_s),
    )
    assert plan.drain_budget_s(signal.SIGTERM) == plan.drain_budget_s(signal.SIGINT) == 20
    assert plan.drain_budget_s(signal.SIGUSR1) == plan.drain_budget_s(signal.SIGUSR2) == 105
    assert warning_drain_s(10) == 0  # a warning shorter than the engine's stop: no drain
    bare = JobPlan(spec=spec, backend="local", nonce="n", registry_dir=Path("/r"))
    assert bare.drain_budget_s(signal.SIGUSR1) == bare.drain_budget_s(signal.SIGTERM)
    assert bare.drain_s == DEFAULT_DRAIN_S == 15


def test_the_engine_ignores_slurms_term_and_stops_on_the_engine_stop_signal() -> None:
    launch = EngineLaunch(argv=["sleep", "60"], env={}, health_path="/", health_needs_key=False)
    with open("/dev/null", "w") as out:
        proc, pump = start_engine(launch, {"PATH": "/usr/bin:/bin"}, out, KEY)
        try:
            proc.send_signal(signal.SIGTERM)  # what scancel sends every process of the job
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
            started = time.monotonic()
            stop_tree(proc.pid, grace_s=5, sig=ENGINE_STOP_SIGNAL)
            assert not alive(proc.pid)
            assert time.monotonic() - started < 2  # by INT, not by the KILL after grace
        finally:
            if alive(proc.pid):
                proc.kill()
            pump.join()
    # The wrapper's own TERM is not blocked after the engine started.
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
