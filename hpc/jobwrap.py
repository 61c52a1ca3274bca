"""Compatibility shim: ``python -m hpc.jobwrap`` runs the job wrapper, now ``hpc.job.wrapper``.

Job scripts written before the code moved (queued in Slurm across an upgrade, or kept by
users as edited sbatch files) still call this path; it must keep working.
"""

from hpc.job.wrapper import main

if __name__ == "__main__":
    raise SystemExit(main())
