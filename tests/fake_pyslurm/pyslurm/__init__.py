"""A stand-in for pyslurm 25.11, which cannot be built here against Debian's Slurm 22.05.

pyslurm links libslurm and must be built for the same Slurm release; this machine has Slurm
22.05 only. Every name here mirrors the real module (PySlurm/pyslurm: ``pyslurm/__init__.py``,
``pyslurm/core/job/job.pyx``, ``submission.pyx`` and ``.pxd``, ``pyslurm/core/error.pyx``,
``pyslurm/db/job.pyx``, ``pyslurm/xcollections.pyx``): the same classes, signatures, attribute
names and value formats (``state`` is ``"PENDING"``, ``state_reason`` ``"JobHeldUser"``, empty
strings are ``None``, ids are ints), the same checks before submitting, the same errors.

Behind them is real Slurm, not dicts: where libslurm would send an RPC to slurmctld, the fake
runs the Slurm command that sends the same request (``sbatch --parsable`` with the equivalent
options, ``squeue --json``, ``scancel``, ``sacct``) against the cluster ``SLURM_CONF`` names,
and turns the answer into pyslurm's objects, or a failure into pyslurm's ``RPCError`` with
libslurm's errno and message. Like libslurm, it never lets sbatch read the script's
``#SBATCH`` lines.

Only what ModelTainer's adapter uses is modelled; an attribute the fake cannot pass on raises
``NotImplementedError`` instead of being dropped. Tests put ``tests/fake_pyslurm`` on
``sys.path`` themselves, so nothing else imports it.
"""

from pyslurm import db
from pyslurm.core import error
from pyslurm.core.error import PyslurmError, RPCError
from pyslurm.core.job import Job, Jobs, JobSubmitDescription
from pyslurm.version import __version__

__all__ = [
    "Job",
    "JobSubmitDescription",
    "Jobs",
    "PyslurmError",
    "RPCError",
    "__version__",
    "db",
    "error",
]
