"""Slurm batch jobs: render the sbatch scripts of `slurm/` into a run directory and submit them as a pipeline."""
