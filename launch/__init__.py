"""SLURM launcher: render sbatch scripts, submit, requeue on preemption; local multi-process runs."""
