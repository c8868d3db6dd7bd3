"""Multirun bookkeeping: readable job folders, failed jobs recorded, a sweep exit code.

`SweepCallback` is a Hydra callback (configs/hydra/default.yaml,
`hydra.callbacks.sweep`). In a multirun it

- writes a failed job's error into its own folder (`error.txt`, and
  `results.json` with `"status": "failed"`), so the report can mark it;
- leaves the folder of a job that was refused because an earlier run's files
  are there (rerun without resume=auto) as it was: the refusal is noted in
  `<sweep dir>/.refused/` instead;
- lets the sweep go on (`continue_on_error: true`): Hydra's sweepers re-raise
  a failed job's exception and stop, so the callback hands the sweeper a
  completed job with no value instead; with `false` the sweep stops there;
- exits with code 1 at the end of the sweep if any of its jobs failed.

Jobs may run in other processes (submitit, joblib), so failures are found
again from the job folders, not from memory.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from trainer.errors import RunDirInUseError, UserError
from trainer.sweep.job_files import (
    ERROR_FILE,
    REFUSED_DIR,
    failed_jobs,
    launched_jobs,
    record_failure,
)

log = logging.getLogger(__name__)

EXIT_JOBS_FAILED = 1
# Longer folder names are cut and given a hash: file systems allow 255 bytes.
MAX_DIRNAME = 150
# hydra/launcher=submitit_slurm: run by trainer.slurm.SlurmLauncher instead (see there).
PLUGIN_SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
_UNSAFE = re.compile(r"[^A-Za-z0-9=,.+\-_\[\]~@]")
# Optuna suggests floats like 0.0019960425587510337: four significant digits name them.
_LONG_FLOAT = re.compile(r"(?<![\w.])\d+\.\d{5,}(?:e-?\d+)?")


def sweep_subdir(override_dirname: str, job_num: Any = None) -> str:
    """A sweep job's folder, and its TensorBoard run name under `--logdir <sweep dir>`.

    Without `job_num` (grid sweeps): the job's sorted overrides, so a rerun of the
    sweep finds each job by what it runs; a name that had to be made safe (a `/`
    in a value) or cut gets a hash of the whole, so names stay unique.
    With `job_num` (Optuna: the trial number): `<num>_<overrides>` with floats
    shortened, unique by the number.
    """
    text = str(override_dirname)
    if job_num is not None:
        name = _UNSAFE.sub("_", _LONG_FLOAT.sub(lambda m: f"{float(m.group()):.4g}", text))
        name = f"{job_num}_{name}" if name else str(job_num)
        return name[:MAX_DIRNAME]
    if not text:
        return "default"
    name = _UNSAFE.sub("_", text)
    if name != text or len(name) > MAX_DIRNAME:
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        name = f"{name[: MAX_DIRNAME - 11]}-{digest}"
    return name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("sweep_subdir"):
        OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir)


def is_multirun(config: DictConfig) -> bool:
    return config.hydra.mode == RunMode.MULTIRUN


class SweepCallback(Callback):
    def __init__(self, continue_on_error: bool = True) -> None:
        self.continue_on_error = continue_on_error
        self._started = 0.0
        self._before: dict[Path, bytes | int] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A continued sweep reuses its folder: only this invocation's failures count.
        self._started = time.time() - 1.0
        if OmegaConf.select(config, "hydra.launcher._target_") == PLUGIN_SLURM_LAUNCHER:
            from trainer.sweep.slurm import use_trainer_launcher

            use_trainer_launcher(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        for note in (sweep_dir / REFUSED_DIR).glob("*"):
            note.unlink(missing_ok=True)
        # Hydra rewrites a job's .hydra/*.yaml and appends to its log before the job can be
        # refused: what they held is kept here to put back (jobs run in this process).
        self._before = {}
        for path in sweep_dir.glob("*/.hydra/*.yaml"):
            self._before[path] = path.read_bytes()
        for path in sweep_dir.glob("*/*.log"):
            self._before[path] = path.stat().st_size

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not is_multirun(config):
            return
        output_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status != JobStatus.FAILED:
            # A rerun of a sweep reuses job folders: an earlier failure is no longer this job's
            # (its results.json the job replaced, or found finished).
            (output_dir / ERROR_FILE).unlink(missing_ok=True)
            return
        error = job_return._return_value
        if isinstance(error, RunDirInUseError):
            # Refused before it wrote anything: the earlier run's files stay as they were.
            line = f"{type(error).__name__}: {error}"
            self._put_back(output_dir)
            refused = Path(config.hydra.sweep.dir) / REFUSED_DIR
            refused.mkdir(parents=True, exist_ok=True)
            (refused / output_dir.name).write_text(line + "\n")
            print(f"job {config.hydra.job.num} refused: {error}", file=sys.stderr, flush=True)
        else:
            job = {"job_num": config.hydra.job.num, "overrides": list(job_return.overrides or [])}
            line = record_failure(output_dir, error, job)
            if isinstance(error, UserError):
                log.error("job %s failed: %s", config.hydra.job.num, line)
            else:
                log.error("job %s failed", config.hydra.job.num, exc_info=error)
        if not self.continue_on_error:
            print(f"error: {line} (in {output_dir}); stopping the sweep", file=sys.stderr)
            raise SystemExit(EXIT_JOBS_FAILED)
        # The sweeper would re-raise the error and stop: hand it a finished job with no value.
        job_return.status = JobStatus.COMPLETED
        job_return.return_value = None

    def _put_back(self, output_dir: Path) -> None:
        for path, before in self._before.items():
            if path.parent not in (output_dir, output_dir / ".hydra"):
                continue
            if isinstance(before, bytes):
                path.write_bytes(before)
            else:
                with path.open("r+b") as f:
                    f.truncate(before)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failed_jobs(sweep_dir, since=self._started)
        if not failed:
            return
        total = launched_jobs(sweep_dir, self._started)
        print(
            f"error: {len(failed)} of {max(total, len(failed))} jobs failed; "
            f"the others' results are in {sweep_dir} (errors in <job>/{ERROR_FILE}):",
            file=sys.stderr,
        )
        for folder, line in failed:
            print(f"  {folder.name}: {line}", file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(EXIT_JOBS_FAILED)
