"""pyslurm.Job and pyslurm.Jobs, loaded from ``squeue --json`` (what slurm_load_jobs returns).

Attributes are the real ones (``id``, ``name``, ``state``, ``state_reason``, ``comment``,
``allocated_nodes``, ``batch_host``, ``partition``, ``cluster``) with the real value formats;
``state_reason`` is Slurm's state description when there is one, else the reason's name, as
pyslurm's property reads it. Signals go through ``scancel`` (slurm_kill_job); the errors
pyslurm ignores there (already done; an unknown job for SIGKILL) are ignored here too.
"""

from __future__ import annotations

import json
import signal as signals
from typing import Any

from pyslurm import _rpc
from pyslurm.core.error import ESLURM_ALREADY_DONE, ESLURM_INVALID_JOB_ID, RPCError
from pyslurm.xcollections import MultiClusterMap


def signal_to_num(sig: str | int | None) -> int | None:
    """pyslurm.utils.helpers.signal_to_num: a number, or a name as ``signal.Signals`` knows it."""
    if not sig:
        return None
    try:
        if str(sig).isnumeric():
            return signals.Signals(int(sig)).value
        return signals.Signals[str(sig)].value
    except (KeyError, ValueError):
        raise ValueError(f"Invalid Signal: {sig}.") from None


def _text(value: Any) -> str | None:
    # pyslurm's cstr.to_unicode: NULL and "" become None
    return str(value) if value not in (None, "") else None


class Job:
    """A Slurm job; ``Job(id)`` addresses one without loading it."""

    def __init__(self, job_id: int) -> None:
        self._info: dict[str, Any] = {"job_id": int(job_id)}

    def __repr__(self) -> str:
        return f"pyslurm.Job({self.id})"

    @staticmethod
    def _from_squeue(record: dict[str, Any]) -> Job:
        job = Job(int(record["job_id"]))
        job._info = record
        return job

    @staticmethod
    def load(job_id: int) -> Job:
        """Load one job; RPCError (Invalid job id specified) if the controller has none."""
        job = Jobs.load().get(int(job_id))
        if job is None:
            raise RPCError(errno=ESLURM_INVALID_JOB_ID)
        return job

    @property
    def id(self) -> int:
        return int(self._info["job_id"])

    @property
    def name(self) -> str | None:
        return _text(self._info.get("name"))

    @property
    def state(self) -> str | None:
        state = self._info.get("job_state")
        if isinstance(state, list):  # squeue --json after 22.05 gives a list of flags
            state = state[0] if state else None
        return _text(state)

    @property
    def state_reason(self) -> str | None:
        return _text(self._info.get("state_description")) or _text(self._info.get("state_reason"))

    @property
    def comment(self) -> str | None:
        return _text(self._info.get("comment"))

    @property
    def allocated_nodes(self) -> str | None:
        return _text(self._info.get("nodes"))

    @property
    def batch_host(self) -> str | None:
        return _text(self._info.get("batch_host"))

    @property
    def partition(self) -> str | None:
        return _text(self._info.get("partition"))

    @property
    def cluster(self) -> str | None:
        return _text(self._info.get("cluster"))

    def send_signal(self, signal: str | int, steps: str = "children", hurry: bool = False) -> None:
        """Signal the job's steps: ``children`` (all but the batch shell), ``batch`` or ``all``."""
        sig = signal_to_num(signal)
        argv = ["scancel", f"--signal={sig}"]
        if steps.casefold() == "all":
            argv.append("--full")
        elif steps.casefold() == "batch":
            argv.append("--batch")
        if hurry:
            argv.append("--hurry")
        try:
            _rpc.run([*argv, str(self.id)])
        except RPCError as exc:
            # pyslurm ignores these two, as slurm_kill_job's callers do
            if exc.errno == ESLURM_ALREADY_DONE or (
                exc.errno == ESLURM_INVALID_JOB_ID and sig == 9
            ):
                return
            raise

    def cancel(self) -> None:
        """Cancel the job: pyslurm sends SIGKILL through slurm_kill_job, as scancel does."""
        self.send_signal(9)


class Jobs(MultiClusterMap):
    """Every job the controller knows, by id (a MultiClusterMap, as in pyslurm)."""

    @staticmethod
    def load(preload_passwd_info: bool = False, frozen: bool = False) -> Jobs:
        """Load all jobs (slurm_load_jobs); RPCError if the controller does not answer."""
        jobs = Jobs()
        for record in json.loads(_rpc.run(["squeue", "--json"])).get("jobs", []):
            jobs.add(Job._from_squeue(record))
        return jobs
