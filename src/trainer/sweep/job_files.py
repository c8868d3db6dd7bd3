"""What a sweep job leaves in its folder when it fails, and how a sweep finds it again.

Jobs may run in other processes (submitit, joblib), so the sweep callback, the
SLURM launcher and the Optuna sweeper read failures back from the job folders.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

from trainer.errors import UserError

ERROR_FILE = "error.txt"
REFUSED_DIR = ".refused"  # in the sweep folder: one file per refused job, this invocation
RESULTS_FILE = "results.json"


def record_failure(
    output_dir: Path, error: BaseException, job: dict[str, Any], error_file: bool = True
) -> str:
    """Write the error next to whatever the job already wrote; returns its one-line form.

    `error_file=False`: results.json only, for a job of an earlier sweep found dead, which
    this sweep's failure count must not include."""
    line = f"{type(error).__name__}: {error}"
    output_dir.mkdir(parents=True, exist_ok=True)
    detail = line if isinstance(error, UserError) else "".join(traceback.format_exception(error))
    if error_file:
        (output_dir / ERROR_FILE).write_text(detail.rstrip() + "\n")
    results_path = output_dir / RESULTS_FILE
    # A job that failed after writing its results keeps them.
    results = read_json(results_path) if results_path.is_file() else {}
    results.update({**job, "status": "failed", "error": line})
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    return line


def read_json(path: Path) -> dict[str, Any]:
    """A job's JSON file; {} when it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def failed_jobs(sweep_dir: Path, since: float = 0.0) -> list[tuple[Path, str]]:
    """(folder, error line) of every job under `sweep_dir` that failed or was refused
    after `since`."""
    failed = []
    for error_file in sorted(sweep_dir.glob(f"*/{ERROR_FILE}")):
        if error_file.stat().st_mtime < since:
            continue
        # A traceback ends with the `Type: message` line that a user error consists of.
        lines = error_file.read_text().strip().splitlines() or ["unknown error"]
        failed.append((error_file.parent, lines[-1]))
    for note in sorted((sweep_dir / REFUSED_DIR).glob("*")):
        if note.stat().st_mtime >= since:
            failed.append((sweep_dir / note.name, note.read_text().strip()))
    return failed


def launched_jobs(sweep_dir: Path, since: float = 0.0) -> int:
    """Jobs of the sweep launched after `since`, those skipped as finished included:
    Hydra rewrites every launched job's .hydra/overrides.yaml."""
    files = sweep_dir.glob("*/.hydra/overrides.yaml")
    return sum(1 for p in files if p.stat().st_mtime >= since)
