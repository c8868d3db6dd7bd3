"""Sweeps: the job callback, pruning, SLURM, the report."""
