"""The Slurm backend: a model spec becomes an sbatch script that runs the job wrapper.

Submit renders the script (hpc.slurm.sbatch) and runs ``sbatch --parsable``; the job service
then creates the job's ``pending`` record unless the job, already running, has written its
own. If sbatch times out, the job is looked up by its nonce (``--comment=mt:<nonce>``)
before anything is resubmitted, so one submit never makes two jobs. Status asks squeue once
for all jobs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpc.backends.base import Capabilities, JobHandle, JobRequest, JobStatus, Submitted
from hpc.errors import BackendError, MTError
from hpc.job.plan import JobPlan, PoolPlan
from hpc.registry import new_nonce
from hpc.site import Site
from hpc.slurm.client import (
    CANCELLED_STATES,
    DONE_STATES,
    PENDING_STATES,
    RUNNING_STATES,
    SlurmAPI,
    SlurmClient,
    SlurmJob,
)
from hpc.slurm.pyslurm import pyslurm_api_for
from hpc.slurm.sbatch import SbatchJob, render
from hpc.spec import ModelSpec, PoolSpec
from hpc.transport import CommandTimeout


@dataclass(frozen=True)
class PreparedJob:
    """A job ready for sbatch: its script, plan and name. Nothing has been written yet."""

    script: str
    plan: JobPlan | PoolPlan
    job: SbatchJob


def scheduler_status(job: SlurmJob) -> JobStatus:
    """Slurm's word for a job, as a backend-neutral status with Slurm's reason."""
    reason = "" if job.reason in ("None", "") else job.reason
    if job.state in PENDING_STATES:
        return JobStatus("pending", reason or job.state.lower())
    if job.state in RUNNING_STATES:
        return JobStatus("running", job.nodes)
    if job.state in DONE_STATES:
        return JobStatus("done", job.state)
    if job.state in CANCELLED_STATES:
        return JobStatus("cancelled", job.state)
    return JobStatus("failed", f"{job.state} {reason}".strip())


class SlurmBackend:
    """Submits model jobs with sbatch; the job wrapper does the rest on the node."""

    name = "slurm"
    capabilities = Capabilities(scripts=True, pools=True)

    def __init__(self, site: Site, *, client: SlurmAPI | None = None) -> None:
        self.site = site
        slurm = site.config.slurm
        if client is None:
            client = SlurmClient(site.slurm_transport(), timeout_s=slurm.command_timeout_s)
            if slurm.use_pyslurm and not slurm.ssh_host:  # libslurm reaches no remote cluster
                client = pyslurm_api_for(client) or client
        self.client = client
        self.python = slurm.python or sys.executable

    def _check_python(self) -> None:
        if self.site.config.slurm.ssh_host and not self.site.config.slurm.python:
            raise MTError(  # this machine's Python means nothing on the cluster's nodes
                "slurm.python is not set, and jobs submitted over SSH cannot use this machine's",
                hint="set slurm.python in site.yaml to the Python with ModelTainer on the cluster",
            )

    def _engine_host(self) -> str:
        return self.site.config.engine_host or "0.0.0.0"  # noqa: S104 - the gateway is elsewhere

    def prepare(
        self, spec: ModelSpec, *, nonce: str | None = None, started_by: str | None = None
    ) -> PreparedJob:
        """Render the script for ``spec`` (pure: `mt submit --dry-run` and `mt render`)."""
        self._check_python()
        plan = JobPlan(
            spec=spec,
            backend=self.name,
            nonce=nonce or new_nonce(),
            registry_dir=self.site.registry_dir,
            engine_host=self._engine_host(),
            started_by=started_by,
        )
        script, job = render(
            spec, plan, self.site.config.slurm, log_dir=self.site.log_dir, python=self.python
        )
        return PreparedJob(script, plan, job)

    def prepare_pool(
        self, pool: PoolSpec, catalogue: tuple[ModelSpec, ...], *, nonce: str | None = None
    ) -> PreparedJob:
        """Render a swap pool's script (pure, like :meth:`prepare`)."""
        self._check_python()
        plan = PoolPlan(
            pool=pool,
            catalogue=catalogue,
            backend=self.name,
            nonce=nonce or new_nonce(),
            registry_dir=self.site.registry_dir,
            engine_host=self._engine_host(),
        )
        script, job = render(
            pool, plan, self.site.config.slurm, log_dir=self.site.log_dir, python=self.python
        )
        return PreparedJob(script, plan, job)

    def render_pool_script(self, pool: PoolSpec, catalogue: tuple[ModelSpec, ...]) -> str:
        """The sbatch script of a swap pool; sbatch'd by hand, it still registers itself."""
        return self.prepare_pool(pool, catalogue).script

    def submit_pool(
        self, pool: PoolSpec, catalogue: tuple[ModelSpec, ...], request: JobRequest
    ) -> Submitted:
        """sbatch a swap pool: one allocation serving ``pool.models``."""
        return self._sbatch(self.prepare_pool(pool, catalogue, nonce=request.nonce))

    def render_script(self, spec: ModelSpec) -> str:
        """The sbatch script for ``spec``; sbatch'd by hand, it still registers its endpoint."""
        return self.prepare(spec).script

    def submit(self, spec: ModelSpec, request: JobRequest) -> Submitted:
        """sbatch the job (the service then creates its pending record)."""
        return self._sbatch(self.prepare(spec, nonce=request.nonce, started_by=request.started_by))

    def _sbatch(self, prepared: PreparedJob) -> Submitted:
        nonce = prepared.plan.nonce
        self.site.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            job_id = self.client.sbatch(prepared.script)
        except CommandTimeout as exc:
            # sbatch may have queued the job before timing out: find it before retrying.
            found = self._find_after_timeout(f"mt:{nonce}")
            if found is None:
                raise BackendError(
                    f"sbatch did not answer within {exc.timeout_s:g}s and no job with nonce "
                    f"{nonce} is queued: nothing was submitted",
                    argv=exc.argv,
                    hint="the scheduler is slow or down; try again in a minute (`squeue --me`)",
                ) from exc
            job_id = found
        return Submitted(
            JobHandle(self.name, job_id, nonce), log_path=prepared.job.log_path(job_id)
        )

    def _find_after_timeout(self, comment: str) -> str | None:
        for _ in range(3):
            try:
                job = self.client.find_by_comment(comment)
            except CommandTimeout:
                job = None
            if job is not None:
                return job.job_id
            time.sleep(2)
        return None

    def status(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        """One squeue for every job; sacct (if the cluster has it) for those squeue forgot."""
        ids = [h.job_id for h in handles]
        try:
            jobs = self.client.jobs(ids)
        except CommandTimeout:
            return {i: JobStatus("unknown", "squeue did not answer in time") for i in ids}
        out = {i: scheduler_status(job) for i, job in jobs.items()}
        missing = [i for i in ids if i not in out]
        if missing:
            accounted = self.client.accounting(missing) or {}
            for job_id in missing:
                job = accounted.get(job_id)
                out[job_id] = (
                    scheduler_status(job)
                    if job
                    else JobStatus("missing", "squeue no longer shows it")
                )
        return out

    def cancel(self, handle: JobHandle) -> None:
        """scancel: Slurm TERMs the wrapper, which drains, stops the engine and marks it gone."""
        self.client.scancel(handle.job_id)

    def _active(self, job_id: str) -> bool:
        """Pending or running (squeue keeps listing ended jobs until it purges them)."""
        job = self.client.jobs([job_id]).get(job_id)
        return job is not None and job.state in PENDING_STATES | RUNNING_STATES

    def logs(self, handle: JobHandle, *, follow: bool = False) -> Iterator[str]:
        """The job's output file (on the shared filesystem); with ``follow``, until it ends."""
        if not handle.log_path:
            raise BackendError(f"no log path known for job {handle.job_id}")
        path = Path(handle.log_path)
        deadline = time.monotonic() + 600
        while not path.exists():
            if not follow or not self._active(handle.job_id):
                raise BackendError(
                    f"no log file {path} yet", hint="a pending job has no log until it starts"
                )
            if time.monotonic() > deadline:
                return
            time.sleep(1)
        with path.open(encoding="utf-8", errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    yield line.rstrip("\n")
                    continue
                if not follow or not self._active(handle.job_id):
                    yield from f.read().splitlines()
                    return
                time.sleep(1)
