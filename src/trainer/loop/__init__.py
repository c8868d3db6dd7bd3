"""The training loop and the state a checkpoint carries."""
