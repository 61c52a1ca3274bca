"""What the script of a ``continuity: handover`` job carries: its plan, and how to submit its
successor from the node (the site's Slurm settings, the log directory, the Python).

A job hands over to a copy of itself: the successor's script is rendered on the node from
this, with a new nonce and ``predecessor`` set (hpc.slurm.handover), so it never reads
``models.yaml`` or ``site.yaml``, which may have changed, or not be on the node.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from hpc.job.plan import JobPlan
from hpc.site import SlurmSite


class HandoverJob(BaseModel):
    """A handover job's payload (``python -m hpc.slurm.handover --plan -``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: JobPlan
    site: SlurmSite
    log_dir: Path
    python: str
