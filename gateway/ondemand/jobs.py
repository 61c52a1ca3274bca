"""What the on-demand controller knows of one model and of the jobs it started for it.

Plain data, changed only on the event loop: the controller owns it, the waiting requests
read it, and the state file (``statefile``) publishes it for `mt pool status`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.routes import Upstream
from hpc.backends import JobHandle, JobStatus
from hpc.reconcile import ENDED
from hpc.registry import FINAL_STATES, Record

# ``Record.started_by`` of every job the gateway started on demand begins with this; the
# gateway cancels no job whose record does not (and finds its own again after a restart).
STARTED_BY = "gateway on demand"
_KEY_IN_WHY = re.compile(r"\(key ([^)]*)\)$")
# Ended jobs whose routes are skipped; the route table drops them within a reload or two.
_RETIRED_KEPT = 64


@dataclass(frozen=True, slots=True)
class Asker:
    """Who asks for a model: the request, and the key it came with (for its job limit)."""

    request_id: str
    client: str | None = None  # the key's name
    max_jobs: int | None = None  # the key's max_on_demand_jobs


def started_by(request_id: str, model: str, client: str | None, load: str | None = None) -> str:
    """Why a job was started: ``gateway on demand: request <id> for <model> (key <name>)``,
    or for an extra replica ``gateway on demand: scale out, <load>: request …``."""
    scale = f"scale out, {load}: " if load else ""
    return f"{STARTED_BY}: {scale}request {request_id} for {model} (key {client or '-'})"


def client_of(why: str) -> str | None:
    """The key name in a ``started_by`` text (None for a request without a key)."""
    found = _KEY_IN_WHY.search(why)
    name = found.group(1) if found else "-"
    return None if name == "-" else name


def is_own(record: Record) -> bool:
    """True if the gateway started this record's job on demand."""
    return bool(record.started_by) and str(record.started_by).startswith(STARTED_BY)


@dataclass
class OwnJob:
    """A job the gateway started on demand, with the last record and status it saw."""

    key: str
    handle: JobHandle
    started_at: float
    why: str
    client: str | None
    record: Record | None = None
    scheduler: JobStatus | None = None
    stopping: bool = False  # being cancelled: routed to no more
    # When a request routed to it last ended, or when it became ready: an extra replica
    # idle for the model's idle_ttl_s since then is cancelled.
    used_at: float = 0.0
    failure_told: bool = False  # its failed start was told to the waiters
    served: bool = False  # it was ready once: its failure later is no failed start

    def __post_init__(self) -> None:
        self.used_at = self.used_at or self.started_at

    def observe(self, record: Record | None, status: JobStatus | None) -> tuple[bool, bool]:
        """Take one round's record and scheduler answer: (a failed start to tell, ended).

        A start that failed is told once, at once. The job has ended only when its scheduler
        agrees: a requeued job's old run may write ``gone`` while the job completes, before
        the job service makes the record the next run's ``pending`` (a job retired then
        would be started a second time).
        """
        was_ready = self.ready
        self.record = record or self.record
        if status is not None:
            self.scheduler = status
        if self.ready and not was_ready:
            self.used_at = time.time()  # an extra replica's idle clock starts when ready
        self.served = self.served or was_ready or self.ready
        failed_start = (
            not self.served
            and not self.failure_told
            and not self.stopping
            and self.record is not None
            and self.record.state == "failed"
        )
        self.failure_told = self.failure_told or failed_start
        ended = self.ended and not self.stopping and status is not None and status.state in ENDED
        return failed_start, ended

    @property
    def ready(self) -> bool:
        """Its record is ``ready`` with a URL, and it is not being cancelled."""
        record = self.record
        return (
            not self.stopping
            and record is not None
            and record.state == "ready"
            and bool(record.base_url)
        )

    @property
    def ended(self) -> bool:
        """Its record is final (``gone`` or ``failed``)."""
        return self.record is not None and self.record.state in FINAL_STATES

    @property
    def over(self) -> bool:
        """Its record is final and its scheduler, when last asked, agreed (or was never
        asked): a job whose old run wrote ``gone`` while the scheduler requeues it is not
        over, and no second job is started for its model meanwhile."""
        scheduler = self.scheduler
        return self.ended and (scheduler is None or scheduler.state in ENDED)

    def phase(self) -> str:
        """What a waiting client is told: ``pending (Priority)``, ``starting``, ``ready``."""
        if self.stopping:
            return "stopping"
        record = self.record
        if record is None:
            return "submitted"
        if record.state == "pending":
            reason = self.scheduler.reason if self.scheduler is not None else ""
            return f"pending ({reason})" if reason and reason != "pending" else "pending"
        return record.state

    def upstream(self) -> Upstream | None:
        """Where to send requests, once it is ready."""
        record = self.record
        if not self.ready or record is None or record.base_url is None:
            return None
        return Upstream.of_job(record)


@dataclass
class ModelState:
    """One on-demand model: its jobs, the start in flight, the last failure, the waiters."""

    name: str
    idle_ttl_s: float
    last_request_at: float | None = None
    in_flight: int = 0  # requests being waited for or proxied
    # Ready replicas of the model it did not start (``mt submit``), as the last request saw.
    others: int = 0
    # The latest request: the monitor's scale-out (for load that stays) is on its behalf.
    last_request: Asker | None = None
    jobs: dict[str, OwnJob] = field(default_factory=dict)
    submitting: asyncio.Task[None] | None = None
    failure: str | None = None
    failure_until: float = 0.0  # loop time until which the failure is reported, not retried
    failed_at: float | None = None
    last_start_s: float | None = None  # submit to ready, of the last job that became ready
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Jobs it cancelled or saw end: the route table lists them until its next reload.
    retired: dict[str, None] = field(default_factory=dict)  # an ordered set

    def notify(self) -> None:
        """Wake every request waiting on this model (each then re-reads the state)."""
        self.changed.set()
        self.changed = asyncio.Event()

    def live(self) -> list[OwnJob]:
        """Jobs not over (:attr:`OwnJob.over`) and not being cancelled."""
        return [job for job in self.jobs.values() if not job.stopping and not job.over]

    def upstreams(self) -> tuple[Upstream, ...]:
        """The ready jobs' endpoints (the route table may not list them yet)."""
        found = (job.upstream() for job in self.jobs.values())
        return tuple(upstream for upstream in found if upstream is not None)

    def unroutable(self) -> frozenset[str]:
        """Record keys of jobs being cancelled or ended (routes to them are skipped)."""
        stopping = {job.key for job in self.jobs.values() if job.stopping}
        return frozenset(stopping | self.retired.keys())

    def retire(self, key: str) -> None:
        """Forget a job that ended or was cancelled, and route to it no more."""
        self.jobs.pop(key, None)
        self.retired[key] = None
        while len(self.retired) > _RETIRED_KEPT:  # the oldest left the route table long ago
            del self.retired[next(iter(self.retired))]

    def ready_with(self, candidates: tuple[Upstream, ...]) -> tuple[Upstream, ...]:
        """The route table's replicas (less those being cancelled) and the model's own ready
        jobs the table does not list yet (a new replica joins at once)."""
        skip = self.unroutable()
        ready = [c for c in candidates if c.source not in skip]
        self.others = sum(1 for c in ready if c.source not in self.jobs)
        listed = {c.source for c in ready}
        return (*ready, *(u for u in self.upstreams() if u.source not in listed))

    def idle_extra(
        self, live: list[OwnJob], now: float, model_idle: bool, outstanding: Callable[[str], int]
    ) -> OwnJob | None:
        """The most recently started replica beyond the oldest that is idle: ready with no
        request for the TTL and none in flight to it, or not ready and the model idle."""
        for job in sorted(live, key=lambda job: job.started_at, reverse=True)[:-1]:
            if job.ready:
                if not outstanding(job.key) and now - job.used_at >= self.idle_ttl_s:
                    return job
            elif model_idle:
                return job
        return None

    def is_submitting(self) -> bool:
        """A submit for this model is in flight."""
        return self.submitting is not None and not self.submitting.done()

    def phase(self) -> str:
        """The model's state in one word or two, for keep-alives, errors and the state file."""
        live = self.live()
        if any(job.ready for job in live):
            return "ready"
        if live:
            return live[-1].phase()
        if self.is_submitting():
            return "submitting"
        if self.failure is not None:
            return "failed"
        if any(job.stopping for job in self.jobs.values()):
            return "stopping"
        return "idle"
