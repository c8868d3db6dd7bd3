"""What every README figure is stamped with: when, on what machine, from which commit.

The bench scripts print their README rows with `--markdown`; `provenance()` is the
line that goes above each table, so a figure always says where it came from.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
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
