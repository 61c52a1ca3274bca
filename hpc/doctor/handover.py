"""`mt doctor`'s check for ``continuity: handover``: does this site's sbatch take ``--signal``?

A handover job is warned by ``--signal=B:USR1@N`` and submits its successor itself, from its
node, when its time is near (hpc.job.handover): it needs no job dependency, but sbatch must
accept the signal option (``--test-only`` asks the controller without queueing anything),
and compute nodes must be able to run sbatch (the probe job's Slurm check shows that).
"""

from __future__ import annotations

from hpc.doctor.checks import Check
from hpc.errors import SlurmError
from hpc.slurm.client import SlurmClient
from hpc.transport import CommandTimeout

_ARGV = ["sbatch", "--test-only", "--signal=B:USR1@60", "--time=5", "--wrap=true"]


def handover_check(client: SlurmClient) -> Check:
    """``sbatch --test-only --signal=B:USR1@60``: accepted, or why not."""
    try:
        result = client.run(_ARGV, check=False)
    except (CommandTimeout, SlurmError) as exc:
        return Check("handover", None, f"sbatch --test-only did not answer: {exc}")
    if result.returncode == 0:
        return Check("handover", True, "sbatch accepts --signal=B:USR1@N (continuity: handover)")
    first = next((ln.strip() for ln in result.stderr.splitlines() if ln.strip()), "")
    return Check(
        "handover",
        False,
        f"sbatch --test-only --signal=B:USR1@60 failed: {first or result.returncode}",
        hint="continuity: handover needs Slurm's --signal; without it use continuity: none, "
        "or ask your admin (a partition's limits, e.g. MaxTime, may refuse the test job)",
    )
