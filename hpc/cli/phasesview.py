"""`mt status --phases`: each job's start-up phases as a table or JSON (hpc.phases)."""

from __future__ import annotations

import time

from rich.table import Table

from hpc import jobs
from hpc.cli.output import print_json, stderr, stdout
from hpc.phases import Phases


def _queued(view: jobs.JobView, now: float) -> tuple[float | None, str | None]:
    """How long the job has queued (so far, if it still does) and the scheduler's reason."""
    record, scheduler = view.record, view.scheduler
    waiting = record.state == "pending" and scheduler.state in ("pending", "unknown")
    reason = scheduler.reason or None if waiting else None
    if waiting:
        return max(0.0, now - record.created_at), reason
    return (record.phases.queued_s if record.phases else None), None


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _staging_text(phases: Phases | None) -> str:
    if phases is None or phases.staging_s is None:
        return "-"
    if phases.staging_note is not None:
        return f"not staged: {phases.staging_note}"
    copied = phases.staging_bytes or 0
    if copied == 0:
        return f"{phases.staging_s:.1f}s (reused, 0 B copied)"
    rate = f", {phases.staging_mb_s:.0f} MB/s" if phases.staging_mb_s is not None else ""
    return f"{phases.staging_s:.1f}s ({copied / 1e6:.1f} MB{rate})"


def print_phases(views: list[jobs.JobView], *, as_json: bool) -> None:
    """`mt status --phases`: each job's start-up phases (the wrapper's record, the
    scheduler's pending reason for jobs still queued)."""
    now = time.time()
    rows = []
    for view in views:
        queued_s, reason = _queued(view, now)
        rows.append((view, queued_s, reason))
    if as_json:
        print_json(
            [
                {
                    "key": v.record.key,
                    "model": v.record.model,
                    "state": v.record.state,
                    "queued_s": None if q is None else round(q, 3),
                    "pending_reason": reason,
                    "phases": v.record.phases.model_dump(mode="json") if v.record.phases else None,
                }
                for v, q, reason in rows
            ]
        )
        return
    if not rows:
        stderr().print("no jobs")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("MODEL", "JOB", "STATE", "QUEUED", "STAGING", "ENGINE→HEALTHY", "FIRST TOKEN"):
        table.add_column(column)
    for view, queued_s, reason in rows:
        r = view.record
        queued = _seconds(queued_s)
        if r.state == "pending" and queued_s is not None:
            queued += " so far" + (f" ({reason})" if reason else "")
        p = r.phases
        table.add_row(
            r.model,
            r.key,
            r.state,
            queued,
            _staging_text(p),
            _seconds(p.engine_start_to_healthy_s if p else None),
            _seconds(p.first_token_s if p else None),
        )
    stdout().print(table)
