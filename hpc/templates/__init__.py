"""sbatch templates, one per engine; hpc.sbatch fills them in."""
