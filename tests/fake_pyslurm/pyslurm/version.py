"""pyslurm's version: the first two numbers are the Slurm release it is built for."""

# As in the real pyslurm/version.py: SLURM_MAJOR.PYSLURM_PATCH, Slurm's month without its zero.
__version__ = "25.11.0"
