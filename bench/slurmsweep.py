"""`mt bench --backend slurm`: the sweep as a Python function in a Slurm job, near the engines.

``run_sweep_job`` submits ``sweep_on_node`` through ``hpc.slurm.functionjob`` (submitit with the
site's partition, account, QOS, modules and Python; awaited through squeue and the result
file, never sacct, as `mt doctor`'s probe is) and returns the levels the node measured,
for the caller to write as a local sweep's. The records travel back in submitit's result
pickle; the API key travels in its job pickle, in a 0700 directory.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import LevelResult, Target, sweep
from bench.workload import Schedule, Workload
from hpc.errors import MTError
from hpc.site import Site
from hpc.slurm.functionjob import FunctionJobResult, JobSpec, run_function

JOB_NAME = "mt-bench"


@dataclass(frozen=True)
class NodeSweep:
    """What the job sends back: the levels, and where they were measured from."""

    hostname: str
    slurm_job_id: str | None
    slurmd_nodename: str | None
    levels: list[LevelResult]


def sweep_on_node(target: Target, workload: Workload, schedule: Schedule) -> NodeSweep:
    """Run on the node: the whole sweep, as `mt bench` runs it locally."""
    levels = asyncio.run(sweep(target, workload, schedule))
    return NodeSweep(
        hostname=socket.gethostname(),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        slurmd_nodename=os.environ.get("SLURMD_NODENAME"),
        levels=levels,
    )


def job_time_limit_min(wait_s: float) -> int:
    """The job's time limit: the caller's wait, in whole minutes, at least five."""
    return max(5, math.ceil(wait_s / 60))


def run_sweep_job(
    site: Site,
    target: Target,
    workload: Workload,
    schedule: Schedule,
    *,
    wait_s: float,
    partition: str | None = None,
    folder: Path | None = None,
) -> tuple[NodeSweep, FunctionJobResult]:
    """Submit the sweep, wait up to ``wait_s`` (queue and run), return what the node measured.

    A job that was refused, stayed pending, timed out or failed raises ``MTError`` with
    Slurm's reason and a hint; a pending or timed-out job is cancelled first.
    """
    spec = JobSpec(
        job_name=JOB_NAME,
        comment="mt:bench",
        time_limit_min=job_time_limit_min(wait_s),
        cpus=2,  # the load generator's event loop, and the kernel's share of the sockets
        mem="2G",
        partition=partition,
    )
    done = run_function(
        site,
        sweep_on_node,
        {"target": target, "workload": workload, "schedule": schedule},
        spec=spec,
        timeout_s=wait_s,
        folder=folder or site.log_dir / "bench",
    )
    if done.outcome != "ok" or not isinstance(done.value, NodeSweep):
        what = {
            "rejected": "sbatch refused the bench job",
            "pending": f"the bench job {done.job_id} was still pending after {done.waited_s:.0f}s"
            + (" and was cancelled" if done.cancelled else f" (scancel {done.job_id})"),
            "timeout": f"the bench job {done.job_id} did not finish in time",
        }.get(done.outcome, f"the bench job {done.job_id} failed")
        log = f" (job log: {done.log_path})" if done.log_path else ""
        raise MTError(f"{what}: {done.reason}{log}", hint=done.hint)
    return done.value, done
