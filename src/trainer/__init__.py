"""Hydra-configured PyTorch training.

Kept import-free on purpose: `python train.py` must reach its first step fast, so
heavy modules (torch, tensorboard) are imported where they are used.
"""

__version__ = "0.1.0"
