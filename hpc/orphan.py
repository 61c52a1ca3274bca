"""A job whose wrapper died: what is left of its engine stopped, its record ended.

A wrapper killed with SIGKILL (or by the OOM killer) can neither stop its engine nor finish
its record. The kernel ends the engine itself (``hpc.job.proctree.die_with_parent``); this
is the check behind that, run by ``mt status`` on the host that ran the wrapper (and only
there: ``hpc.liveness.judged_here``): a record that is not final and whose wrapper pid is
dead has lost its writer, so its engine's process group is stopped and it is marked
``failed`` (``wrapper died``).
"""

from __future__ import annotations

import os

from hpc.job.proctree import ENGINE_STOP_SIGNAL, stop_tree
from hpc.liveness import alive, judged_here
from hpc.registry import FINAL_STATES, Record, Registry


def wrapper_died(record: Record) -> bool:
    """True if ``record`` is not final and its wrapper, judged on its own host, is dead."""
    return (
        record.state not in FINAL_STATES
        and record.pid is not None
        and judged_here(record.host, record.boot_id)
        and not alive(record.pid, record.pid_started_at)
    )


def engine_left(record: Record) -> bool:
    """True if the engine's process (or its process group) still runs, on this host.

    Only an engine whose start time the record holds: a pid without it could name another
    process by now. The group outlives its leader (a worker the engine started); Linux does
    not reuse a pid while a group of that id exists, so a live group of a dead leader is ours.
    """
    pid = record.engine_pid
    if pid is None or record.engine_started_at is None:
        return False
    if alive(pid, record.engine_started_at):
        return True
    if alive(pid):
        return False  # the number names another process now
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def end_orphan(registry: Registry, record: Record) -> Record:
    """Stop what is left of ``record``'s engine and mark it ``failed``; the stored record."""
    stopped = engine_left(record)
    if stopped and record.engine_pid is not None:
        stop_tree(record.engine_pid, grace_s=5.0, sig=ENGINE_STOP_SIGNAL)
    reason = f"wrapper died: pid {record.pid} on {record.host} ended without finishing its record"
    if stopped:
        reason += f"; its engine (pid {record.engine_pid}) was stopped"

    def change(current: Record | None) -> Record | None:
        if current is None or current.version != record.version or not wrapper_died(current):
            return None  # written since it was judged: judge it again next time
        return current.model_copy(update={"state": "failed", "reason": reason, "engine_pid": None})

    return registry.modify(record.key, change) or record
