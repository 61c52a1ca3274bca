"""Job operations the CLI (and later the gateway) call: submit, wait, list, cancel.

Each joins the registry's view of a job with the scheduler's, so that a record is never
trusted alone: a record that says ``ready`` for a job the scheduler no longer has is stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from hpc.backends import (
    Backend,
    JobHandle,
    JobStatus,
    PoolBackend,
    ScriptBackend,
    get_backend,
)
from hpc.backends.slurm import SlurmBackend
from hpc.errors import JobNotFoundError, MTError
from hpc.registry import FINAL_STATES, Record, Registry, record_key
from hpc.site import Site
from hpc.spec import ModelsFile, ModelSpec, PoolSpec

# Scheduler states that mean the job no longer runs.
_ENDED = ("done", "failed", "cancelled", "missing")


@dataclass(frozen=True)
class JobView:
    """A job as ``mt status`` shows it: its record and what its scheduler says now."""

    record: Record
    scheduler: JobStatus

    @property
    def handle(self) -> JobHandle:
        """The handle its backend takes."""
        return handle_of(self.record)


def handle_of(record: Record) -> JobHandle:
    """The backend handle for a record."""
    return JobHandle(record.backend, record.job_id, record.nonce)


def submit(site: Site, spec: ModelSpec, backend_name: str | None = None) -> JobHandle:
    """Submit ``spec`` to the named backend (the site's default if None)."""
    backend = get_backend(backend_name or site.config.default_backend, site)
    return backend.submit(spec)


def render_script(site: Site, spec: ModelSpec, backend_name: str | None = None) -> str:
    """The job script the backend would submit for ``spec`` (Slurm's sbatch script)."""
    name = backend_name or site.config.default_backend
    backend = get_backend(name, site)
    if not isinstance(backend, ScriptBackend):
        raise MTError(
            f"the {name} backend has no job script to show",
            hint="--dry-run and mt render work with --backend slurm",
        )
    return backend.render_script(spec)


def submit_pool(
    site: Site, models: ModelsFile, pool: PoolSpec, backend_name: str | None = None
) -> JobHandle:
    """Submit swap pool ``pool`` (its catalogue taken from ``models``) as one job."""
    name = backend_name or site.config.default_backend
    backend = get_backend(name, site)
    if not isinstance(backend, PoolBackend):
        raise MTError(
            f"the {name} backend cannot run swap pools (it starts one engine per Deployment)",
            hint="run the pool with --backend slurm or --backend local",
        )
    return backend.submit_pool(pool, models.catalogue(pool))


def render_pool_script(
    site: Site, models: ModelsFile, pool: PoolSpec, backend_name: str | None = None
) -> str:
    """The sbatch script of swap pool ``pool``."""
    name = backend_name or site.config.default_backend
    backend = get_backend(name, site)
    if not isinstance(backend, SlurmBackend):
        raise MTError(
            f"the {name} backend has no job script to show",
            hint="--dry-run and mt render work with --backend slurm",
        )
    return backend.render_pool_script(pool, models.catalogue(pool))


class WaitFailed(MTError):
    """A job being waited for ended before it was ready."""

    def __init__(self, record: Record) -> None:
        tail = "\n".join(f"  | {line}" for line in record.log_tail[-15:])
        message = f"job {record.key} is {record.state}: {record.reason or 'no reason recorded'}"
        super().__init__(
            message + (f"\nlast log lines:\n{tail}" if tail else ""),
            hint=f"full log: mt logs {record.key}",
        )
        self.record = record


def wait_ready(
    site: Site,
    handle: JobHandle,
    *,
    timeout_s: float | None = None,
    poll_s: float = 0.2,
    scheduler_every_s: float = 3.0,
    on_poll: Callable[[Record | None, JobStatus], None] | None = None,
) -> Record:
    """Block until the job's record is ``ready``; raise WaitFailed if it ends first.

    The record (a small local file) is read every ``poll_s``; the scheduler is asked only
    every ``scheduler_every_s``, since squeue every fraction of a second loads a busy
    controller. ``on_poll`` gets the record and scheduler status at every poll, so a CLI can
    show progress and elapsed time; the library itself prints nothing.
    """
    registry = Registry(site.registry_dir)
    backend = get_backend(handle.backend, site)
    key = record_key(handle.backend, handle.job_id)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    status = JobStatus("unknown")
    asked_at: float | None = None
    while True:
        record = registry.read(key)
        if asked_at is None or time.monotonic() - asked_at >= scheduler_every_s:
            status = backend.status([handle]).get(handle.job_id, JobStatus("unknown"))
            asked_at = time.monotonic()
        if on_poll is not None:
            on_poll(record, status)
        if record is not None and record.state == "ready":
            return record
        if record is not None and record.state in FINAL_STATES:
            raise WaitFailed(record)
        if status.state in _ENDED:
            # The job ended without finishing its record: re-read once (it may just have).
            record = registry.read(key)
            if record is not None and record.state == "ready":
                return record
            if record is not None:
                record = registry.update(
                    key, state="failed", reason=record.reason or f"job ended ({status.state})"
                )
                raise WaitFailed(record)
            raise MTError(f"job {handle.job_id} ended ({status.state}) without a record")
        if deadline is not None and time.monotonic() > deadline:
            raise MTError(
                f"job {key} not ready after {timeout_s:g}s "
                f"(record: {record.state if record else 'none'}, scheduler: {status.state})",
                hint=f"it keeps running: `mt logs -f {key}` follows it, `mt cancel {key}` stops it",
            )
        time.sleep(poll_s)


def job_views(site: Site, *, include_final: bool = True) -> list[JobView]:
    """Every record joined with its scheduler's state (one status call per backend).

    A record that is not final but whose job the scheduler no longer runs is stale: it is
    marked ``gone`` so that nothing routes to it again.
    """
    registry = Registry(site.registry_dir)
    records = registry.records()
    by_backend: dict[str, list[Record]] = {}
    for record in records:
        by_backend.setdefault(record.backend, []).append(record)
    views: list[JobView] = []
    for name, group in by_backend.items():
        backend: Backend | None
        try:
            backend = get_backend(name, site)
        except MTError:
            backend = None
        statuses = backend.status([handle_of(r) for r in group]) if backend else {}
        for listed in group:
            unknown = JobStatus("unknown", f"backend {name} unavailable")
            status = statuses.get(listed.job_id, unknown)
            # A backend whose jobs run no wrapper (Kubernetes) moves records on in status().
            stored = registry.read(listed.key) or listed
            record = stored
            if stored.state not in FINAL_STATES and status.state in _ENDED:
                reason = f"stale: scheduler says {status.state}"
                record = registry.update(stored.key, state="gone", reason=reason)
            views.append(JobView(record, status))
    views.sort(key=lambda v: v.record.created_at)
    if not include_final:
        views = [v for v in views if v.record.state not in FINAL_STATES]
    return views


def find_record(site: Site, job: str) -> Record:
    """The record for a job id or key; JobNotFoundError if there is none."""
    record = Registry(site.registry_dir).find(job)
    if record is None:
        raise JobNotFoundError(job)
    return record


def cancel(site: Site, job: str) -> Record:
    """Cancel a job by id or key; returns its record afterwards."""
    record = find_record(site, job)
    get_backend(record.backend, site).cancel(handle_of(record))
    return Registry(site.registry_dir).read(record.key) or record
