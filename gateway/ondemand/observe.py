"""What the gateway's on-demand jobs are doing: their records, and the scheduler's word.

The records say ``ready``; only the scheduler knows a pending reason, or that a job ended
without finishing its record (killed, or never ran: ``ENDED``), or that it was requeued
and will run again. It is asked batched, about every job the gateway still watches, ready
and ended ones too: a ready job whose wrapper was killed (OOM, kill -9, a node lost)
still says ``ready``, and a requeued job's old run may have written ``gone``; asking the
job service (``hpc.jobs.JobService.status``) moves their records on, read again here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gateway.logs import LOGGER_NAME, fields
from gateway.ondemand.jobs import OwnJob
from hpc.backends import Backend, JobStatus
from hpc.errors import MTError
from hpc.registry import Record, Registry

log = logging.getLogger(f"{LOGGER_NAME}.ondemand")

_LOG_LINES_IN_ERROR = 5


def observe(
    registry: Registry, backend: Backend, jobs: Sequence[OwnJob], ask: bool
) -> dict[str, tuple[Record | None, JobStatus | None]]:
    """Each job's record, and (if ``ask``) what the scheduler says of it.
    Blocking: the monitor runs it in a worker thread."""
    statuses: dict[str, JobStatus] = {}
    if ask and jobs:
        try:
            by_id = backend.status([job.handle for job in jobs])
        except MTError as exc:  # the scheduler (or the SSH link to it) is down: next round
            log.warning("scheduler status failed", extra=fields(error=exc.message))
            by_id = {}
        for job in jobs:
            status = by_id.get(job.handle.job_id)
            if status is None:
                continue
            statuses[job.key] = status
    # Read after asking: the job service has just moved records on from the answer.
    return {job.key: (registry.read(job.key), statuses.get(job.key)) for job in jobs}


def job_failure(record: Record) -> str:
    """Why a job failed before it was ready, with its log's last lines, for the waiters."""
    tail = " | ".join(line.strip() for line in record.log_tail[-_LOG_LINES_IN_ERROR:])
    reason = record.reason or "no reason recorded"
    return f"job {record.key} {record.state}: {reason}" + (f" (log: {tail})" if tail else "")
