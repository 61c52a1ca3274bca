"""pyslurm.db.Job, Jobs and JobFilter, loaded through ``sacct`` (what slurmdb_jobs_get returns).

Without slurmdbd (``AccountingStorageType=accounting_storage/none``, as on the test cluster)
pyslurm cannot open a database connection and raises RPCError with the message below, verbatim
from pyslurm's ``Connection.open``; the fake raises the same when sacct says accounting is off.
"""

from __future__ import annotations

from typing import Any

from pyslurm import _rpc
from pyslurm.core.error import RPCError
from pyslurm.xcollections import MultiClusterMap

_NO_CONNECTION = "Failed to open onnection to slurmdbd"
_FIELDS = "JobID,JobName,State,Reason,NodeList,Cluster"


class JobFilter:
    """Search conditions for database jobs; the fake models ``ids`` only."""

    def __init__(self, **kwargs: Any) -> None:
        self.ids: list[int] | None = None
        for key, value in kwargs.items():
            if key != "ids":
                raise NotImplementedError(f"the fake pyslurm does not model JobFilter.{key}")
            setattr(self, key, value)


JobSearchFilter = JobFilter  # pyslurm's old name, still exported


class Job:
    """A job as the accounting database has it."""

    def __init__(self, job_id: int = 0, cluster: str | None = None) -> None:
        self.id = int(job_id)
        self.cluster = cluster
        self.name: str | None = None
        self.state: str | None = None
        self.state_reason: str | None = None
        self.nodelist: str | None = None
        self.comment: str | None = None  # pyslurm's db comment is the derived exit string


class Jobs(MultiClusterMap):
    """Database jobs by id (a MultiClusterMap, as in pyslurm)."""

    @staticmethod
    def load(db_filter: JobFilter | None = None, db_connection: Any = None) -> Jobs:
        """Load jobs from slurmdbd; RPCError when there is no database to connect to."""
        argv = ["sacct", "--parsable2", "--noheader", "--allocations", f"--format={_FIELDS}"]
        if db_filter is not None and db_filter.ids:
            argv.append(f"--jobs={','.join(str(int(i)) for i in db_filter.ids)}")
        try:
            out = _rpc.run(argv)
        except RPCError as exc:
            if "accounting storage is disabled" in exc.msg:
                raise RPCError(msg=_NO_CONNECTION) from exc
            raise
        jobs = Jobs()
        for line in out.splitlines():
            job_id, name, state, reason, nodes, cluster = line.split("|")
            job = Job(int(job_id), cluster=cluster or None)
            job.name = name or None
            job.state = state.split()[0] if state else None  # "CANCELLED by 0"
            job.state_reason = reason or None
            job.nodelist = None if nodes in ("", "None assigned") else nodes
            jobs.add(job)
        return jobs
