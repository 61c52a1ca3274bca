"""pyslurm.db: jobs from the accounting database (slurmdbd)."""

from pyslurm.db.job import Job, JobFilter, Jobs, JobSearchFilter

__all__ = ["Job", "JobFilter", "JobSearchFilter", "Jobs"]
