"""pyslurm.core: the controller-side API (jobs, errors)."""
