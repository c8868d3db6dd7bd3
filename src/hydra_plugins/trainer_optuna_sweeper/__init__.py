"""The trainer's Optuna sweeper: hydra-optuna-sweeper plus pruning (see optuna_sweeper.py)."""
