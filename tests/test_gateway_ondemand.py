"""The on-demand controller in a real gateway on a real port, with a fake scheduler.

``FakeScheduler`` stands for a scheduler in these unit tests (Slurm or Kubernetes cannot be
made to hold a submit, or fail one, on cue): it implements the real Backend Protocol and
writes real registry records, the way the real backends and the job wrapper do, and the
test moves its jobs through pending → starting → ready. The engine is ``FakeUpstream``
(the OpenAI wire format). The same behaviour on the real Slurm cluster with the real Gemma
model is tested in test_slurm_ondemand.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_upstream import FakeUpstream, Knobs
from pydantic import SecretStr

from gateway.config import GatewayConfig
from gateway.keys import create_key
from gateway.ondemand.controller import OnDemandController
from gateway.ondemand.jobs import ModelState, started_by
from gateway.ondemand.wait import ON_DEMAND
from gateway.server import drain, start
from hpc.backends import JobHandle, JobStatus
from hpc.errors import BackendError
from hpc.poolstatus import on_demand_views, read_ondemand_state
from hpc.registry import FINAL_STATES, Record, Registry, new_nonce, pending_record, record_key
from hpc.spec import ModelSpec

pytestmark = pytest.mark.timeout(180)

CHAT = "/v1/chat/completions"
JOB_KEY = "mtj-on-demand-test-key"


class FakeScheduler:
    """Stands for a scheduler (a Backend): submits are counted and can be held or refused.

    ``submit`` waits for ``release`` (so a test can pile requests up behind it), then
    either raises ``refuse`` (as sbatch's error would) or writes the job's ``pending``
    record, as every real backend does. ``status`` answers ``pending (Priority)`` until
    the test calls ``run``, and ``done`` once the record is final (the job ends with its
    wrapper); ``cancel`` marks the record ``gone`` as the wrapper would.
    """

    name = "local"

    def __init__(self, registry: Registry, *, refuse: str | None = None) -> None:
        self.registry = registry
        self.refuse = refuse
        self.release = threading.Event()
        self.release.set()
        self.submitted: list[ModelSpec] = []
        self.cancelled: list[str] = []
        self.running: set[str] = set()
        self.ended: set[str] = set()

    def submit(self, spec: ModelSpec, *, started_by: str | None = None) -> JobHandle:
        self.submitted.append(spec)
        self.release.wait(30)
        if self.refuse is not None:
            raise BackendError(self.refuse, argv=["sbatch", "--parsable"])
        nonce = new_nonce()
        record = pending_record(
            self.name,
            nonce,
            nonce,
            model=spec.name,
            engine=spec.engine,
            log_path=None,
            started_by=started_by,
        )
        self.registry.write(record.model_copy(update={"api_key": SecretStr(JOB_KEY)}))
        return JobHandle(self.name, nonce, nonce)

    def status(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        out = {}
        for handle in handles:
            record = self.registry.read(record_key(self.name, handle.job_id))
            if record is not None and record.state in FINAL_STATES:
                # The job ends with its wrapper, which has just finished the record.
                out[handle.job_id] = JobStatus("done")
            elif handle.job_id in self.ended:
                out[handle.job_id] = JobStatus("failed", "NonZeroExitCode")
            elif handle.job_id in self.running:
                out[handle.job_id] = JobStatus("running", "node1")
            else:
                out[handle.job_id] = JobStatus("pending", "Priority")
        return out

    def cancel(self, handle: JobHandle) -> None:
        key = record_key(self.name, handle.job_id)
        if self.registry.read(key) is not None:
            self.registry.update(key, state="gone", reason="cancelled")
        self.cancelled.append(handle.job_id)

    def logs(self, handle: JobHandle, *, follow: bool = False) -> Iterator[str]:
        return iter(())

    # -- what the test does as the job's wrapper --------------------------------------
    def records(self) -> list[Record]:
        return [r for r in self.registry.records() if r.backend == self.name]

    def run(self, record: Record, base_url: str) -> None:
        """The job starts, then its engine is healthy (as the job wrapper writes it)."""
        self.running.add(record.job_id)
        self.registry.update(record.key, state="starting", node="node1")
        self.registry.update(record.key, state="ready", base_url=base_url)


def models_yaml(path: Path, *names: str, **on_demand: Any) -> Path:
    settings = {"idle_ttl_s": 900, "start_deadline_s": 30, **on_demand}
    entries = [
        {
            "name": name,
            "engine": "llamacpp",
            "weights": {"source": "/models/x.gguf"},
            "on_demand": settings,
        }
        for name in names
    ]
    path.write_text(json.dumps({"models": entries}), encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def gateway(
    tmp_path: Path, backend: FakeScheduler, **settings: Any
) -> AsyncIterator[tuple[str, OnDemandController]]:
    settings.setdefault("on_demand_poll_s", 0.05)
    settings.setdefault("on_demand_keepalive_s", 0.2)
    config = GatewayConfig(port=0, registry_dir=backend.registry.path, **settings)
    runner, port = await start(config, backend=backend)  # type: ignore[arg-type]
    try:
        yield f"http://127.0.0.1:{port}", runner.app[ON_DEMAND]
    finally:
        backend.release.set()
        await runner.cleanup()


async def until(check: Callable[[], object], timeout_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def chat(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def ask(
    client: aiohttp.ClientSession, url: str, model: str, stream: bool, **headers: str
) -> tuple[int, str, dict[str, str]]:
    async with client.post(url + CHAT, json=chat(model, stream), headers=headers) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


async def test_twenty_concurrent_requests_start_one_job_and_all_get_answers(
    tmp_path: Path, registry: Registry
) -> None:
    backend = FakeScheduler(registry)
    backend.release.clear()
    models = models_yaml(tmp_path / "models.yaml", "m")
    async with (
        FakeUpstream() as engine,
        gateway(tmp_path, backend, models_file=models) as (url, controller),
        aiohttp.ClientSession() as client,
    ):
        calls = [asyncio.create_task(ask(client, url, "m", i % 2 == 0)) for i in range(20)]
        await until(lambda: "m" in controller.states and controller.states["m"].in_flight == 20)
        backend.release.set()
        await until(backend.records)
        [record] = backend.records()
        assert record.started_by is not None and record.started_by.startswith("gateway on demand")
        await asyncio.sleep(0.3)  # a few keep-alives while it is pending
        backend.run(record, engine.base_url)
        answers = await asyncio.gather(*calls)

    assert len(backend.submitted) == 1
    assert len(backend.records()) == 1
    for i, (status, text, headers) in enumerate(answers):
        assert status == 200, text
        if i % 2 == 0:
            assert headers["Content-Type"].startswith("text/event-stream")
            comments = [line for line in text.splitlines() if line.startswith(": ")]
            assert ": pending (Priority)" in comments, comments
            assert text.rstrip().endswith("data: [DONE]")
        else:
            assert json.loads(text)["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert len(engine.seen.bodies) == 20


async def test_a_refused_submit_fails_every_waiter_once_and_is_remembered(
    tmp_path: Path, registry: Registry
) -> None:
    refusal = "sbatch: error: invalid partition specified: nosuchpartition"
    backend = FakeScheduler(registry, refuse=refusal)
    backend.release.clear()
    models = models_yaml(tmp_path / "models.yaml", "m")
    async with (
        gateway(tmp_path, backend, models_file=models) as (url, controller),
        aiohttp.ClientSession() as client,
    ):
        calls = [asyncio.create_task(ask(client, url, "m", i % 2 == 0)) for i in range(10)]
        await until(lambda: "m" in controller.states and controller.states["m"].in_flight == 10)
        backend.release.set()
        answers = await asyncio.gather(*calls)
        later = await ask(client, url, "m", False)

    assert len(backend.submitted) == 1
    for i, (status, text, headers) in enumerate(answers):
        if i % 2 == 0:  # the stream had its 200 already: the error comes in-band
            assert status == 200
            events = [line for line in text.splitlines() if line.startswith("data: ")]
            assert "[DONE]" not in text
            error = json.loads(events[-1][len("data: ") :])["error"]
        else:
            assert status == 503
            assert int(headers["Retry-After"]) > 0
            error = json.loads(text)["error"]
        assert error["code"] == "on_demand_start_failed"
        assert "invalid partition specified: nosuchpartition" in error["message"]
    status, text, _ = later
    assert status == 503 and "nosuchpartition" in text
    assert backend.records() == []


async def test_a_job_that_fails_while_starting_fails_its_waiters_with_the_reason(
    tmp_path: Path, registry: Registry
) -> None:
    backend = FakeScheduler(registry)
    models = models_yaml(tmp_path / "models.yaml", "m")
    async with (
        gateway(tmp_path, backend, models_file=models) as (url, _controller),
        aiohttp.ClientSession() as client,
    ):
        call = asyncio.create_task(ask(client, url, "m", False))
        await until(backend.records)
        [record] = backend.records()
        registry.update(
            record.key,
            state="failed",
            reason="engine exited with code 1",
            log_tail=["error: no such file /models/x.gguf"],
        )
        status, text, _ = await call
    assert status == 503
    message = json.loads(text)["error"]["message"]
    assert "engine exited with code 1" in message and "no such file" in message
    assert len(backend.submitted) == 1


async def test_a_job_the_scheduler_ended_before_its_record_is_a_failure(
    tmp_path: Path, registry: Registry
) -> None:
    backend = FakeScheduler(registry)
    models = models_yaml(tmp_path / "models.yaml", "m")
    async with (
        gateway(tmp_path, backend, models_file=models) as (url, _controller),
        aiohttp.ClientSession() as client,
    ):
        call = asyncio.create_task(ask(client, url, "m", True))
        await until(backend.records)
        [record] = backend.records()
        backend.ended.add(record.job_id)
        status, text, _ = await call
    assert status == 200 and "[DONE]" not in text
    assert "before it was ready" in text
    stored = registry.read(record.key)
    assert stored is not None and stored.state == "failed"


async def test_non_streaming_waits_until_the_deadline_then_503_with_the_state(
    tmp_path: Path, registry: Registry
) -> None:
    backend = FakeScheduler(registry)
    models = models_yaml(tmp_path / "models.yaml", "m", start_deadline_s=1)
    async with (
        gateway(tmp_path, backend, models_file=models) as (url, _controller),
        aiohttp.ClientSession() as client,
    ):
        status, text, headers = await ask(client, url, "m", False)
        again = await ask(client, url, "m", False)
    assert status == 503 and headers["Retry-After"] == "5"
    error = json.loads(text)["error"]
    assert error["code"] == "on_demand_starting"
    assert "pending (Priority)" in error["message"] and "start_deadline_s" in error["message"]
    assert again[0] == 503
    assert len(backend.submitted) == 1  # the second request joined the job still pending


async def test_idle_job_is_cancelled_and_the_next_request_starts_it_again(
    tmp_path: Path, registry: Registry
) -> None:
    backend = FakeScheduler(registry)
    models = models_yaml(tmp_path / "models.yaml", "m", idle_ttl_s=1)
    state_file = tmp_path / "state" / "ondemand.json"
    async with (
        FakeUpstream() as engine,
        gateway(tmp_path, backend, models_file=models, on_demand_state_file=state_file) as (
            url,
            _controller,
        ),
        aiohttp.ClientSession() as client,
    ):
        call = asyncio.create_task(ask(client, url, "m", False))
        await until(backend.records)
        [first] = backend.records()
        backend.run(first, engine.base_url)
        assert (await call)[0] == 200

        def listed() -> list[str]:
            shown = json.loads(state_file.read_text()) if state_file.exists() else {}
            return [job["job"] for job in shown.get("models", {}).get("m", {}).get("jobs", [])]

        await until(lambda: listed() == [first.key])
        await until(lambda: backend.cancelled)
        assert backend.cancelled == [first.job_id]
        gone = registry.read(first.key)
        assert gone is not None and gone.state == "gone"
        await until(lambda: json.loads(state_file.read_text())["models"]["m"]["state"] == "idle")

        call = asyncio.create_task(ask(client, url, "m", False))
        await until(lambda: len(backend.records()) == 2)
        second = next(r for r in backend.records() if r.key != first.key)
        backend.run(second, engine.base_url)
        assert (await call)[0] == 200
    assert len(backend.submitted) == 2
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    shown = json.loads(state_file.read_text())
    entry = shown["models"]["m"]
    assert set(entry) >= {"state", "idle_ttl_s", "last_request_at", "jobs", "error"}
    assert entry["idle_ttl_s"] == 1
    assert entry["jobs"][0]["why"].startswith("gateway on demand: request ")


async def test_never_cancels_a_job_it_did_not_start_but_adopts_its_own(
    tmp_path: Path, registry: Registry
) -> None:
    backend = FakeScheduler(registry)
    models = models_yaml(tmp_path / "models.yaml", "theirs", "mine", idle_ttl_s=0.3)
    async with FakeUpstream() as engine:
        records = {}
        for model, by in (("theirs", None), ("mine", started_by("r1", "mine", None))):
            nonce = new_nonce()
            record = pending_record(
                "local", nonce, nonce, model=model, engine="llamacpp", log_path=None
            )
            record = record.model_copy(
                update={
                    "state": "ready",
                    "base_url": engine.base_url,
                    "started_by": by,
                    "api_key": SecretStr(JOB_KEY),
                }
            )
            registry.write(record)
            records[model] = record
        async with (
            gateway(tmp_path, backend, models_file=models) as (url, _controller),
            aiohttp.ClientSession() as client,
        ):
            assert (await ask(client, url, "theirs", False))[0] == 200
            await until(lambda: backend.cancelled)
            await asyncio.sleep(0.5)
    assert backend.cancelled == [records["mine"].job_id]
    assert backend.submitted == []
    theirs = registry.read(records["theirs"].key)
    assert theirs is not None and theirs.state == "ready"


async def test_gateway_wide_and_per_key_caps(tmp_path: Path, registry: Registry) -> None:
    backend = FakeScheduler(registry)
    models = models_yaml(tmp_path / "models.yaml", "a", "b", "c", start_deadline_s=0.3)
    keys = tmp_path / "keys.yaml"
    alice = create_key(keys, "alice", max_on_demand_jobs=1)
    bob = create_key(keys, "bob")
    async with (
        gateway(tmp_path, backend, models_file=models, keys_file=keys, max_on_demand_jobs=2) as (
            url,
            _controller,
        ),
        aiohttp.ClientSession() as client,
    ):
        as_alice = {"Authorization": f"Bearer {alice}"}
        as_bob = {"Authorization": f"Bearer {bob}"}
        assert (await ask(client, url, "a", False, **as_alice))[0] == 503  # pending: deadline
        status, text, headers = await ask(client, url, "b", False, **as_alice)
        assert status == 429 and headers["Retry-After"]
        error = json.loads(text)["error"]
        assert error["code"] == "on_demand_key_limit" and "alice" in error["message"]
        assert (await ask(client, url, "b", False, **as_bob))[0] == 503  # starts b
        status, text, _ = await ask(client, url, "c", False, **as_bob)
        assert status == 503
        assert json.loads(text)["error"]["code"] == "on_demand_at_capacity"
    assert [spec.name for spec in backend.submitted] == ["a", "b"]


async def test_without_a_backend_on_demand_models_are_routed_like_others(
    tmp_path: Path,
) -> None:
    models = models_yaml(tmp_path / "models.yaml", "m")
    config = GatewayConfig(port=0, registry_dir=tmp_path / "registry", models_file=models)
    runner, port = await start(config)
    try:
        async with aiohttp.ClientSession() as client:
            status, text, _ = await ask(client, f"http://127.0.0.1:{port}", "m", False)
    finally:
        await runner.cleanup()
    assert status == 503 and json.loads(text)["error"]["code"] == "no_ready_endpoint"


async def test_stream_past_deadline_is_in_band_error_and_a_client_that_leaves_is_uncounted(
    tmp_path: Path, registry: Registry
) -> None:
    backend = FakeScheduler(registry)
    models = models_yaml(tmp_path / "models.yaml", "m", start_deadline_s=0.5)
    async with (
        gateway(tmp_path, backend, models_file=models) as (url, controller),
        aiohttp.ClientSession() as client,
    ):
        status, text, _ = await ask(client, url, "m", True)
        assert status == 200 and "[DONE]" not in text
        assert text.startswith(": submitting\n\n") or text.startswith(": pending")
        event = [line for line in text.splitlines() if line.startswith("data: ")][-1]
        assert json.loads(event[len("data: ") :])["error"]["code"] == "on_demand_starting"

        waiting = asyncio.create_task(ask(client, url, "m", False))
        await until(lambda: controller.states["m"].in_flight == 1)
        waiting.cancel()
        await until(lambda: controller.states["m"].in_flight == 0)
    assert len(backend.submitted) == 1


# -- scale out and in (max_replicas, target_in_flight) ---------------------------------
# The engines hold each request (a long time to first token), so requests stay in flight
# until the test cancels them; every check waits on the controller's state.
HOLD = Knobs(ttft_s=3600)


def load(
    client: aiohttp.ClientSession, url: str, model: str, n: int
) -> list[asyncio.Task[tuple[int, str, dict[str, str]]]]:
    return [asyncio.create_task(ask(client, url, model, i % 2 == 0)) for i in range(n)]


async def drop(calls: list[asyncio.Task[tuple[int, str, dict[str, str]]]]) -> None:
    """The clients leave (the gateway's handlers are cancelled, their requests uncounted)."""
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)


async def two_replicas(
    backend: FakeScheduler, e1: FakeUpstream, e2: FakeUpstream
) -> tuple[Record, Record]:
    """The cold start runs on ``e1``, then the scale-out the load asks for on ``e2``."""
    await until(backend.records)
    [first] = backend.records()
    backend.run(first, e1.base_url)
    await until(lambda: len(backend.records()) == 2)
    second = next(r for r in backend.records() if r.key != first.key)
    backend.run(second, e2.base_url)
    return first, second


async def test_load_over_the_target_starts_one_replica_at_a_time_up_to_max_replicas(
    tmp_path: Path, registry: Registry
) -> None:
    backend = FakeScheduler(registry)
    models = models_yaml(tmp_path / "models.yaml", "m", max_replicas=3, target_in_flight=2)
    state_file = tmp_path / "ondemand.json"
    async with (
        FakeUpstream(HOLD) as e1,
        FakeUpstream(HOLD) as e2,
        FakeUpstream(HOLD) as e3,
        gateway(tmp_path, backend, models_file=models, on_demand_state_file=state_file) as (
            url,
            controller,
        ),
        aiohttp.ClientSession() as client,
    ):
        calls = load(client, url, "m", 1)
        await until(backend.records)
        [first] = backend.records()
        backend.run(first, e1.base_url)
        calls += load(client, url, "m", 1)  # 2 in flight on 1 replica: at the target
        state = controller.states["m"]
        await until(lambda: e1.seen.requests == 2)
        assert len(backend.submitted) == 1 and not state.is_submitting()

        calls += load(client, url, "m", 4)  # 6 on 1: one more replica, one start only
        await until(lambda: state.in_flight == 6 and len(backend.records()) == 2)
        await until(lambda: e1.seen.requests == 6)  # they did not wait for the new one
        assert len(backend.submitted) == 2
        second = next(r for r in backend.records() if r.key != first.key)
        assert second.started_by is not None
        assert second.started_by.startswith("gateway on demand: scale out, 3 in flight on 1 ")

        backend.run(second, e2.base_url)  # 6 on 2 is still over: the monitor starts a third
        await until(lambda: len(backend.records()) == 3)
        third = next(r for r in backend.records() if r.key not in (first.key, second.key))
        backend.run(third, e3.base_url)
        await until(lambda: len(state.upstreams()) == 3)
        calls += load(client, url, "m", 6)  # 12 on 3: over, but max_replicas is reached
        await until(lambda: state.in_flight == 12)
        await until(lambda: e2.seen.requests > 0 and e3.seen.requests > 0)
        assert len(backend.submitted) == 3 and not state.is_submitting()

        def shown() -> list[dict[str, Any]]:
            entry = json.loads(state_file.read_text()) if state_file.exists() else {}
            jobs: list[dict[str, Any]] = entry.get("models", {}).get("m", {}).get("jobs", [])
            return jobs

        await until(lambda: sum(job["in_flight"] for job in shown()) == 12)
        whys = [job["why"] for job in shown()]
        assert ["scale out" in why for why in whys] == [False, True, True], whys
        # `mt pool status` joins the records and the state file: each job, with its why.
        views = on_demand_views(registry.records(), read_ondemand_state(state_file))
        why_of = {view.job: str(view.why) for view in views}
        assert set(why_of) == {first.key, second.key, third.key}
        assert "scale out" not in why_of[first.key]
        assert "scale out, 6 in flight on 2 replicas" in why_of[third.key], why_of
        await drop(calls)
    assert len(backend.submitted) == 3


async def test_gateway_cap_holds_scale_out_back(tmp_path: Path, registry: Registry) -> None:
    backend = FakeScheduler(registry)
    models = models_yaml(tmp_path / "models.yaml", "m", max_replicas=4, target_in_flight=1)
    async with (
        FakeUpstream(HOLD) as engine,
        gateway(tmp_path, backend, models_file=models, max_on_demand_jobs=1) as (
            url,
            controller,
        ),
        aiohttp.ClientSession() as client,
    ):
        calls = load(client, url, "m", 1)
        await until(backend.records)
        backend.run(backend.records()[0], engine.base_url)
        calls += load(client, url, "m", 4)
        await until(lambda: engine.seen.requests == 5)
        assert len(backend.submitted) == 1 and not controller.states["m"].is_submitting()
        await drop(calls)


async def test_idle_extra_replica_is_cancelled_first_then_the_last_one(
    tmp_path: Path, registry: Registry
) -> None:
    backend = FakeScheduler(registry)
    models = models_yaml(
        tmp_path / "models.yaml", "m", max_replicas=2, target_in_flight=1, idle_ttl_s=2
    )
    async with (
        FakeUpstream(HOLD) as e1,
        FakeUpstream() as e2,
        gateway(tmp_path, backend, models_file=models) as (url, controller),
        aiohttp.ClientSession() as client,
    ):
        calls = load(client, url, "m", 2)  # 2 on 1 replica: over the target of 1
        first, second = await two_replicas(backend, e1, e2)
        state = controller.states["m"]
        await until(lambda: len(state.upstreams()) == 2)
        await drop(calls)  # both idle now; the extra one (never used) the longest
        await until(lambda: backend.cancelled)
        assert backend.cancelled[0] == second.job_id  # the extra one, most recent, first
        await until(lambda: len(backend.cancelled) == 2 and state.phase() == "idle")
    assert backend.cancelled == [second.job_id, first.job_id]
    assert len(backend.submitted) == 2


async def test_a_failed_scale_out_does_not_fail_requests_the_ready_replica_serves(
    tmp_path: Path, registry: Registry
) -> None:
    backend = FakeScheduler(registry)
    models = models_yaml(tmp_path / "models.yaml", "m", max_replicas=2, target_in_flight=1)
    async with (
        FakeUpstream(HOLD) as engine,
        gateway(tmp_path, backend, models_file=models) as (url, controller),
        aiohttp.ClientSession() as client,
    ):
        calls = load(client, url, "m", 1)
        await until(backend.records)
        backend.refuse = "sbatch: error: QOSMaxSubmitJobPerUserLimit"
        backend.run(backend.records()[0], engine.base_url)
        calls += load(client, url, "m", 2)  # 3 on 1: a second replica, which sbatch refuses
        state = controller.states["m"]
        await until(lambda: state.failure is not None)
        assert state.failure is not None and "QOSMaxSubmitJobPerUserLimit" in state.failure
        engine.knobs = Knobs()  # new requests are answered at once
        answers = await asyncio.gather(*load(client, url, "m", 4))
        assert [status for status, _, _ in answers] == [200] * 4
        assert all("[DONE]" in text or "choices" in text for _, text, _ in answers)
        assert len(backend.submitted) == 2  # remembered: no loop of submits under load
        assert state.phase() == "ready"
        await drop(calls)


async def test_an_idle_extra_replica_stays_while_the_others_are_over_target(
    tmp_path: Path, registry: Registry
) -> None:
    backend = FakeScheduler(registry)
    models = models_yaml(
        tmp_path / "models.yaml", "m", max_replicas=2, target_in_flight=1, idle_ttl_s=1
    )
    async with (
        FakeUpstream(HOLD) as e1,
        FakeUpstream(HOLD) as e2,
        gateway(tmp_path, backend, models_file=models) as (url, controller),
        aiohttp.ClientSession() as client,
    ):
        calls = load(client, url, "m", 2)  # both wait for the cold start, then go to e1
        _first, second = await two_replicas(backend, e1, e2)
        state = controller.states["m"]
        await until(lambda: len(state.upstreams()) == 2 and e1.seen.requests == 2)
        state.jobs[second.key].used_at = 0.0  # unused for ages, but e1 alone would be over
        controller._reap()
        assert not state.jobs[second.key].stopping and backend.cancelled == []
        await drop(calls)
        await until(lambda: backend.cancelled)
        assert backend.cancelled[0] == second.job_id
        assert e2.seen.requests == 0


def test_the_controller_speaks_no_http() -> None:
    # Refusals are values (ErrorReply); only gateway.ondemand.wait turns them into HTTP.
    import ast

    from gateway.ondemand import controller

    tree = ast.parse(Path(controller.__file__).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [name for name in imported if name.split(".")[0] == "aiohttp"]


def quick_config(registry: Registry, models: Path) -> GatewayConfig:
    """The settings ``gateway`` uses, for a test that stops the gateway itself (``drain``)."""
    return GatewayConfig(
        port=0,
        registry_dir=registry.path,
        models_file=models,
        on_demand_poll_s=0.05,
        on_demand_keepalive_s=0.2,
    )


async def test_a_stream_waiting_for_a_cold_start_gets_an_in_band_error_at_shutdown(
    tmp_path: Path, registry: Registry
) -> None:
    """SIGTERM while a stream waits for its model's job (keep-alive comments sent, so its
    200 is out): after the grace it gets a ``gateway_shutting_down`` event, not a bare close,
    and a non-streaming one a 503 with Retry-After."""
    backend = FakeScheduler(registry)  # the job stays pending
    models = models_yaml(tmp_path / "models.yaml", "m")
    config = quick_config(registry, models)
    runner, port = await start(config, backend=backend)  # type: ignore[arg-type]
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as client:
        streamed = asyncio.create_task(ask(client, url, "m", True))
        waiting = asyncio.create_task(ask(client, url, "m", False))
        await until(backend.records)
        await asyncio.sleep(0.5)  # a keep-alive comment or two
        await drain(runner, 0.3)
        status, text, _ = await streamed
        plain_status, plain_text, plain_headers = await waiting
    assert status == 200 and text.startswith(": "), text
    events = [line for line in text.splitlines() if line.startswith("data: ")]
    assert events and "[DONE]" not in text, text
    assert json.loads(events[-1][len("data: ") :])["error"]["code"] == "gateway_shutting_down"
    assert plain_status == 503 and int(plain_headers["Retry-After"]) > 0
    assert json.loads(plain_text)["error"]["code"] == "gateway_shutting_down"


def _own_job(registry: Registry, state: str) -> tuple[Any, Record]:
    from gateway.ondemand.jobs import OwnJob

    record = pending_record("local", "7", "n7", model="m", engine="llamacpp", log_path=None)
    record = record.model_copy(update={"state": state, "base_url": "http://127.0.0.1:1/v1"})
    return OwnJob(record.key, JobHandle("local", "7", "n7"), 0.0, "why", None, record), record


def test_a_job_ends_when_its_scheduler_agrees_and_fails_a_start_only_once(
    registry: Registry,
) -> None:
    job, record = _own_job(registry, "ready")
    failed = record.model_copy(update={"state": "failed"})
    # Served once, then failed while the scheduler still runs it: no failed start; not ended.
    assert job.observe(failed, JobStatus("running")) == (False, False)
    assert job.observe(failed, None) == (False, False)  # a round that did not ask
    assert job.observe(failed, JobStatus("done")) == (False, True)
    # Never ready: the failure is told once, at once; ended only when the job is.
    job, record = _own_job(registry, "starting")
    failed = record.model_copy(update={"state": "failed"})
    assert job.observe(failed, JobStatus("running")) == (True, False)
    assert job.observe(failed, JobStatus("running")) == (False, False)
    assert job.observe(failed, JobStatus("failed")) == (False, True)
    # A requeued job's old run wrote ``gone``; the scheduler has it pending: not ended.
    job, record = _own_job(registry, "ready")
    assert job.observe(record.model_copy(update={"state": "gone"}), JobStatus("pending")) == (
        False,
        False,
    )


def test_a_job_whose_old_run_wrote_gone_is_live_until_its_scheduler_ends_it(
    registry: Registry,
) -> None:
    """``scontrol requeue``: the old run drains and writes ``gone`` while Slurm still has the
    job (COMPLETING, then PENDING). Counted live meanwhile, so a request in that window
    starts no second job (the chaos soak's duplicate); over once the scheduler says so."""
    job, record = _own_job(registry, "ready")
    state = ModelState("m", idle_ttl_s=60)
    state.jobs[job.key] = job
    gone = record.model_copy(update={"state": "gone"})
    job.observe(record, JobStatus("running"))
    job.observe(gone, None)  # the record moved; this round did not ask the scheduler
    assert state.live() == [job] and not job.over
    job.observe(gone, JobStatus("running"))  # Slurm: COMPLETING
    assert state.live() == [job]
    job.observe(gone, JobStatus("done"))
    assert job.over and state.live() == []


async def test_a_stream_that_waited_then_waits_for_its_engine_gets_it_in_band_too(
    tmp_path: Path, registry: Registry
) -> None:
    """The wait's keep-alives committed the 200; the job is ready, but its engine (hung, as
    a SIGSTOPped one) has not answered when the gateway stops: the stream ends with the
    in-band event, not a bare close."""
    backend = FakeScheduler(registry)
    models = models_yaml(tmp_path / "models.yaml", "m")
    config = quick_config(registry, models)
    asked = asyncio.Event()

    async def hung(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        asked.set()
        await asyncio.sleep(60)  # never answers
        writer.close()

    engine = await asyncio.start_server(hung, "127.0.0.1", 0)
    engine_port = engine.sockets[0].getsockname()[1]
    runner, port = await start(config, backend=backend)  # type: ignore[arg-type]
    try:
        async with aiohttp.ClientSession() as client:
            streamed = asyncio.create_task(ask(client, f"http://127.0.0.1:{port}", "m", True))
            await until(backend.records)
            await asyncio.sleep(0.5)
            [record] = backend.records()
            backend.run(record, f"http://127.0.0.1:{engine_port}/v1")
            await asyncio.wait_for(asked.wait(), 30)
            await drain(runner, 0.3)
            status, text, _ = await streamed
    finally:
        engine.close()
    assert status == 200 and text.startswith(": "), text
    events = [line for line in text.splitlines() if line.startswith("data: ")]
    assert events and "[DONE]" not in text, text
    assert json.loads(events[-1][len("data: ") :])["error"]["code"] == "gateway_shutting_down"
