"""The Backend Protocol every scheduler adapter implements, and the values it passes around."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from hpc.spec import ModelSpec, PoolSpec

# What the scheduler says of a job, independent of what the registry record says.
SchedulerState = Literal["pending", "running", "done", "failed", "cancelled", "missing", "unknown"]


@dataclass(frozen=True)
class JobHandle:
    """Enough to find a job again: the backend that runs it, its id there, its nonce."""

    backend: str
    job_id: str
    nonce: str


@dataclass(frozen=True)
class JobStatus:
    """The scheduler's view of one job; ``reason`` explains a pending or failed state."""

    state: SchedulerState
    reason: str = ""


class Backend(Protocol):
    """Submits model jobs to one kind of scheduler.

    ``submit`` writes the job's ``pending`` record only once the scheduler has accepted it,
    so a failed submit leaves nothing behind. ``status`` takes many handles and asks the
    scheduler once (one ``squeue`` for 200 jobs, not 200). A ``missing`` job no longer
    exists; ``unknown`` means the scheduler did not answer in time, which is not failure.
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
        """Stop the job; its wrapper drains it and marks the record ``gone``."""
        ...

    def logs(self, handle: JobHandle, *, follow: bool = False) -> Iterator[str]:
        """The job's log lines; with ``follow``, keep yielding until the job ends."""
        ...


@runtime_checkable
class ScriptBackend(Protocol):
    """A backend whose jobs are scripts users can read and submit themselves (Slurm)."""

    def render_script(self, spec: ModelSpec) -> str:
        """The exact script ``submit`` would hand the scheduler (with a fresh nonce)."""
        ...


@runtime_checkable
class PoolBackend(Protocol):
    """A backend that can run a swap pool (``python -m hpc.job.swappool``) as one job."""

    def submit_pool(self, pool: PoolSpec, catalogue: tuple[ModelSpec, ...]) -> JobHandle:
        """Start one job that serves ``pool``'s catalogue, swapping models in its slots."""
        ...
