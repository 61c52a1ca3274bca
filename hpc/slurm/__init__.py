"""Slurm: the command-line client, the pyslurm adapter, sbatch scripts and templates.

Also function jobs (submitit) and the doctor's probe job.
"""
