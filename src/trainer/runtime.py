"""Process-level setup: device choice, seeding, determinism."""

from __future__ import annotations

import importlib
import os
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from trainer.config.schema import ACCELERATORS, PRECISIONS
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


AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Without native bf16 instructions oneDNN emulates it, slower than fp32.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 where the device runs it natively, else 32; the rest as given."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "32"
    return precision


def autocast_context(
    precision: str, device: torch.device
) -> Callable[[], AbstractContextManager[object]]:
    """A factory of the autocast context for `precision` (a no-op for 32)."""
    dtype = AUTOCAST_DTYPES[resolve_precision(precision, device)]
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


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
