"""Publish the on-demand state file that `mt pool status` reads (``hpc.ondemandstate``)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from gateway.logs import LOGGER_NAME, fields
from gateway.ondemand.jobs import ModelState
from hpc.ondemandstate import JobEntry, ModelEntry, OnDemandState
from hpc.privatefile import write_private

log = logging.getLogger(f"{LOGGER_NAME}.ondemand")


def model_entry(state: ModelState, now: float, outstanding: Callable[[str], int]) -> ModelEntry:
    """The model's entry: its phase, idle clock and failure, and each job's."""
    idle_for = None if state.last_request_at is None else max(0.0, now - state.last_request_at)
    return ModelEntry(
        state=state.phase(),
        idle_ttl_s=state.idle_ttl_s,
        last_request_at=state.last_request_at,
        idle_for_s=None if state.in_flight else idle_for,
        in_flight=state.in_flight,
        error=state.failure,
        failed_at=state.failed_at,
        last_start_s=state.last_start_s,
        jobs=[
            JobEntry(
                job=job.key,
                state=job.phase(),
                started_at=job.started_at,
                why=job.why,
                in_flight=outstanding(job.key),
                node=job.record.node if job.record is not None else None,
            )
            for job in state.jobs.values()
        ],
    )


def state_document(
    states: Mapping[str, ModelState], backend: str | None, outstanding: Callable[[str], int]
) -> OnDemandState:
    """The whole file, as of now (see docs/on-demand.md for its shape)."""
    now = time.time()
    return OnDemandState(
        updated_at=now,
        gateway_pid=os.getpid(),
        backend=backend,
        models={
            name: model_entry(state, now, outstanding) for name, state in sorted(states.items())
        },
    )


def write_state(path: Path, document: OnDemandState) -> None:
    """Write the file (0600, atomic); a failure is logged, never raised. Blocking."""
    data = json.dumps(document.model_dump(mode="json"), indent=2).encode("utf-8")
    try:
        write_private(path, data)
    except OSError as exc:
        log.error(
            "cannot write the on-demand state file",
            extra=fields(path=str(path), error=exc.strerror),
        )
