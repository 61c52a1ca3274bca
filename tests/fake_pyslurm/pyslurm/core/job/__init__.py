"""pyslurm.core.job: Job, Jobs and JobSubmitDescription."""

from pyslurm.core.job.job import Job, Jobs
from pyslurm.core.job.submission import JobSubmitDescription

__all__ = ["Job", "JobSubmitDescription", "Jobs"]
