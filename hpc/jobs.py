"""The job service: submit → record, wait, list, cancel, and reconcile records with schedulers.

Backends make scheduler calls only; this module writes each job's ``pending`` record once the
scheduler has accepted it, and joins the registry's view of a job with the scheduler's, so
that a record is never trusted alone: ``hpc.reconcile`` is the one place that decides what
a record becomes when its job ended without finishing it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydantic import SecretStr

from hpc.backends import (
    JobHandle,
    JobRequest,
    JobStatus,
    Scheduler,
    Submitted,
    get_scheduler,
)
from hpc.chain import chain
from hpc.errors import JobNotFoundError, MTError, RegistryError
from hpc.orphan import end_orphan, wrapper_died
from hpc.permissions import InsecurePermissionsError
from hpc.reconcile import ENDED, settle
from hpc.registry import (
    FINAL_STATES,
    Record,
    Registry,
    State,
    new_api_key,
    new_nonce,
    pending_record,
    record_key,
)
from hpc.site import Site
from hpc.spec import ModelsFile, ModelSpec, PoolSpec


def handle_of(record: Record) -> JobHandle:
    """The backend handle for a record (with what its backend may need of it)."""
    return JobHandle(
        record.backend,
        record.job_id,
        record.nonce,
        node=record.node,
        log_path=record.log_path,
        engine_pid=record.engine_pid,
    )


@dataclass(frozen=True)
class JobView:
    """A job as ``mt status`` shows it: its record and what its scheduler says now."""

    record: Record
    scheduler: JobStatus

    @property
    def handle(self) -> JobHandle:
        """The handle its backend takes."""
        return handle_of(self.record)


class JobService:
    """One backend with the registry in front of it: the ``Backend`` the gateway and CLI use.

    ``submit`` writes the pending record once the scheduler has accepted the job (a failed
    submit leaves nothing behind); ``status`` moves records on with :func:`reconcile`;
    ``cancel`` waits (up to ``cancel_wait_s``) for the job's wrapper to finish its record,
    and finishes it itself if the job ended without doing so.
    """

    def __init__(self, site: Site, scheduler: Scheduler, *, cancel_wait_s: float = 60.0) -> None:
        self.site = site
        self.scheduler = scheduler
        self.name = scheduler.name
        self.registry = Registry(site.registry_dir)
        self.cancel_wait_s = cancel_wait_s

    def _submitted(
        self,
        submitted: Submitted,
        request: JobRequest,
        *,
        model: str,
        engine: str,
        serves: tuple[str, ...] = (),
    ) -> JobHandle:
        record = pending_record(
            self.name,
            submitted.handle.job_id,
            request.nonce,
            model=model,
            engine=engine,
            log_path=submitted.log_path,
            started_by=request.started_by,
        )
        update = {"api_key": request.api_key, "serves": serves}
        if submitted.node is not None:  # where it will listen; routable only once ready
            update |= {"node": submitted.node, "port": submitted.port}
        # create, not write: a job that started early has written its own, newer record.
        try:
            self.registry.create(record.model_copy(update=update))
        except (RegistryError, InsecurePermissionsError) as exc:
            # A job nobody can find must not run: cancel it, then say why.
            with contextlib.suppress(MTError):
                self.scheduler.cancel(submitted.handle)
            cancelled = f"{exc.message}; job {record.key} was cancelled, nothing is left running"
            if isinstance(exc, InsecurePermissionsError):  # its hint is the chmod that fixes it
                raise RegistryError(cancelled, path=exc.path, hint=exc.hint) from exc
            raise RegistryError(
                cancelled,
                path=exc.path,
                hint="free space on the registry's filesystem (or fix its permissions), "
                "then submit again",
            ) from exc
        return submitted.handle

    def submit(self, spec: ModelSpec, *, started_by: str | None = None) -> JobHandle:
        """Start a job that serves ``spec``, then write its pending record."""
        request = _request(started_by)
        self.registry.ensure()
        submitted = self.scheduler.submit(spec, request)
        return self._submitted(submitted, request, model=spec.name, engine=spec.engine)

    def submit_pool(self, pool: PoolSpec, catalogue: tuple[ModelSpec, ...]) -> JobHandle:
        """Start swap pool ``pool`` as one job, then write its pending record."""
        if not self.scheduler.capabilities.pools:
            raise MTError(
                f"the {self.name} backend cannot run swap pools (it starts one engine per "
                "Deployment)",
                hint="run the pool with --backend slurm or --backend local",
            )
        request = _request(None)
        self.registry.ensure()
        submitted = self.scheduler.submit_pool(pool, catalogue, request)
        return self._submitted(
            submitted, request, model=pool.name, engine="pool", serves=pool.models
        )

    def render_script(self, spec: ModelSpec) -> str:
        """The job script the backend would submit for ``spec`` (Slurm's sbatch script)."""
        self._need_scripts()
        return self.scheduler.render_script(spec)

    def render_pool_script(self, pool: PoolSpec, catalogue: tuple[ModelSpec, ...]) -> str:
        """The job script of swap pool ``pool``."""
        self._need_scripts(pools=True)
        return self.scheduler.render_pool_script(pool, catalogue)

    def _need_scripts(self, *, pools: bool = False) -> None:
        can = self.scheduler.capabilities
        if not can.scripts or (pools and not can.pools):
            raise MTError(
                f"the {self.name} backend has no job script to show",
                hint="--dry-run and mt render work with --backend slurm",
            )

    def status(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        """The scheduler's state of each job (one call), each record reconciled with it.

        With a backend that does not clean up after its jobs (local), a record whose wrapper
        died on this host is ended first (``hpc.orphan``): its engine stopped, the record
        ``failed`` with why. A scheduler that does (Slurm) is believed instead: the job ended
        (:func:`reconcile` ends the record) or was requeued (the next run's record).
        """
        records = {h.job_id: self.registry.read(record_key(self.name, h.job_id)) for h in handles}
        asked = [
            handle_of(record) if (record := records[h.job_id]) is not None else h for h in handles
        ]
        asked_at = time.time()
        statuses = self.scheduler.status(asked)
        for job_id, stored in records.items():
            status = statuses.get(job_id)
            if stored is None:
                continue
            current = stored
            if not self.scheduler.capabilities.cleans_up and wrapper_died(stored):
                current = end_orphan(self.registry, stored)
            if status is not None:
                self.settle(current, status, asked_at=asked_at)
        return statuses

    def settle(
        self,
        record: Record,
        status: JobStatus,
        *,
        cancelled: bool = False,
        asked_at: float | None = None,
    ) -> Record:
        """Write :func:`reconcile`'s answer for ``record``; see :func:`settle`."""
        return settle(self.registry, record, status, cancelled=cancelled, asked_at=asked_at)

    def cancel(self, handle: JobHandle) -> None:
        """Stop the job; return once its record is final (finished here if the job could not)."""
        key = record_key(self.name, handle.job_id)
        record = self.registry.read(key)
        handle = handle_of(record) if record is not None else handle
        self.scheduler.cancel(handle)
        deadline = time.monotonic() + self.cancel_wait_s
        status = JobStatus("unknown")
        while time.monotonic() < deadline:
            record = self.registry.read(key)
            if record is None or record.state in FINAL_STATES:
                return
            status = self.scheduler.status([handle]).get(handle.job_id, status)
            if status.state in ENDED:
                break  # the job ended but never finished its record (killed, or never ran)
            time.sleep(0.5)
        record = self.registry.read(key)
        if record is not None:
            self.settle(record, status, cancelled=True)

    def withdraw(self, handle: JobHandle) -> None:
        """Cancel a job that never ran (still pending) and remove its record: nothing is left.

        A job that started meanwhile is cancelled the usual way (its record ends ``gone``)."""
        key = record_key(self.name, handle.job_id)
        record = self.registry.read(key)
        if record is not None and record.state != "pending":
            self.cancel(handle)
            return
        self.scheduler.cancel(handle_of(record) if record is not None else handle)
        # Only while still pending (under its lock): a wrapper that claimed it meanwhile
        # keeps its record, and is cancelled the usual way.
        pending: tuple[State, ...] = ("pending",)
        if not self.registry.remove(key, states=pending) and self.registry.read(key):
            self.cancel(handle)

    def logs(self, handle: JobHandle, *, follow: bool = False) -> Iterator[str]:
        """The job's log lines; with ``follow``, until the job ends."""
        record = self.registry.read(record_key(self.name, handle.job_id))
        return self.scheduler.logs(handle_of(record) if record else handle, follow=follow)


def _request(started_by: str | None) -> JobRequest:
    return JobRequest(new_nonce(), SecretStr(new_api_key()), started_by)


def service(site: Site, backend_name: str | None = None) -> JobService:
    """The job service for the named backend (the site's default if None)."""
    return JobService(site, get_scheduler(backend_name or site.config.default_backend, site))


def submit(site: Site, spec: ModelSpec, backend_name: str | None = None) -> JobHandle:
    """Submit ``spec`` to the named backend (the site's default if None)."""
    return service(site, backend_name).submit(spec)


def render_script(site: Site, spec: ModelSpec, backend_name: str | None = None) -> str:
    """The job script the backend would submit for ``spec`` (Slurm's sbatch script)."""
    return service(site, backend_name).render_script(spec)


def submit_pool(
    site: Site, models: ModelsFile, pool: PoolSpec, backend_name: str | None = None
) -> JobHandle:
    """Submit swap pool ``pool`` (its catalogue taken from ``models``) as one job."""
    return service(site, backend_name).submit_pool(pool, models.catalogue(pool))


def render_pool_script(
    site: Site, models: ModelsFile, pool: PoolSpec, backend_name: str | None = None
) -> str:
    """The sbatch script of swap pool ``pool``."""
    return service(site, backend_name).render_pool_script(pool, models.catalogue(pool))


def job_views(site: Site, *, include_final: bool = True) -> list[JobView]:
    """Every record joined with its scheduler's state (one status call per backend).

    Asking reconciles each record (:func:`reconcile`): one whose job the scheduler no
    longer runs is finished, so that nothing routes to it again.
    """
    registry = Registry(site.registry_dir)
    # Leftovers of writers killed mid-write (tmp files, stale locks): one directory listing.
    registry.clean_tmp()
    by_backend: dict[str, list[Record]] = {}
    for record in registry.records():
        by_backend.setdefault(record.backend, []).append(record)
    views: list[JobView] = []
    for name, group in by_backend.items():
        jobs: JobService | None
        try:
            jobs = service(site, name)
        except MTError:
            jobs = None
        statuses = jobs.status([handle_of(r) for r in group]) if jobs else {}
        for listed in group:
            unknown = JobStatus("unknown", f"backend {name} unavailable")
            views.append(
                JobView(registry.read(listed.key) or listed, statuses.get(listed.job_id, unknown))
            )
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


def cancel_model(site: Site, model: str) -> list[Record]:
    """Cancel every job of ``model`` that has not ended, each with its chain (as
    :func:`cancel`): `mt cancel NAME` ends a handover chain without looking its current job
    up first. JobNotFoundError if the model has no such job."""
    registry = Registry(site.registry_dir)
    live = [r for r in registry.records() if r.model == model and r.state not in FINAL_STATES]
    if not live:
        raise JobNotFoundError(model)
    return [cancel(site, r.key) for r in live]


def cancel(site: Site, job: str) -> Record:
    """Cancel a job by id or key, and the rest of its handover chain (hpc.chain: the jobs
    it took over from and handed over to, pending or running); returns its record afterwards.

    Each job's chain is read again after it ended: a wrapper records its successor only
    while its own record is not final, so a successor submitted meanwhile is found here,
    or cancelled by that wrapper itself (hpc.job.handover).
    """
    record = find_record(site, job)
    jobs = service(site, record.backend)
    in_chain = record.predecessor is not None or record.successor is not None
    if not (in_chain and record.state in FINAL_STATES):  # a chain's ended head: the rest
        jobs.cancel(handle_of(record))
    done = {record.job_id}
    while True:
        current = jobs.registry.read(record.key) or record
        todo = [link for link in chain(jobs.registry, current) if link.job_id not in done]
        if not todo:
            return current
        for link in todo:
            done.add(link.job_id)
            if link.record is None:  # submitted, its pending record not written yet
                jobs.cancel(JobHandle(record.backend, link.job_id, ""))
            elif link.record.state not in FINAL_STATES:
                jobs.cancel(handle_of(link.record))
