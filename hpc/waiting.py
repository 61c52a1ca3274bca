"""Waiting for a job to be ready (what ``mt submit --wait`` and ``mt wait`` run): the record
read often, the scheduler asked seldom, a job stuck in the queue withdrawn at its deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hpc.backends import JobHandle, JobStatus
from hpc.errors import MTError
from hpc.jobs import service
from hpc.reconcile import ENDED
from hpc.registry import FINAL_STATES, Record, record_key
from hpc.site import Site


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


class QueueTimeout(MTError):
    """A job still waited in the scheduler's queue at its deadline: it was cancelled."""


def wait_ready(
    site: Site,
    handle: JobHandle,
    *,
    timeout_s: float | None = None,
    queue_timeout_s: float | None = None,
    poll_s: float = 0.2,
    scheduler_every_s: float = 3.0,
    on_poll: Callable[[Record | None, JobStatus], None] | None = None,
) -> Record:
    """Block until the job's record is ``ready``; raise WaitFailed if it ends first.

    The record (a small local file) is read every ``poll_s``; the scheduler is asked only
    every ``scheduler_every_s``, since squeue every fraction of a second loads a busy
    controller (asking also reconciles the record). ``on_poll`` gets the record and
    scheduler status at every poll, so a CLI can show progress and elapsed time; the
    library itself prints nothing. A job still pending in the scheduler's queue after
    ``queue_timeout_s`` is cancelled and its record removed (QueueTimeout, with the last
    pending reason): nothing is left of it.
    """
    jobs = service(site, handle.backend)
    key = record_key(handle.backend, handle.job_id)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    queue_deadline = None if queue_timeout_s is None else time.monotonic() + queue_timeout_s
    status = JobStatus("unknown")
    asked_at: float | None = None
    while True:
        if asked_at is None or time.monotonic() - asked_at >= scheduler_every_s:
            status = jobs.status([handle]).get(handle.job_id, JobStatus("unknown"))
            asked_at = time.monotonic()
        record = jobs.registry.read(key)
        if on_poll is not None:
            on_poll(record, status)
        if record is not None and record.state == "ready":
            return record
        if record is not None and record.state in FINAL_STATES:
            raise WaitFailed(record)
        if record is None and status.state in ENDED:
            raise MTError(f"job {handle.job_id} ended ({status.state}) without a record")
        if (
            queue_deadline is not None
            and time.monotonic() > queue_deadline
            and status.state == "pending"
            and (record is None or record.state == "pending")
        ):
            jobs.withdraw(handle)
            why = f" ({status.reason})" if status.reason else ""
            raise QueueTimeout(
                f"job {key} was still pending after {queue_timeout_s:g}s{why}: cancelled, "
                "and nothing is left of it",
                hint="ask for fewer resources or another partition (`sinfo` shows what is "
                "free), or allow a longer --queue-timeout",
            )
        if deadline is not None and time.monotonic() > deadline:
            raise MTError(
                f"job {key} not ready after {timeout_s:g}s "
                f"(record: {record.state if record else 'none'}, scheduler: {status.state})",
                hint=f"it keeps running: `mt logs -f {key}` follows it, `mt cancel {key}` stops it",
            )
        time.sleep(poll_s)
