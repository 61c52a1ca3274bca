"""A record against its scheduler: the one place that decides what a record becomes.

The job service (``hpc.jobs``) and the gateway's on-demand controller both move records on
with it: a job that ended without finishing its record (killed, preempted, never ran) is
finished here, so every caller agrees.
"""

from __future__ import annotations

from hpc.backends import JobStatus
from hpc.registry import FINAL_STATES, Record, Registry

# Scheduler states that mean the job no longer runs.
ENDED = frozenset({"done", "failed", "cancelled", "missing"})


def requeued(record: Record, status: JobStatus, asked_at: float | None) -> bool:
    """True if the job ran (its record moved past ``pending``) and its scheduler now has it
    waiting to run again: ``scontrol requeue``, a preemption that requeues, a node failure.

    Only on evidence newer than the record: a record written after the scheduler was asked
    (``asked_at``) may be the next run's, or the first run's start that the answer predates.
    """
    return (
        asked_at is not None
        and status.state == "pending"
        and status.serving is None
        and record.state != "pending"
        and record.updated_at < asked_at
    )


def reconcile(
    record: Record,
    status: JobStatus,
    *,
    cancelled: bool = False,
    asked_at: float | None = None,
) -> Record:
    """``record`` as it should be, given what its scheduler says now (pure: writes nothing).

    A requeued job (:func:`requeued`, judged on an answer asked at ``asked_at``) becomes the
    next generation's ``pending`` record, whatever the last run left: the old run can no
    longer write over it, the next run claims it, and nobody takes the job for ended (the
    gateway would start a second one). Otherwise a final record stays as it is. A job with
    no wrapper to write its record (Kubernetes) moves on by ``status.serving``. A job that
    ended without finishing its record (killed, preempted, never ran) ends it here: ``gone``
    if we ``cancelled`` it (its engine pid cleared), if it had been ready or the scheduler
    no longer knows it ("stale"); ``failed`` if it ended (done, failed, cancelled) before it
    was ready. Returns ``record`` itself when nothing changes.
    """
    if not cancelled and requeued(record, status, asked_at):
        return record.model_copy(
            update={
                "generation": record.generation + 1,
                "state": "pending",
                "reason": "requeued: the scheduler runs it again",
                "base_url": None,
                "tls_sha256": None,
                "engine_pid": None,
            }
        )
    if record.state in FINAL_STATES:
        return record
    if status.serving == "ready" and record.state != "ready":
        base_url = f"http://{record.node}:{record.port}/v1"
        return record.model_copy(update={"state": "ready", "base_url": base_url, "reason": None})
    if status.serving == "starting" and record.state in ("pending", "ready"):
        return record.model_copy(update={"state": "starting"})
    if cancelled:
        return record.model_copy(
            update={"state": "gone", "reason": "cancelled", "engine_pid": None}
        )
    if status.state not in ENDED:
        return record
    if record.state in ("ready", "draining") or status.state == "missing":
        # It served once, or the scheduler forgot it (deleted behind our back): stale.
        reason = f"stale: scheduler says {status.state}"
        return record.model_copy(update={"state": "gone", "reason": reason})
    reason = record.reason or f"the job ended ({status.state}) before it was ready"
    return record.model_copy(update={"state": "failed", "reason": reason})


def settle(
    registry: Registry,
    record: Record,
    status: JobStatus,
    *,
    cancelled: bool = False,
    asked_at: float | None = None,
) -> Record:
    """Write :func:`reconcile`'s answer for ``record``; returns the record as stored now.

    Decided again on the stored record under its lock (the job may just have finished its
    record itself, or moved on since ``record`` was read): nothing written in between is
    lost, and a record the wrapper ended is not ended a second time.
    """

    def change(current: Record | None) -> Record | None:
        if current is None:
            return None
        return reconcile(current, status, cancelled=cancelled, asked_at=asked_at)

    return registry.modify(record.key, change) or record
