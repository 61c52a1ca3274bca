"""Preemption and the time limit on the real engine: the job wrapper drains before it stops.

The real wrapper (``python -m hpc.job.wrapper``) runs llama-cpp-python's server with the
real Gemma GGUF, behind the real gateway (``mt gateway``). A long stream is started, then
the stop signal comes the way Slurm sends it: TERM to every process of the job (scancel,
preemption), engine included, or USR1 to the batch shell only (``--signal=B:USR1@N``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mtcli import owner_headers, owner_key, running_gateway
from streams import post_status, start_stream

from hpc.job.plan import JobPlan, write_plan
from hpc.registry import Record, Registry, record_key
from hpc.spec import ModelSpec

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(300)]

MODEL = "gemma-drain"


@dataclass
class Job:
    """The real wrapper serving Gemma, as a process of its own (its own session)."""

    proc: subprocess.Popen[bytes]
    log: Path
    registry: Registry
    key: str

    def record(self) -> Record:
        record = self.registry.read(self.key)
        assert record is not None, self.output()
        return record

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_state(self, state: str, timeout_s: float) -> tuple[Record, float]:
        """The record once it is ``state``, and when that was seen (monotonic)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = self.registry.read(self.key)
            if record is not None and record.state == state:
                return record, time.monotonic()
            time.sleep(0.05)
        pytest.fail(f"record never {state}: {self.registry.read(self.key)!r}\n{self.output()}")

    def engine_tree(self) -> list[psutil.Process]:
        pid = self.record().engine_pid
        assert pid is not None
        engine = psutil.Process(pid)
        return [engine, *engine.children(recursive=True)]


@pytest.fixture
def start_job(gemma_gguf: Path, tmp_path: Path) -> Iterator[Callable[..., Job]]:
    """Start real wrappers around the real engine; kill what is left of them by pid."""
    started: list[tuple[Job, list[psutil.Process]]] = []
    registry = Registry(Path(os.environ["MT_HOME"]) / "registry")

    def start(job_id: str, *, drain_s: float, stop_grace_s: float) -> Job:
        spec = ModelSpec.model_validate(
            {
                "name": MODEL,
                "engine": "llamacpp",
                "weights": {"source": str(gemma_gguf)},
                "engine_args": ["--ctx-size", "2048"],
                "startup_timeout_s": 120,
                "drain_s": drain_s,
            }
        )
        plan = JobPlan(
            spec=spec,
            backend="local",
            job_id=job_id,
            nonce=f"n{job_id}",
            registry_dir=registry.path,
            drain_s=spec.drain_s,
            stop_grace_s=stop_grace_s,
        )
        plan_path = tmp_path / f"plan-{job_id}.json"
        write_plan(plan, plan_path)
        log = tmp_path / f"job-{job_id}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hpc.job.wrapper", "--plan", str(plan_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        job = Job(proc, log, registry, record_key("local", job_id))
        job.wait_state("ready", 120)
        started.append((job, [psutil.Process(proc.pid), *job.engine_tree()]))
        return job

    yield start
    for job, procs in started:
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            job.proc.wait(timeout=5)


def _gateway_lists(gateway_url: str, model: str) -> bool:
    request = urllib.request.Request(gateway_url + "/v1/models", headers=owner_headers())  # noqa: S310
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return model in [m["id"] for m in json.load(response)["data"]]


def _wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return time.monotonic()


def test_a_stream_in_flight_finishes_whole_before_the_engine_stops(
    start_job: Callable[..., Job],
) -> None:
    drain_s, stop_grace_s = 60.0, 5.0
    job = start_job("drain1", drain_s=drain_s, stop_grace_s=stop_grace_s)
    with running_gateway() as gateway_url:
        _wait_until(lambda: _gateway_lists(gateway_url, MODEL), 10, "never routed")
        stream = start_stream(gateway_url + "/v1", owner_key(), MODEL, max_tokens=120)
        assert stream.first_token.wait(60), stream
        assert not stream.done.is_set(), "the stream must still be running at the signal"

        # scancel / preemption: TERM to every process of the job, the engine's included.
        engine = job.engine_tree()
        signalled = time.monotonic()
        job.proc.send_signal(signal.SIGTERM)
        for proc in engine:
            proc.send_signal(signal.SIGTERM)

        record, seen = job.wait_state("draining", 5)
        assert seen - signalled < 1.0
        assert record.reason == "received SIGTERM"
        # The gateway re-reads the registry every second: it stops routing to the job...
        _wait_until(lambda: not _gateway_lists(gateway_url, MODEL), 5, "still routed")
        # ...and a new request is refused there (503, retry later), never sent to the job.
        assert post_status(gateway_url + "/v1", owner_key(), MODEL) == 503
        assert not stream.done.is_set(), "the stream ended before the gateway stopped routing"
        assert all(proc.is_running() for proc in engine), "the engine obeyed Slurm's TERM"

        assert stream.done.wait(drain_s), "the stream never finished"
        assert stream.status == 200 and stream.error is None, stream.error
        assert stream.data()[-1] == "[DONE]", stream.lines[-3:]
        assert stream.finish_reason() == "length"  # whole: every token it asked for
        assert stream.tokens() >= 120
        assert not any('"error"' in d for d in stream.data())

        assert job.proc.wait(timeout=drain_s + stop_grace_s) == 0
        stopped = time.monotonic()
        record = job.record()
        assert record.state == "gone"
        assert record.reason == "stopped by SIGTERM"
        assert record.engine_pid is None
        assert stream.ended_at() < stopped
        assert stopped - signalled < drain_s + stop_grace_s
        assert not [p for p in engine if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        out = job.output()
        assert "draining: requests in flight may finish for" in out, out
        assert "nothing in flight (front)" in out, out


def test_a_stream_longer_than_the_budget_is_cut_at_the_budget(
    start_job: Callable[..., Job],
) -> None:
    drain_s, stop_grace_s = 4.0, 3.0
    job = start_job("drain2", drain_s=drain_s, stop_grace_s=stop_grace_s)
    record = job.record()
    key = record.api_key.get_secret_value()
    assert record.base_url is not None
    # Straight to the engine, with the job's key: about a minute of tokens on this machine.
    stream = start_stream(record.base_url, key, MODEL, max_tokens=1500, pin=record.tls_sha256)
    assert stream.first_token.wait(60), stream
    engine = job.engine_tree()

    signalled = time.monotonic()
    job.proc.send_signal(signal.SIGUSR1)  # the time-limit warning: to the batch shell only
    job.wait_state("draining", 5)
    assert job.proc.wait(timeout=drain_s + stop_grace_s + 10) == 0
    stopped = time.monotonic()
    assert drain_s <= stopped - signalled < drain_s + stop_grace_s + 5

    record = job.record()
    assert record.state == "gone"
    assert record.reason is not None
    assert record.reason.startswith("stopped by SIGUSR1: drain budget spent after 4s, ")
    assert stream.done.wait(10)
    assert "[DONE]" not in stream.data()  # cut, not finished
    assert 0 < stream.tokens() < 1500
    # It ran until the budget was spent: its last token came at most one gap between tokens
    # before the cut (a fast engine's last token arrives just before it).
    times = [at for at, _ in stream.lines]
    gap = max(later - earlier for earlier, later in itertools.pairwise(times))
    assert stream.ended_at() + gap - signalled >= drain_s
    assert not [p for p in engine if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
