"""The registry record of the job this process runs inside (job wrapper or swap pool).

Both programs that run inside a job keep one record true the same way: claim the backend's
``pending`` record (or create one for a job submitted by hand with ``sbatch``), then move
it through its states. Every step is a read-modify-write under the record's lock, by the
registry's one rule (``hpc.registry.replaces``): a record a newer run (a requeue) owns, or
one ended from outside (``mt cancel``, ``mt status``), is not written over; the run learns
so by :class:`RecordEnded` and stops its engine.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

from hpc.liveness import boot_id, create_time, this_host
from hpc.phases import Phases
from hpc.registry import FINAL_STATES, Record, Registry, State, new_api_key, record_key


class RecordEnded(Exception):
    """This run's record was ended from outside, or a newer run owns it: the run must stop."""

    def __init__(self, record: Record) -> None:
        why = f"{record.state}: {record.reason}" if record.reason else record.state
        super().__init__(f"record {record.key} is {why} (generation {record.generation})")
        self.record = record


class JobRecord:
    """One job's record, written only by the run that owns it."""

    def __init__(
        self,
        registry_dir: Path,
        *,
        backend: str,
        job_id: str | None,
        environ: Mapping[str, str],
        say: Callable[[str], None],
    ) -> None:
        self.registry = Registry(registry_dir)
        self.backend = backend
        self.environ = environ
        self.job_id = job_id or environ.get("SLURM_JOB_ID") or f"pid{os.getpid()}"
        self.generation = int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
        self.key = record_key(backend, self.job_id)
        self._say = say

    def claim(
        self,
        *,
        nonce: str,
        model: str,
        engine: str,
        serves: tuple[str, ...] = (),
        started_by: str | None = None,
        predecessor: str | None = None,
    ) -> Record:
        """The backend's pending record (or a new one), now ``starting`` on this node."""

        def change(existing: Record | None) -> Record:
            record = existing or Record(
                backend=self.backend,
                job_id=self.job_id,
                nonce=nonce,
                model=model,
                engine=engine,
                serves=serves,
                state="pending",
                api_key=new_api_key(),  # pydantic makes it a SecretStr
                started_by=started_by,
            )
            return record.model_copy(
                update={
                    "generation": self.generation,
                    "state": "starting",
                    # Slurm's node name (gpu1) is what users see in squeue; else the host name.
                    "node": self.environ.get("SLURMD_NODENAME") or socket.gethostname(),
                    # Who can judge this run's pids, and which ones: mt status on this host.
                    "host": this_host(),
                    "boot_id": boot_id(),
                    "pid": os.getpid(),
                    "pid_started_at": create_time(os.getpid()),
                    "engine_pid": None,
                    "engine_started_at": None,
                    "base_url": None,
                    "tls_sha256": None,
                    "reason": None,
                    "log_tail": [],
                    # From the submission's pending record to now: the time spent queued
                    # (unknown for a job submitted by hand, which has no pending record).
                    "phases": Phases(
                        queued_s=round(max(0.0, time.time() - existing.created_at), 3)
                        if existing is not None and existing.state == "pending"
                        else None
                    ),
                    # The wrapper may run before the backend's pending record exists (a fast
                    # Slurm start): the plan carries who started the job all the same.
                    "started_by": record.started_by or started_by,
                    "predecessor": record.predecessor or predecessor,
                }
            )

        # Never None: change() always returns a record.
        return self._mine(cast(Record, self.registry.modify(self.key, change)), "starting")

    def set(self, record: Record, state: State, **fields: object) -> Record:
        """The stored record moved to ``state`` with ``fields`` changed (``record`` if there
        is none stored any more); RecordEnded if it was ended from outside or a newer run
        owns it."""
        asked: dict[str, object] = {"state": state, **fields}

        def change(current: Record | None) -> Record:
            return (current or record).model_copy(update=asked)

        stored = self._mine(cast(Record, self.registry.modify(self.key, change)), state)
        self._say(f"record {self.key} -> {state}")
        return stored

    def _mine(self, stored: Record, state: State) -> Record:
        """``stored`` if this run's write of ``state`` went through; RecordEnded if not."""
        refused = stored.generation > self.generation or (
            stored.state in FINAL_STATES and state not in FINAL_STATES
        )
        if refused:
            self._say(f"record {self.key} not moved to {state}: {RecordEnded(stored)}")
            raise RecordEnded(stored)
        return stored
