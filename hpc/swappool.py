"""Compatibility shim: ``python -m hpc.swappool`` runs the swap pool, now ``hpc.job.swappool``.

Job scripts written before the code moved (queued in Slurm across an upgrade, or kept by
users as edited sbatch files) still call this path; it must keep working.
"""

from hpc.job.swappool import main

if __name__ == "__main__":
    raise SystemExit(main())
