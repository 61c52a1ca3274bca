"""The Scheduler Protocol every backend implements, and the values it passes around.

A backend makes scheduler calls only: it starts, asks about, stops and reads the log of
jobs. The job service (hpc.jobs) writes and reconciles the registry records around those
calls, and shows the gateway and the CLI the :class:`Backend` face.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import SecretStr

from hpc.spec import ModelSpec, PoolSpec

# What the scheduler says of a job, independent of what the registry record says.
SchedulerState = Literal["pending", "running", "done", "failed", "cancelled", "missing", "unknown"]


@dataclass(frozen=True)
class JobHandle:
    """Enough to find a job again: the backend that runs it, its id there, its nonce.

    The optional fields come from the job's record (the service fills them in) for the
    backends that need them: where the job listens (a Kubernetes Service's DNS name names
    its namespace), its log file, its engine's pid (to stop an orphaned engine).
    """

    backend: str
    job_id: str
    nonce: str
    node: str | None = field(default=None, compare=False)
    log_path: str | None = field(default=None, compare=False)
    engine_pid: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class JobStatus:
    """The scheduler's view of one job; ``reason`` explains a pending or failed state.

    ``serving`` is set only by a backend whose jobs run no wrapper to write their record
    (Kubernetes): what the scheduler says of the server itself, ``starting`` or ``ready``.
    """

    state: SchedulerState
    reason: str = ""
    serving: Literal["starting", "ready"] | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the four calls every backend has."""

    scripts: bool = False  # shows the job it would submit (`mt submit --dry-run`, `mt render`)
    pools: bool = False  # runs a swap pool as one job
    # Ends every process of a job that ended (Slurm's cgroup, a pod). Without it (the local
    # backend) a job is its wrapper process, and a wrapper killed with -9 leaves its engine
    # and its record to whoever looks next (``hpc.orphan``). With it, a wrapper's death is
    # the job's end as the scheduler reports it, or a requeue: the scheduler's word decides.
    cleans_up: bool = True


@dataclass(frozen=True)
class JobRequest:
    """What the service chose for a new job before the scheduler sees it."""

    nonce: str
    api_key: SecretStr  # the per-job key; a backend with no wrapper puts it in the job
    started_by: str | None = None


@dataclass(frozen=True)
class Submitted:
    """A job the scheduler accepted, and what its first record should say of it."""

    handle: JobHandle
    log_path: str | None = None
    node: str | None = None  # where it will listen, if known before it starts
    port: int | None = None


class Scheduler(Protocol):
    """Scheduler calls for one kind of scheduler; registered by name in hpc.backends.

    ``status`` takes many handles and asks the scheduler once (one ``squeue`` for 200 jobs,
    not 200). A ``missing`` job no longer exists; ``unknown`` means the scheduler did not
    answer in time, which is not failure. ``capabilities`` says which of the optional calls
    (scripts, pools) work; the others raise.
    """

    name: str
    capabilities: Capabilities

    def submit(self, spec: ModelSpec, request: JobRequest) -> Submitted:
        """Start a job that serves ``spec``; returns once the scheduler has accepted it."""
        ...

    def submit_pool(
        self, pool: PoolSpec, catalogue: tuple[ModelSpec, ...], request: JobRequest
    ) -> Submitted:
        """Start one job that serves ``pool``'s catalogue (``capabilities.pools``)."""
        ...

    def render_script(self, spec: ModelSpec) -> str:
        """The exact job ``submit`` would hand the scheduler (``capabilities.scripts``)."""
        ...

    def render_pool_script(self, pool: PoolSpec, catalogue: tuple[ModelSpec, ...]) -> str:
        """The job ``submit_pool`` would hand the scheduler (scripts and pools)."""
        ...

    def status(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        """The scheduler's state of each job, keyed by job id, in one scheduler call."""
        ...

    def cancel(self, handle: JobHandle) -> None:
        """Ask the scheduler to stop the job (its wrapper drains it); does not wait for it."""
        ...

    def logs(self, handle: JobHandle, *, follow: bool = False) -> Iterator[str]:
        """The job's log lines; with ``follow``, keep yielding until the job ends."""
        ...


class Backend(Protocol):
    """A backend as the gateway and the CLI use it: the job service in front of a scheduler.

    ``submit`` writes the job's ``pending`` record only once the scheduler has accepted
    it, so a failed submit leaves nothing behind; ``status`` also moves records on
    (hpc.reconcile); ``cancel`` returns once the record is final.
    """

    name: str

    def submit(self, spec: ModelSpec, *, started_by: str | None = None) -> JobHandle:
        """Start a job that serves ``spec``; returns once the scheduler has accepted it.

        ``started_by`` (who submits it, and why) goes into the job's record from its first
        version on, so no later write races the job wrapper's own.
        """
        ...

    def status(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        """The scheduler's state of each job, keyed by job id, in one scheduler call."""
        ...

    def cancel(self, handle: JobHandle) -> None:
        """Stop the job; its wrapper drains it and the record ends ``gone``."""
        ...

    def logs(self, handle: JobHandle, *, follow: bool = False) -> Iterator[str]:
        """The job's log lines; with ``follow``, keep yielding until the job ends."""
        ...
