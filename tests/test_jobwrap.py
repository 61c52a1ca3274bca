"""The job wrapper, run for real as a subprocess around a fake engine (tests/fake_engine.py).

Each test starts ``python tests/fake_engine.py wrap``, which runs ``hpc.job.wrapper.JobWrapper``
with the fake engine as its engine, and watches the registry record and the job log the
way the gateway and ``mt logs`` would. Every process a test starts is stopped by pid.

The fake engine stays where a test needs an engine to misbehave (never healthy, exit early,
leave a grandchild, print its key, outlive a full disk). The happy paths (a job submitted by
hand, ``started_by`` kept) run the real wrapper (``python -m hpc.job.wrapper``) around the
real llama-server with the Gemma GGUF (tests/realengine.py): start_job's mode ``real``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import tmpfs
from jobclient import job_get
from realengine import gemma_gguf_path, llama_server

from hpc.job.plan import JobPlan, write_plan
from hpc.liveness import alive, boot_id, this_host
from hpc.registry import FINAL_STATES, Record, Registry, new_api_key, record_key
from hpc.spec import ModelSpec, Weights

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py").resolve()
WAIT_S = 30.0  # generous bounds for waits; no test asserts how long anything took

pytestmark = pytest.mark.timeout(90)


@dataclass
class Job:
    """One wrapper process, its log file and the record it keeps."""

    proc: subprocess.Popen[bytes]
    log: Path
    registry: Registry
    key: str
    extra_pids: list[int] = field(default_factory=list)

    def record(self) -> Record | None:
        return self.registry.read(self.key)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_state(self, *states: str) -> Record:
        """Poll the record until it is in one of ``states``; fail with the log if it never is."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            record = self.record()
            if record is not None and record.state in states:
                return record
            if self.proc.poll() is not None and (record is None or record.state in FINAL_STATES):
                break
            time.sleep(0.1)
        pytest.fail(
            f"record never reached {states}: {self.record()!r}\n--- job log ---\n{self.output()}"
        )

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"wrapper did not exit\n--- job log ---\n{self.output()}")

    def grandchild_pid(self) -> int:
        found = re.search(r"grandchild pid (\d+)", self.output())
        assert found, self.output()
        return int(found.group(1))


def _kill_by_pid(pids: list[int]) -> None:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)


def _engine_processes(job: Job) -> list[psutil.Process]:
    """Live fake-engine processes of ``job`` (found by the socket its log says the engine was
    started on, zombies excluded)."""
    sockets = re.findall(r"--host (\S+\.sock)", job.output())
    assert sockets, job.output()
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        ours = str(FAKE_ENGINE) in cmdline and "serve" in cmdline and sockets[0] in cmdline
        if ours and alive(proc.pid):
            found.append(proc)
    return found


def _get(record: Record, path: str, key: str | None) -> int:
    """GET ``path`` from the job's front, its certificate pinned as the record says."""
    return job_get(record, path, key)[0]


@pytest.fixture
def start_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Job]]:
    """Start wrappers around the fake engine, or (mode ``real``) the real wrapper around the
    real llama-server with the Gemma GGUF (tests/realengine.py); stop every one (and what it
    started) by pid."""
    jobs: list[Job] = []
    registry = Registry(tmp_path / "registry")

    def start(
        mode: str,
        *,
        job_id: str = "42",
        startup_timeout_s: float = 30,
        started_by: str | None = None,
    ) -> Job:
        spec = ModelSpec(
            name="fake-model",
            engine="vllm",
            weights=Weights(source="org/fake-model"),
            startup_timeout_s=startup_timeout_s,
        )
        argv = [sys.executable, "-u", str(FAKE_ENGINE), "wrap", "--plan"]
        if mode == "real":
            binary = llama_server()
            monkeypatch.setenv("PATH", f"{binary.parent}:{os.environ['PATH']}")
            spec = ModelSpec(
                name="fake-model",
                engine="llamacpp",
                weights=Weights(source=str(gemma_gguf_path())),
                engine_args=("--ctx-size", "2048"),
                startup_timeout_s=120,
            )
            argv = [sys.executable, "-u", "-m", "hpc.job.wrapper", "--plan"]
        plan = JobPlan(
            spec=spec,
            backend="local",
            job_id=job_id,
            nonce="n0nce",
            registry_dir=registry.path,
            stop_grace_s=1,
            started_by=started_by,
        )
        plan_path = tmp_path / f"plan-{job_id}.json"
        write_plan(plan, plan_path)
        log = tmp_path / f"job-{job_id}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*argv, str(plan_path), *(["--mode", mode] if mode != "real" else [])],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # signals sent to pytest's group do not reach it
            )
        job = Job(proc, log, registry, record_key("local", job_id))
        jobs.append(job)
        return job

    yield start
    for job in jobs:
        pids = [job.proc.pid]
        with contextlib.suppress(AssertionError):
            pids.append(job.grandchild_pid())
        record = job.record()
        if record is not None and record.engine_pid:
            pids.append(record.engine_pid)
        _kill_by_pid(pids)
        with contextlib.suppress(subprocess.TimeoutExpired):
            job.proc.wait(timeout=5)


def test_engine_never_healthy_is_stopped_at_the_deadline(start_job: Callable[..., Job]) -> None:
    job = start_job("never", startup_timeout_s=2)
    assert job.wait_exit() == 1
    record = job.wait_state("failed")
    assert record.reason == "engine not healthy within startup_timeout_s=2"
    assert "fake engine: loading weights 3/3" in record.log_tail
    assert record.base_url is None
    assert record.port is not None
    assert _engine_processes(job) == []


def test_engine_that_exits_early_is_recorded_failed_with_code_and_tail(
    start_job: Callable[..., Job],
) -> None:
    job = start_job("exit")
    assert job.wait_exit() == 1
    record = job.wait_state("failed")
    assert record.reason == "engine exited with code 3 before it was healthy"
    assert record.log_tail[-1] == "fake engine: out of memory, giving up"
    assert "fake engine: loading weights 1/3" in record.log_tail


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGUSR1])
def test_healthy_engine_is_ready_then_drained_and_its_whole_tree_stopped(
    start_job: Callable[..., Job], stop_signal: signal.Signals
) -> None:
    job = start_job("grandchild")
    record = job.wait_state("ready")
    assert record.port is not None
    assert record.base_url == f"https://127.0.0.1:{record.port}/v1"
    assert record.tls_sha256 is not None
    assert record.engine_pid is not None
    engine_pid, grandchild_pid = record.engine_pid, job.grandchild_pid()
    assert alive(engine_pid)
    assert alive(grandchild_pid)
    # The grandchild left the engine's process group: only a tree walk finds it.
    assert psutil.Process(grandchild_pid).ppid() == engine_pid
    key = record.api_key.get_secret_value()
    assert _get(record, "/v1/models", key) == 200

    job.proc.send_signal(stop_signal)
    assert job.wait_exit() == 0
    record = job.wait_state("gone")
    assert record.reason == f"stopped by {stop_signal.name}"
    assert record.engine_pid is None
    out = job.output()
    draining = out.index(f"record {job.key} -> draining")
    assert draining < out.index(f"record {job.key} -> gone")
    assert not alive(engine_pid)
    assert not alive(grandchild_pid)
    assert _engine_processes(job) == []


def test_the_key_is_masked_in_the_log_and_never_in_argv(
    start_job: Callable[..., Job], tmp_path: Path
) -> None:
    # The backend wrote the pending record (and the key) before the job started.
    key = new_api_key()
    registry = Registry(tmp_path / "registry")
    registry.write(
        Record(
            backend="local",
            job_id="7",
            nonce="n0nce",
            model="fake-model",
            engine="vllm",
            state="pending",
            api_key=key,
        )
    )
    job = start_job("healthy", job_id="7")
    record = job.wait_state("ready")
    assert record.api_key.get_secret_value() == key  # the backend's key, not a new one
    assert record.engine_pid is not None
    # The job's front takes the job's key and nothing else (the engine has its own key).
    assert _get(record, "/v1/models", key) == 200
    assert _get(record, "/v1/models", None) == 401
    assert _get(record, "/v1/models", new_api_key()) == 401
    engine_argv = psutil.Process(record.engine_pid).cmdline()
    wrapper_argv = psutil.Process(job.proc.pid).cmdline()
    assert not any(key in arg for arg in engine_argv + wrapper_argv)

    job.proc.send_signal(signal.SIGTERM)
    assert job.wait_exit() == 0
    out = job.output()
    assert "fake engine: api key is ***" in out  # the engine printed it; the wrapper masked it
    assert key not in out


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
def test_a_job_submitted_by_hand_creates_its_own_record_with_a_fresh_key(
    start_job: Callable[..., Job], tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "registry")
    assert registry.records() == []
    job = start_job("real", job_id="hand-1")
    record = job.wait_state("ready")
    assert record.job_id == "hand-1"
    assert record.nonce == "n0nce"
    assert record.model == "fake-model"
    key = record.api_key.get_secret_value()
    assert key.startswith("mtj-")
    assert len(key) > 30
    assert _get(record, "/v1/models", key) == 200
    assert [r.key for r in registry.records()] == [job.key]

    job.proc.send_signal(signal.SIGTERM)
    assert job.wait_exit() == 0
    assert key not in job.output()
    assert job.wait_state("gone").api_key.get_secret_value() == key


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
def test_started_by_from_the_plan_is_in_every_record_the_wrapper_writes(
    start_job: Callable[..., Job],
) -> None:
    """A job that starts before its backend wrote the pending record (a fast Slurm start)
    still says who started it: the plan carries it, and the wrapper's writes keep it."""
    mark = "gateway on demand: request r1 for fake-model (key -)"
    job = start_job("real", started_by=mark)
    assert job.wait_state("starting", "ready").started_by == mark
    assert job.wait_state("ready").started_by == mark
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait_exit() == 0
    assert job.wait_state("gone").started_by == mark


# The wrapper when its registry cannot be written (issue 16): a full disk between
# ``starting`` and ``ready``, a registry remounted read-only under a ready job. Real
# filesystems: a small tmpfs mounted over the registry directory (root only), filled or
# remounted read-only while the wrapper and its engine run.


@pytest.fixture
def registry_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted where the wrapper keeps its records."""
    with tmpfs.mounted(tmp_path / "registry") as path:
        yield path


def _engine_pid_while_starting(job: Job) -> int:
    """The engine's pid as the ``starting`` record gives it (written when it starts)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        record = job.record()
        if record is not None and record.state == "starting" and record.engine_pid:
            return record.engine_pid
        time.sleep(0.05)
    raise AssertionError(f"no starting record with an engine pid:\n{job.output()}")


def test_a_full_disk_before_ready_stops_the_engine_and_says_why(
    registry_fs: Path, start_job: Callable[..., Job]
) -> None:
    job = start_job("never", startup_timeout_s=3)
    engine_pid = _engine_pid_while_starting(job)
    assert alive(engine_pid)
    tmpfs.fill(registry_fs)
    assert job.wait_exit() == 1
    assert not alive(engine_pid)
    out = job.output()
    assert "registry write failed: cannot write record local-42: No space left on device" in out
    assert f"at {registry_fs}" in out


def test_a_read_only_registry_at_the_stop_signal_still_stops_the_engine(
    registry_fs: Path, start_job: Callable[..., Job]
) -> None:
    job = start_job("healthy")
    record = job.wait_state("ready")
    assert record.engine_pid is not None and alive(record.engine_pid)
    tmpfs.remount_read_only(registry_fs)
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait_exit() == 1
    assert not alive(record.engine_pid)
    assert "registry write failed: cannot write record local-42: Read-only file system" in (
        job.output()
    )


# Outside writers (issue 16): `mt cancel` or `mt status` ends a record while its wrapper
# runs; the wrapper's own later writes must not revive it.


def test_an_outside_gone_is_not_followed_by_the_wrappers_draining(
    start_job: Callable[..., Job], tmp_path: Path
) -> None:
    registry_dir = tmp_path / "registry"
    registry_dir.mkdir(mode=0o700)
    # A tmp file a writer killed 20 minutes ago left behind: the wrapper cleans it at start.
    leftover = registry_dir / ".local-9.json.1234.abcd1234.tmp"
    leftover.write_text("{")
    os.utime(leftover, (time.time() - 1200, time.time() - 1200))
    job = start_job("healthy")
    record = job.wait_state("ready")
    assert not leftover.exists()
    # Who can judge its pids, recorded by the wrapper itself.
    assert (record.host, record.boot_id) == (this_host(), boot_id())
    assert record.pid == job.proc.pid and record.pid_started_at is not None
    assert record.engine_pid is not None and record.engine_started_at is not None

    job.registry.update(job.key, state="gone", reason="cancelled", engine_pid=None)
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait_exit() == 0
    stored = job.record()
    assert stored is not None and (stored.state, stored.reason) == ("gone", "cancelled")
    assert not alive(record.engine_pid)  # stopped all the same
    assert "not moved to draining" in job.output()
