"""The trainer's SLURM launcher: submitit's, waiting for every job (see trainer.slurm)."""
