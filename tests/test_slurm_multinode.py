"""A 2-node vLLM job on the real private Slurm cluster: every node runs its part.

The job wrapper, the sbatch script, ``srun`` and Slurm are real; Ray and vLLM are stand-ins
(tests/fakeray.py: Ray and vLLM across nodes cannot run here) that speak the same protocol
between the head and its workers (join with the job's token, ``ray status``'s format).
The nodes gpu1 and gpu2 are two slurmd on this one host, so "which node" is Slurm's word
(``SLURMD_NODENAME``, and ``SLURM_STEP_ID`` for the step), not the hostname.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from mtcli import mt
from slurmcluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]

TESTS = Path(__file__).parent
MODEL = "wide-model"


@pytest.fixture
def stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``ray`` and ``vllm`` shims first on the job's PATH (sbatch passes our environment on);
    yields the log every stand-in process appends to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ray", "vllm"):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} {TESTS / "fakeray.py"} {name} "$@"\n')
        shim.chmod(0o755)
    log = tmp_path / "fakeray.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_RAY_LOG", str(log))
    repo = str(TESTS.parent)  # the job's Python imports hpc and bench from this checkout
    monkeypatch.setenv("PYTHONPATH", f"{repo}:{os.environ.get('PYTHONPATH', '')}".rstrip(":"))
    yield log
    for pid in job_pids(log):  # only after a failure: the tests assert there are none
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


def models_yaml(path: Path, **resources: Any) -> Path:
    spec = {
        "name": MODEL,
        "engine": "vllm",
        "weights": {"source": "org/wide-model"},
        "startup_timeout_s": 90,
        "resources": {"gpus": 2, "nodes": 2, "cpus": 1, "mem_gb": 0.5, "time_limit_min": 10}
        | resources,
    }
    path.write_text(f"models:\n  - {json.dumps(spec)}\n", encoding="utf-8")
    return path


def entries(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def job_pids(log: Path) -> list[int]:
    """Every live process of this test's jobs (the wrapper, srun, the stand-ins): by the log
    in their environment (sbatch passed it on), so other tests' processes do not count."""
    found = []
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get("FAKE_RAY_LOG") == str(log):
                found.append(proc.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def stand_in_pids(log: Path) -> list[int]:
    """This test's Ray and vLLM stand-ins (and the fake engine the vLLM one becomes)."""
    found = []
    for pid in job_pids(log):
        with contextlib.suppress(psutil.NoSuchProcess):
            cmdline = " ".join(psutil.Process(pid).cmdline())
            if "fakeray.py" in cmdline or "bench.fakeengine" in cmdline:
                found.append(pid)
    return found


def steps_of(cluster: SlurmCluster, job_id: str) -> list[str]:
    out = cluster.run(["squeue", "-h", "-s", "-o", "%i"], check=True).stdout.split()
    return [step for step in out if step.split(".")[0] == job_id]


def wait_until(what: str, done: Any, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_two_node_job_runs_a_part_on_each_node_and_cancel_leaves_nothing(
    cluster: SlurmCluster, stand_ins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MT_MODELS", str(models_yaml(tmp_path / "models.yaml")))
    # The worker joins 2 s late (in its step only), so the wrapper must wait for it.
    ray_shim = stand_ins.parent / "bin" / "ray"
    ray_shim.write_text(
        '#!/bin/sh\n[ -n "${SLURM_STEP_ID:-}" ] && sleep 2\n'
        f'exec {sys.executable} {TESTS / "fakeray.py"} ray "$@"\n'
    )
    out = mt("submit", MODEL, "--backend", "slurm", "--wait", "--json", "--timeout", "120")
    record = json.loads(out.stdout)
    assert record["state"] == "ready", record
    job_id = record["job_id"]
    log = mt("logs", record["key"]).stdout
    joined = [line for line in log.splitlines() if "nodes joined" in line]
    assert "ray: 1 of 2 nodes joined" in joined[0], log
    assert "ray: 2 of 2 nodes joined" in joined[1], log
    assert log.index("2 of 2 nodes joined") < log.index("starting engine: vllm serve"), log

    seen = entries(stand_ins)
    head = [e for e in seen if e["role"] == "head"]
    workers = [e for e in seen if e["role"] == "worker"]
    engines = [e for e in seen if e["role"] == "vllm"]
    assert len(head) == len(workers) == len(engines) == 1, seen
    # The head and vLLM on the job's first node (the batch step), the worker on the other
    # node in a job step of its own (SLURM_NODEID counts within a step: 0 on each).
    assert head[0]["node_id"] == engines[0]["node_id"] == workers[0]["node_id"] == "0"
    assert head[0]["step"] == engines[0]["step"], seen
    assert workers[0]["step"] not in (None, head[0]["step"]), seen
    assert {head[0]["node"], workers[0]["node"]} == {"gpu1", "gpu2"}
    assert engines[0]["node"] == head[0]["node"] == record["node"]
    # Each node got its own share of the GPUs (1 of 2 per node).
    assert head[0]["cuda"] == "0" and workers[0]["cuda"] == "0"
    assert workers[0]["reply"] == "JOINED"  # the job's token, from srun's environment
    # vLLM started only once both nodes had joined, with the layout over them.
    assert engines[0]["nodes_at_start"] == 2
    argv = engines[0]["argv"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "1"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    # The head listens on the node's address, not every interface, on the port it logged.
    assert head[0]["address"] != "0.0.0.0"
    # No token in any process's argv (what other users see in ps).
    running = stand_in_pids(stand_ins)
    assert len(running) >= 3, running  # the head, the worker, vLLM's stand-in
    for pid in running:
        proc = psutil.Process(pid)
        assert proc.environ().get("RAY_AUTH_MODE") == "token"
        token = proc.environ()["RAY_AUTH_TOKEN"]
        assert len(token) >= 32 and token not in " ".join(proc.cmdline())
        assert token not in log and token not in mt("status", "--json").stdout
    assert len(steps_of(cluster, job_id)) >= 1  # the workers' step is running

    cancelled = json.loads(mt("cancel", record["key"], "--json").stdout)
    assert cancelled["state"] == "gone"
    assert cluster.wait_job(int(job_id), timeout=60) in (None, "CANCELLED", "COMPLETED")
    wait_until("job steps left after cancel", lambda: not steps_of(cluster, job_id))
    wait_until("job processes left after cancel", lambda: not job_pids(stand_ins))


def test_a_worker_that_cannot_join_fails_the_job_with_the_reason(
    cluster: SlurmCluster, stand_ins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker step that ends (here: refused, its token replaced) fails the job at once."""
    monkeypatch.setenv("MT_MODELS", str(models_yaml(tmp_path / "models.yaml")))
    # The worker's shim sends another token: only the worker step (SLURM_STEP_ID) is odd.
    ray_shim = stand_ins.parent / "bin" / "ray"
    ray_shim.write_text(
        '#!/bin/sh\n[ -n "${SLURM_STEP_ID:-}" ] && export RAY_AUTH_TOKEN=wrong\n'
        f'exec {sys.executable} {TESTS / "fakeray.py"} ray "$@"\n'
    )
    done = mt("submit", MODEL, "--backend", "slurm", "--wait", "--timeout", "120", check=False)
    assert done.returncode == 1, done.stderr
    assert "workers' step exited" in done.stderr and "1 of 2 nodes joined" in done.stderr
    assert [e["reply"] for e in entries(stand_ins) if e["role"] == "worker"] == ["DENIED"]
    assert not [e for e in entries(stand_ins) if e["role"] == "vllm"]  # never started
    wait_until("job processes left", lambda: not job_pids(stand_ins))
