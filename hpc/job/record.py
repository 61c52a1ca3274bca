"""The registry record of the job this process runs inside (job wrapper or swap pool).

Both programs that run inside a job keep one record true the same way: claim the backend's
``pending`` record (or create one for a job submitted by hand with ``sbatch``), then move
it through its states, never writing over a record a newer run (a requeue) already owns.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

from hpc.registry import Record, Registry, State, new_api_key, record_key


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
    ) -> Record:
        """The backend's pending record (or a new one), now ``starting`` on this node."""
        existing = self.registry.read(self.key)
        if existing is not None and existing.generation <= self.generation:
            record = existing
        else:
            record = Record(
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
        record = record.model_copy(
            update={
                "generation": self.generation,
                "state": "starting",
                # Slurm's node name (gpu1) is what users see in squeue; else the host name.
                "node": self.environ.get("SLURMD_NODENAME") or socket.gethostname(),
                "pid": os.getpid(),
                "base_url": None,
                "reason": None,
                "log_tail": [],
                # The wrapper may run before the backend's pending record exists (a fast
                # Slurm start): the plan carries who started the job all the same.
                "started_by": record.started_by or started_by,
            }
        )
        self.registry.write(record)
        return record

    def set(self, record: Record, state: State, **fields: object) -> Record:
        """``record`` in ``state`` with ``fields`` changed, written unless a newer run owns it."""
        record = record.model_copy(update={"state": state, **fields})
        current = self.registry.read(self.key)
        if current is not None and current.generation > self.generation:
            # The job was requeued and a newer run owns the record: leave it alone.
            self._say(f"record {self.key} belongs to generation {current.generation}; not writing")
            return record
        self.registry.write(record)
        self._say(f"record {self.key} -> {state}")
        return record
