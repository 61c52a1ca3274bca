"""sbatch templates, one per engine; hpc.slurm.sbatch fills them in."""
