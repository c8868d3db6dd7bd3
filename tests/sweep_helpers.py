"""Reading a finished sweep's folder: its job folders, their results, its report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests.conftest import REPO, run_cli

REPORT = str(REPO / "scripts" / "sweep_report.py")


def job_folders(sweep_dir: Path) -> list[Path]:
    """Job folders in launch order (hydra.job.num)."""
    from omegaconf import OmegaConf

    folders = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()]
    return sorted(folders, key=lambda p: OmegaConf.load(p / ".hydra" / "hydra.yaml").hydra.job.num)


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def report(sweep_dir: Path, *args: str) -> tuple[str, list[dict[str, str]]]:
    proc = run_cli([REPORT, str(sweep_dir), *args], cwd=sweep_dir.parent)
    assert proc.returncode == 0, proc.stderr
    with (sweep_dir / "sweep_report.csv").open() as f:
        return proc.stdout, list(csv.DictReader(f))
