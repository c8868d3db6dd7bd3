"""What a run needs to be reproduced, recorded in results.json and TensorBoard's text tab."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def provenance(cfg: DictConfig, device: Any, world_size: int) -> dict[str, Any]:
    """The command line, resolved config, code version, library versions, device, seed."""
    import torch

    return {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git": git_state(Path(__file__).resolve().parent),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "hydra-core": _version("hydra-core"),
            "trainer": _version("trainer"),
        },
        "device": _device_name(device),
        "world_size": world_size,
        "cpu_threads": torch.get_num_threads(),
        "seed": cfg.seed,
    }


def git_state(folder: Path) -> dict[str, Any] | None:
    """The commit and a dirty flag of the repository holding `folder`; None outside one."""
    try:
        commit = _git(folder, "rev-parse", "HEAD")
        dirty = bool(_git(folder, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({platform.processor() or platform.machine()})"
