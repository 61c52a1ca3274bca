"""A model's handover chain (``continuity: handover``): the jobs that serve it in turn.

Each job's record names the job it took over from (``predecessor``) and the one it handed
over to (``successor``); the chain is what those links reach. `mt cancel` ends the whole
chain, `mt status` shows each job's place in it. A successor whose record is not written
yet (the moment between its sbatch and its ``pending`` record) is a link without a record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from hpc.registry import Record, Registry, record_key


@dataclass(frozen=True)
class Link:
    """One job of a chain: its id, and its record if there is one yet."""

    job_id: str
    record: Record | None


def chain(registry: Registry, record: Record) -> list[Link]:
    """Every job linked to ``record`` by predecessor/successor, ``record``'s included,
    oldest first."""
    seen: dict[str, Record | None] = {record.job_id: record}
    todo = [record]
    while todo:
        current = todo.pop()
        for job_id in (current.predecessor, current.successor):
            if job_id is None or job_id in seen:
                continue
            linked = registry.read(record_key(record.backend, job_id))
            seen[job_id] = linked
            if linked is not None:
                todo.append(linked)
    return [Link(job_id, seen[job_id]) for job_id in sorted(seen, key=_job_order)]


def _job_order(job_id: str) -> tuple[int, str]:
    # Slurm's ids grow with time: a chain's order is its ids' order.
    return (int(job_id), "") if job_id.isdigit() else (0, job_id)


def describe(record: Record) -> str | None:
    """The record's place in its chain for `mt status`: ``handover → job 42 at 12:03``,
    ``handover at 12:03``, ``took over from job 41``; None outside a chain."""
    parts = []
    if record.predecessor is not None:
        parts.append(f"took over from job {record.predecessor}")
    when = (
        time.strftime("%H:%M", time.localtime(record.handover_at))
        if record.handover_at is not None
        else None
    )
    if record.successor is not None:
        parts.append(f"handover → job {record.successor}" + (f" at {when}" if when else ""))
    elif when is not None and record.state not in ("gone", "failed"):
        parts.append(f"handover at {when}")
    return "; ".join(parts) or None
