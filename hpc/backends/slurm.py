"""The Slurm backend: a model spec becomes an sbatch script that runs the job wrapper.

Submit renders the script (hpc.slurm.sbatch) and runs ``sbatch --parsable``; the job service
then creates the job's ``pending`` record unless the job, already running, has written its
own. If sbatch's outcome is unknown (it timed out, or it lost the controller: "Socket timed
out on send/recv operation" and the like, after which the job may still be queued), the job
is looked up by its nonce (``--comment=mt:<nonce>``) for up to twice the controller's
MessageTimeout before anything is reported or resubmitted, so one submit never makes two
jobs. Status asks squeue once
for all jobs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpc.backends.base import Capabilities, JobHandle, JobRequest, JobStatus, Submitted
from hpc.errors import BackendError, ConfigError, ConfigIssue, MTError, SlurmError
from hpc.job.multinode import check_nodes, check_pool_nodes
from hpc.job.plan import JobPlan, PoolPlan, warning_drain_s
from hpc.llamacppserver import server_for, server_for_pool
from hpc.privatefile import make_private_dir
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
    is_transport_error,
)
from hpc.slurm.pyslurm import pyslurm_api_for
from hpc.slurm.sbatch import SbatchJob, render
from hpc.spec import ModelSpec, PoolSpec
from hpc.transport import CommandTimeout

# The shortest look for a job whose sbatch had an unknown outcome (Slurm's default
# MessageTimeout is 10 s), and how often squeue is asked meanwhile.
_MIN_LOOKUP_S = 30.0
_LOOKUP_POLL_S = 2.0


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
        # Nor do this machine's paths: a job script that names them would register nowhere.
        elsewhere = self.site.paths_elsewhere()
        if elsewhere:
            path = self.site.file
            raise ConfigError(
                path,
                [
                    ConfigIssue(path, None, setting, f"{why}, which the cluster does not see")
                    for setting, why in elsewhere
                ],
                hint=f"let the login node write the job: `mt --host "
                f"{self.site.config.slurm.ssh_host} submit MODEL` runs mt there with its own "
                f"site.yaml; or set {' and '.join(s for s, _ in elsewhere)} in {path} to "
                "absolute paths on the cluster's shared filesystem",
            )

    def _here(self) -> bool:
        """Whether this machine's PATH and home are what the nodes see (no ``ssh_host``)."""
        return not self.site.config.slurm.ssh_host

    def _engine_host(self) -> str:
        return self.site.config.engine_host or "0.0.0.0"  # noqa: S104 - the gateway is elsewhere

    def prepare(
        self, spec: ModelSpec, *, nonce: str | None = None, started_by: str | None = None
    ) -> PreparedJob:
        """Render the script for ``spec`` (pure: `mt submit --dry-run` and `mt render`)."""
        self._check_python()
        check_nodes(spec)  # a multi-node spec that cannot start on every node is refused here
        plan = JobPlan(
            spec=spec,
            backend=self.name,
            nonce=nonce or new_nonce(),
            registry_dir=self.site.registry_dir,
            engine_host=self._engine_host(),
            started_by=started_by,
            drain_s=spec.drain_s,
            staging=self.site.config.staging.for_weights(spec.weights),
            warning_drain_s=warning_drain_s(spec.slurm.signal_grace_s),
            llamacpp=server_for(
                (spec,), self.site.config.llamacpp.server, os.environ, here=self._here()
            ),
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
        check_pool_nodes(pool)
        plan = PoolPlan(
            pool=pool,
            catalogue=catalogue,
            backend=self.name,
            nonce=nonce or new_nonce(),
            registry_dir=self.site.registry_dir,
            engine_host=self._engine_host(),
            drain_s=pool.drain_s,
            warning_drain_s=warning_drain_s(pool.slurm.signal_grace_s),
            llamacpp=server_for_pool(
                pool, catalogue, self.site.config.llamacpp.server, os.environ, here=self._here()
            ),
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
        make_private_dir(self.site.log_dir)  # a new MT_HOME too: 0700
        try:
            job_id = self.client.sbatch(prepared.script)
        except CommandTimeout as exc:
            what = f"sbatch did not answer within {exc.timeout_s:g}s"
            job_id = self._find_unknown(nonce, what, exc.argv, exc)
        except SlurmError as exc:
            if not is_transport_error(exc.stderr or ""):
                raise
            # sbatch lost the controller mid-call; it may have queued the job all the same.
            what = f"sbatch failed ({exc.message.removeprefix('sbatch failed: ')})"
            job_id = self._find_unknown(nonce, what, exc.argv, exc)
        return Submitted(
            JobHandle(self.name, job_id, nonce), log_path=prepared.job.log_path(job_id)
        )

    def _find_unknown(self, nonce: str, what: str, argv: list[str] | None, exc: Exception) -> str:
        """The id of the job an sbatch of unknown outcome queued, found by its nonce before
        anything is reported or resubmitted; BackendError if none appears in the window."""
        window_s = self.lookup_window_s()
        found = self._find_by_nonce(f"mt:{nonce}", window_s)
        if found is None:
            raise BackendError(
                f"{what}, and no job with nonce {nonce} appeared in squeue within "
                f"{window_s:g}s: nothing was submitted",
                argv=argv,
                hint="the Slurm controller is slow or down; check `squeue --me`, then submit "
                "again (slurm.submit_lookup_s in site.yaml sets how long mt looks)",
            ) from exc
        return found

    def lookup_window_s(self) -> float:
        """How long to look for a job whose sbatch had an unknown outcome: site.yaml's
        ``slurm.submit_lookup_s``, else twice the controller's MessageTimeout (the longest a
        queued job can take to show), at least ``_MIN_LOOKUP_S``."""
        configured = self.site.config.slurm.submit_lookup_s
        if configured is not None:
            return configured
        message_s = self.client.message_timeout_s() or 0.0
        return max(_MIN_LOOKUP_S, 2 * message_s)

    def _find_by_nonce(self, comment: str, window_s: float) -> str | None:
        deadline = time.monotonic() + window_s
        while True:
            try:
                job = self.client.find_by_comment(comment)
            except (CommandTimeout, SlurmError):
                job = None  # the controller is still away: keep looking until the deadline
            if job is not None:
                return job.job_id
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(_LOOKUP_POLL_S, left))

    def status(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        """One squeue for every job; sacct (if the cluster has it) for those squeue forgot."""
        ids = [h.job_id for h in handles]
        try:
            jobs = self.client.jobs(ids)
        except CommandTimeout:
            return {i: JobStatus("unknown", "squeue did not answer in time") for i in ids}
        except SlurmError as exc:
            # The controller is down or unreachable: these jobs' state is unknown, which is
            # not failure, and says nothing about the other backends' jobs.
            return {i: JobStatus("unknown", exc.message) for i in ids}
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
