"""What every README figure is stamped with: when, on what machine, from which commit.

The bench scripts print their README rows with `--markdown`; `provenance()` is the
line that goes above each table, so a figure always says where it came from.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The short commit hash, with `-dirty` when tracked files differ from it."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=10"],
            cwd=REPO, capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return done.stdout.strip()


def machine() -> str:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    accel = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cores} CPU cores ({platform.machine()}), {accel}, PyTorch {torch.__version__}"


def provenance() -> str:
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return f"Measured {today} on {machine()}, commit `{git_commit()}`."


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


@contextlib.contextmanager
def recipe_run(experiment: str, overrides: list[str]) -> Iterator[tuple[Path, float, float]]:
    """`python train.py experiment=<name>` as a user runs it, into a temporary folder that
    lives while the caller reads it: yields (run folder, launch time, wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        launched = time.time()
        subprocess.run(
            [sys.executable, str(REPO / "train.py"), f"experiment={experiment}",
             f"hydra.run.dir={run_dir}", "trainer.progress_bar=false", *overrides],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        yield run_dir, launched, time.time() - launched
