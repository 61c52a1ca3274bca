"""`mt bench --backend slurm` on the real private cluster: the sweep runs in a Slurm job.

The cluster's nodes are this machine, so the job reaches the session's bare llama-server
(tests/realengine.py) on 127.0.0.1.
The cluster has no accounting (sacct fails): the result arrives without it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from mtcli import GEMMA, mt
from realengine import BareEngine
from slurmcluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.llamacpp, pytest.mark.timeout(300)]


def test_the_sweep_runs_in_a_job_and_is_written_here(
    cluster: SlurmCluster,
    bare_engine: BareEngine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("ENGINE_KEY", bare_engine.key)
    done = mt(
        "bench", bare_engine.base_url, "--api-key-env", "ENGINE_KEY", "--backend", "slurm",
        "--concurrency", "1,2", "--requests", "4", "--max-tokens", "8", "--prompt-tokens", "12",
        "--job-wait-s", "120", "--out", str(out),
    )  # fmt: skip
    assert "E2E" in done.stdout  # the table, printed here
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["model"] for r in rows} == {GEMMA}  # the model came from /v1/models
    assert [(r["concurrency"], r["requests"], r["errors"]) for r in rows] == [
        ("1", "4", "0"), ("2", "4", "0"),
    ]  # fmt: skip
    assert all(float(r["output_tokens_per_s"]) > 0 for r in rows)
    assert all(0 < float(r["ttft_ms_p50"]) < float(r["e2e_ms_p50"]) for r in rows)
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["backend"] == "slurm"
    assert config["node"] in {"gpu1", "gpu2"}  # measured inside the job, on a node
    assert config["job_id"]
    assert not [j for j in cluster.jobs() if j["job_state"] in ("PENDING", "RUNNING")]


def test_a_refused_job_is_an_error_with_slurms_reason(
    cluster: SlurmCluster,
    bare_engine: BareEngine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENGINE_KEY", bare_engine.key)
    done = mt(
        "bench", bare_engine.base_url, "--api-key-env", "ENGINE_KEY", "--backend", "slurm",
        "--partition", "nosuchpartition", "--requests", "1", "--concurrency", "1",
        "--out", str(tmp_path / "out"), check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "sbatch refused the bench job" in done.stderr
    assert "partition" in done.stderr.lower()
    assert not (tmp_path / "out").exists()
