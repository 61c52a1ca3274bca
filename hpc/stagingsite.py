"""site.yaml's ``staging:`` section: node-local weight staging's default and its cache.

Read by the site (hpc.site) and carried in a job's plan to the node (hpc.job.plan,
hpc.job.staging), so it lives apart from both.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hpc.spec import Weights
from hpc.specbase import Strict as _Strict


class StagingSite(_Strict):
    """Node-local weight staging (hpc.job.staging): the site's default and where the cache is."""

    stage: Literal["none", "node-local"] = Field(
        default="none", description="the default of every model's weights.stage"
    )
    dir: str = Field(
        default="$TMPDIR",
        pattern=r"^(\$TMPDIR|/[^\x00-\x1f\x7f]*)$",
        description="where on each node the cache lives (a per-user 0700 folder is made in "
        "it): $TMPDIR (the job's, else the system's temporary directory), /dev/shm (memory), "
        "or an absolute path on a node-local disk",
    )
    max_bytes: int | None = Field(
        default=None,
        gt=0,
        description="the cache's size cap per user and node: least recently used entries "
        "that no running job uses are removed to make room (default: no cap but free space)",
    )

    def for_weights(self, weights: Weights) -> StagingSite | None:
        """These settings if ``weights`` are to be staged (their own ``stage``, else the
        site's), else None."""
        wanted = weights.stage or self.stage
        return self if wanted == "node-local" else None
