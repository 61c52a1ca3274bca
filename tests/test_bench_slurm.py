"""`mt bench --backend slurm` on the real private cluster: the sweep runs in a Slurm job.

The cluster's nodes are this machine, so the job reaches the fake engine on 127.0.0.1.
The cluster has no accounting (sacct fails): the result arrives without it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from mtcli import mt
from slurmcluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]


def test_the_sweep_runs_in_a_job_and_is_written_here(
    cluster: SlurmCluster, engine_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = mt(
        "bench", engine_url, "--backend", "slurm", "--concurrency", "1,2", "--requests", "4",
        "--max-tokens", "8", "--prompt-tokens", "12", "--job-wait-s", "120", "--out", str(out),
    )  # fmt: skip
    assert "fake-model" in done.stdout  # the table, printed here
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
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
    cluster: SlurmCluster, engine_url: str, tmp_path: Path
) -> None:
    done = mt(
        "bench", engine_url, "--backend", "slurm", "--partition", "nosuchpartition",
        "--requests", "1", "--concurrency", "1", "--out", str(tmp_path / "out"), check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "sbatch refused the bench job" in done.stderr
    assert "partition" in done.stderr.lower()
    assert not (tmp_path / "out").exists()
