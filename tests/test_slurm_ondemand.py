"""On-demand models on the real private Slurm cluster, with the real Gemma model.

`mt gateway --backend slurm` runs as a subprocess; the model is configured ``on_demand``
and no job runs for it when the requests arrive. ``sbatch`` on the gateway's PATH is a shim
that logs each call and then execs the real sbatch, so the tests count submits as Slurm
saw them, not as the gateway says it made them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from mtcli import GEMMA, owner_key, running_gateway
from slurmcluster import SlurmCluster

from hpc.registry import Record, Registry

pytestmark = [pytest.mark.slurm, pytest.mark.llamacpp, pytest.mark.timeout(600)]

BAD = "gemma-badpart"


def logging_shim(tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A logging ``tool`` first on PATH; returns the log it appends one line per call to."""
    real = shutil.which(tool)
    assert real is not None
    shim_dir = tmp_path / f"shim-{tool}"
    shim_dir.mkdir()
    log = tmp_path / f"{tool}-calls.log"
    shim = shim_dir / tool
    shim.write_text(
        f'#!/bin/sh\necho "{tool} $*" >> {shlex.quote(str(log))}\nexec {shlex.quote(real)} "$@"\n',
        encoding="utf-8",
    )
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim_dir}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.fixture
def sbatch_log(tmp_path: Path, cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A logging ``sbatch`` first on PATH; returns its log."""
    return logging_shim("sbatch", tmp_path, monkeypatch)


def gemma_entry(gemma_gguf: Path, **on_demand: object) -> dict[str, object]:
    """The Gemma model's models.yaml entry, on demand with a 5 s idle TTL."""
    return {
        "name": GEMMA,
        "engine": "llamacpp",
        "weights": {"source": str(gemma_gguf)},
        # 20 concurrent clients must all get whole answers: llama-server's slots take four
        # at a time and queue the rest.
        "engine_args": ["--ctx-size", "1024"],
        "startup_timeout_s": 120,
        "resources": {"cpus": 1, "mem_gb": 1, "time_limit_min": 30},
        "on_demand": {"idle_ttl_s": 5, "start_deadline_s": 240, **on_demand},
    }


def use_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *entries: object) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(json.dumps({"models": list(entries)}), encoding="utf-8")
    monkeypatch.setenv("MT_MODELS", str(path))
    return path


@pytest.fixture
def models(gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Gemma model on demand, and a variant whose partition Slurm does not have."""
    gemma = gemma_entry(gemma_gguf)
    bad = {**gemma, "name": BAD, "slurm": {"partition": "nosuchpartition"}}
    return use_models(tmp_path, monkeypatch, gemma, bad)


def registry() -> Registry:
    return Registry(Path(os.environ["MT_HOME"]) / "registry")


def records_of(model: str) -> list[Record]:
    return [r for r in registry().records() if r.model == model]


def state_of(key: str) -> str | None:
    record = registry().read(key)
    return None if record is None else record.state


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def wait_for(check: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def ask(url: str, model: str, stream: bool) -> str:
    """One chat request through the official client; the answer's text."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=owner_key(), max_retries=0, timeout=400)
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    if stream:
        chunks = client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answer = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0
    )
    return answer.choices[0].message.content or ""


def test_cold_burst_starts_one_job_idles_out_and_starts_again(
    cluster: SlurmCluster, models: Path, sbatch_log: Path
) -> None:
    with running_gateway("--backend", "slurm") as url:
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda i: ask(url, GEMMA, i % 2 == 0), range(20)))
        assert all(text.strip() for text in answers), answers
        assert len(calls(sbatch_log)) == 1, calls(sbatch_log)
        [first] = records_of(GEMMA)
        assert first.state == "ready" and first.backend == "slurm"
        assert first.started_by is not None and first.started_by.startswith("gateway on demand")

        # idle_ttl_s 5: the gateway cancels its job; the wrapper drains and marks it gone.
        wait_for(lambda: state_of(first.key) == "gone", 120, "the idle cancel")
        queued = {str(j["job_id"]): j["job_state"] for j in cluster.jobs()}
        assert queued.get(first.job_id) in (None, "CANCELLED", "COMPLETED", "COMPLETING")
        state_file = Path(os.environ["MT_HOME"]) / "ondemand-state.json"
        wait_for(
            lambda: json.loads(state_file.read_text())["models"][GEMMA]["state"] == "idle",
            30,
            "the state file to say idle",
        )

        assert ask(url, GEMMA, True).strip()
        assert len(calls(sbatch_log)) == 2
        second = next(r for r in records_of(GEMMA) if r.key != first.key)
        assert second.state == "ready"


def test_bad_partition_fails_every_waiting_request_with_one_sbatch(
    cluster: SlurmCluster, models: Path, sbatch_log: Path
) -> None:
    import openai

    def failure(i: int) -> str:
        try:
            ask(url, BAD, i % 2 == 0)
        except openai.APIError as exc:
            status = getattr(exc, "status_code", None)
            return f"{status} {exc}"
        return "answered"

    with running_gateway("--backend", "slurm") as url, ThreadPoolExecutor(10) as pool:
        errors = list(pool.map(failure, range(10)))
    assert len(calls(sbatch_log)) == 1, calls(sbatch_log)
    for i, error in enumerate(errors):
        assert "could not be started on demand" in error, error
        assert "nosuchpartition" in error or "partition" in error.lower(), error
        if i % 2:
            assert error.startswith("503 "), error  # the stream's error comes in-band instead
    assert records_of(BAD) == []
    assert not [j for j in cluster.jobs() if str(j["name"]).startswith(f"mt-{BAD}-")]


def test_load_scales_out_to_two_jobs_and_back_to_one(
    cluster: SlurmCluster, gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four clients asking in a loop keep 4 requests in flight: over a target of 1 on one
    replica, so the gateway starts a second job; when they stop, the second goes first."""
    use_models(tmp_path, monkeypatch, gemma_entry(gemma_gguf, max_replicas=2, target_in_flight=1))
    scancel_log = logging_shim("scancel", tmp_path, monkeypatch)
    stop = threading.Event()

    def client() -> int:
        answered = 0
        while not stop.is_set():
            answered += bool(ask(url, GEMMA, answered % 2 == 0).strip())
        return answered

    def ready() -> list[Record]:
        return [r for r in records_of(GEMMA) if r.state == "ready"]

    with running_gateway("--backend", "slurm") as url, ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client) for _ in range(4)]
        try:
            wait_for(lambda: len(ready()) == 2, 300, "a second job under load")
        finally:
            stop.set()
        assert all(c.result() > 0 for c in clients)
        first, second = sorted(records_of(GEMMA), key=lambda r: r.created_at)
        assert second.started_by is not None and "scale out" in second.started_by
        assert len(records_of(GEMMA)) == 2  # max_replicas: no third

        # No load: the extra replica is cancelled first, then the last one (scancel's log
        # has the order as Slurm saw it).
        wait_for(lambda: state_of(first.key) == state_of(second.key) == "gone", 120, "both cancels")
        cancels = calls(scancel_log)
        assert len(cancels) == 2, cancels
        assert second.job_id in cancels[0] and first.job_id in cancels[1], cancels


def test_a_requeued_job_is_waited_for_not_submitted_again(
    cluster: SlurmCluster,
    gemma_gguf: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sbatch_log: Path,
) -> None:
    """`scontrol requeue` of the gateway's ready job: its record becomes the next run's
    ``pending`` (not ended), requests wait for that run, and no second job is submitted."""
    entry = {**gemma_entry(gemma_gguf, idle_ttl_s=60), "slurm": {"requeue": True}}
    use_models(tmp_path, monkeypatch, entry)
    with running_gateway("--backend", "slurm") as url:
        assert ask(url, GEMMA, True).strip()
        [first] = records_of(GEMMA)
        assert first.state == "ready" and first.generation == 0
        cluster.run(["scontrol", "requeue", first.job_id])
        # The gateway, asking the scheduler, makes the record the next run's (generation 1).
        wait_for(
            lambda: (r := registry().read(first.key)) is not None and r.generation == 1,
            120,
            "the requeued job's next-run record",
        )
        # Asked while the job waits to run again, the answer comes from its next run.
        assert ask(url, GEMMA, True).strip()
        [again] = records_of(GEMMA)
        assert again.key == first.key and again.generation == 1 and again.state == "ready"
        assert len(calls(sbatch_log)) == 1, calls(sbatch_log)
        live = [j for j in cluster.jobs() if j["job_state"] in ("PENDING", "RUNNING")]
        assert [str(j["job_id"]) for j in live] == [first.job_id]
