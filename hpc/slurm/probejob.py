"""The doctor's probe as a Slurm job: submit ``node_probe``, wait, report.

``run_probe`` submits ``hpc.job.nodeprobe.node_probe`` through ``hpc.slurm.functionjob`` (submitit,
awaited through squeue and the result file, never sacct) and returns a ``ProbeResult``:
ok with the node's report, rejected by sbatch, still pending (cancelled, with Slurm's
reason and a hint), timed out, or failed. It is apart from the doctor's checks because it
is the one part that submits a job, and apart from ``hpc.job.nodeprobe`` because that runs
on the node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpc.job.nodeprobe import node_probe
from hpc.site import Site
from hpc.slurm.client import SlurmAPI
from hpc.slurm.functionjob import JobSpec, Outcome, pending_hint, run_function

__all__ = ["JOB_NAME", "PROBE_TIME_LIMIT_MIN", "ProbeResult", "pending_hint", "run_probe"]

JOB_NAME = "mt-doctor"
PROBE_TIME_LIMIT_MIN = 5  # the probe takes seconds once it runs; this only bounds a hang


@dataclass(frozen=True)
class ProbeResult:
    """What became of the probe job, and what it saw on its node (``report``)."""

    outcome: Outcome
    job_id: str | None
    gpus: int
    partition: str | None
    waited_s: float
    state: str = ""  # Slurm's last word on the job (PENDING, RUNNING, COMPLETED, …)
    reason: str = ""  # the pending reason, sbatch's error, or why the job failed
    hint: str | None = None
    cancelled: bool = False
    log_path: str | None = None
    report: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return asdict(self)


def run_probe(
    site: Site,
    *,
    gpus: int,
    partition: str | None,
    timeout_s: float,
    folder: Path,
    client: SlurmAPI | None = None,
    sbatch_extra: Mapping[str, str | bool] | None = None,
) -> ProbeResult:
    """Submit ``node_probe`` with submitit and wait up to ``timeout_s`` for what it saw.

    The job asks for the site's partition (or ``partition``), account and QOS, ``gpus``
    GPUs as gres, one CPU and a few minutes; it runs the site's ``module load``s and
    Python. Job files go to a new directory under ``folder`` (0700, shared with the nodes).
    A job still pending at the timeout is cancelled and reported with its reason; sbatch
    refusing the job is an outcome (``rejected``), not an exception. ``sbatch_extra`` adds
    sbatch flags (internal: tests hold the job with ``{"hold": True}``).
    """
    registry = str(site.registry_dir) if site.registry_dir.is_dir() else None
    spec = JobSpec(
        job_name=JOB_NAME,
        comment="mt:doctor",
        time_limit_min=PROBE_TIME_LIMIT_MIN,
        gpus=gpus,
        partition=partition,
    )
    done = run_function(
        site,
        node_probe,
        {"registry_dir": registry, "staging_dir": site.config.staging.dir},
        spec=spec,
        timeout_s=timeout_s,
        folder=folder,
        client=client,
        sbatch_extra=sbatch_extra,
    )
    return ProbeResult(
        outcome=done.outcome,
        job_id=done.job_id,
        gpus=gpus,
        partition=done.partition,
        waited_s=done.waited_s,
        state=done.state,
        reason=done.reason,
        hint=done.hint,
        cancelled=done.cancelled,
        log_path=done.log_path,
        report=dict(done.value) if done.outcome == "ok" else None,
    )
