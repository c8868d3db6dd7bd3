"""Process-level setup: device choice, seeding, determinism."""

from __future__ import annotations

import importlib
import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from trainer.config import ACCELERATORS, PRECISIONS
from trainer.errors import ConfigError


def select_device(accelerator: str) -> torch.device:
    """auto picks cuda > mps > cpu; an explicit choice that is not there is an error."""
    if accelerator not in ACCELERATORS:
        raise ConfigError(
            f"trainer.accelerator={accelerator!r} is not one of {', '.join(ACCELERATORS)}"
        )
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if accelerator == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if accelerator == "cuda" and not cuda:
        raise ConfigError(
            "trainer.accelerator=cuda but no CUDA GPU is visible to PyTorch; "
            "use trainer.accelerator=auto or cpu"
        )
    if accelerator == "mps" and not mps:
        raise ConfigError(
            "trainer.accelerator=mps but MPS is not available; use trainer.accelerator=auto or cpu"
        )
    return torch.device(accelerator)


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"trainer.precision=fp16 needs a CUDA GPU but the device is {device.type}; "
            "use trainer.precision=bf16 or 32"
        )


def seed_everything(seed: int, deterministic: bool = False) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too
    if deterministic:
        # cuBLAS needs this set before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


@contextmanager
def imported_in_background(module: str) -> Iterator[None]:
    """Import `module` on a helper thread while the body runs; wait for it at the end.

    An import is mostly pure Python and holds the GIL, but it overlaps with work
    that releases it: file reads, decompression, hashing, tensor ops. The body must
    not import torch modules itself: two threads importing into one package at
    once can deadlock on Python's per-module import locks. A failed import is left
    for the caller's own later import to raise.
    """

    def run() -> None:
        try:
            importlib.import_module(module)
        except Exception:
            pass

    thread = threading.Thread(target=run, name=f"import {module}")
    thread.start()
    try:
        yield
    finally:
        thread.join()
