"""The SLURM launcher (`hydra/launcher=submitit_slurm`): submitit's, with two changes.

trainer.sweep.SweepCallback swaps this class in for the plugin's when a sweep
starts (use_trainer_launcher), so the plugin's config, keys and defaults stay as
they are and `hydra/launcher=submitit_slurm` gets:

- A job that ends without a result (`scancel`, killed for memory, node failure,
  preempted and not requeued) is one failed job of the sweep, recorded in its
  folder like any failed job (trainer.sweep), while the other jobs go on. The
  plugin's launcher raises on the first such job and the sweep stops with a
  traceback, not waiting for the others.
- Where SLURM accounting is off, `sacct` fails and submitit cannot tell a
  cancelled job from a running one (it waits forever), printing "Bypassing
  sacct error ... status may be inaccurate" several times per poll. Job states
  then come from `squeue`, and that is said once.

The job side is unchanged: each job runs in submitit's process, whose SIGUSR2
handler requeues the job after the trainer saved its checkpoint (trainer.loop.preemption).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

# squeue states after which a job will not run again (a requeued job is PENDING again).
ENDED_STATES = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "TIMEOUT",
}
# Seconds between job state polls: short at first (short jobs, tests), then at most this.
MAX_POLL_S = 15.0
# A job that ended may take a moment to show its result file on a network file system.
RESULT_GRACE_S = 5.0
SACCT_ERROR = "Bypassing sacct error"


class JobEnded(Exception):
    """A SLURM job ended without a result: cancelled, killed, or failed outside Python."""


class SacctErrorOnce(logging.Filter):
    """Lets submitit's "Bypassing sacct error" through once per process, not every poll."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if SACCT_ERROR not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def quiet_submitit_logging() -> None:
    """Install SacctErrorOnce on submitit's logger (once)."""
    logger = logging.getLogger("submitit")
    if not any(isinstance(f, SacctErrorOnce) for f in logger.filters):
        logger.addFilter(SacctErrorOnce())


def use_trainer_launcher(config: DictConfig) -> None:
    """Point the sweep's `hydra.launcher` at our launcher (called before Hydra builds it)."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.trainer_slurm_launcher.slurm_launcher import TARGET, SlurmLauncher

    # Hydra's plugin scan misses hydra_plugins packages of editable installs.
    Plugins.instance().register(SlurmLauncher)
    with read_write(config.hydra.launcher), open_dict(config.hydra.launcher):
        config.hydra.launcher._target_ = TARGET


def accounting_error() -> str | None:
    """Why `sacct` cannot report job states here, or None if it can."""
    try:
        proc = subprocess.run(
            ["sacct", "-n", "-X", "-j", "1", "-o", "JobID"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"sacct exited with code {proc.returncode}"


def squeue_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """State of each job (`<array id>_<task>` or `<id>`) that squeue still knows; None
    when squeue cannot answer now (the controller restarting, a timeout)."""
    array_ids = sorted({job_id.split("_")[0] for job_id in job_ids})
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(array_ids)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("squeue failed (%s); asking again", e)
        return None
    # squeue fails with "Invalid job id" when it knows none of them (all ended long ago).
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        log.warning("squeue failed (%s); asking again", proc.stderr.strip())
        return None
    states = {}
    for line in proc.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        states[job_id] = state
    return states


def launch(
    launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """Submit one SLURM job per override list, wait for all, return their results.

    The executor is set up as the plugin's launch() does (hydra-submitit-launcher 1.2).
    """
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    assert launcher.config is not None
    quiet_submitit_logging()
    params, cluster = launcher.params, "slurm"
    init_keys = {"max_num_timeout", "submitit_folder"}
    executor = submitit.AutoExecutor(
        cluster=cluster,
        folder=params["submitit_folder"],
        **{f"{cluster}_{k}": v for k, v in params.items() if k == "max_num_timeout"},
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{k if k in base else f"{cluster}_{k}": v for k, v in params.items() if k not in init_keys}
    )
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    log.info("Submitit '%s' sweep output dir : %s", cluster, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(launcher.config.hydra.sweep.mode), 8))
    job_params = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        state = Singleton.get_state()
        job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", state))
    jobs = executor.map_array(launcher, *zip(*job_params, strict=True))
    ended = wait_for_jobs(jobs)
    return [
        _result(launcher, job, list(overrides), initial_job_idx + i, ended[i])
        for i, (job, overrides) in enumerate(zip(jobs, job_overrides, strict=True))
    ]


def _result(
    launcher: Any, job: Any, overrides: list[str], idx: int, state: str | None
) -> JobReturn:
    import submitit

    if job.paths.result_pickle.exists():
        try:
            return job.results()[0]
        except submitit.core.utils.UncompletedJobError as e:
            # submitit's message ends with the job's own error line, after its traceback.
            lines = [x for x in str(e).strip().splitlines() if x.strip()] or ["no error text"]
            error = JobEnded(f"SLURM job {job.job_id} failed: {lines[-1].strip()}")
    else:
        error = JobEnded(
            f"SLURM job {job.job_id} ended {state or 'without a result'} before finishing "
            f"(its log: {job.paths.stderr})"
        )
    return _failed(launcher, overrides, idx, error)


def _failed(launcher: Any, overrides: list[str], idx: int, error: Exception) -> JobReturn:
    """Record the job as failed in its folder, as the job itself would have."""
    from trainer.sweep.job_files import record_failure

    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    folder = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
    line = record_failure(folder, error, {"job_num": idx, "overrides": overrides})
    log.error("job %d failed: %s", idx, line)
    # As trainer.sweep.SweepCallback does: the sweep goes on and exits 1 at its end.
    ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
    ret.return_value = None
    return ret


def wait_for_jobs(jobs: Sequence[Any]) -> list[str | None]:
    """Wait until every job has a result or has ended; returns the last state of each job
    (from squeue or sacct), None for jobs that left a result."""
    error = accounting_error()
    if error:
        log.warning(
            "SLURM accounting is off (sacct: %s): job states come from squeue instead", error
        )
    pending = dict(enumerate(jobs))
    ended: list[str | None] = [None] * len(jobs)
    started, gone = time.time(), {}
    while pending:
        states = squeue_states([job.job_id for job in pending.values()]) if error else {}
        for i, job in list(pending.items()):
            if job.paths.result_pickle.exists():
                del pending[i]
            elif not error:
                if job.done():
                    ended[i] = job.state  # from sacct
                    del pending[i]
            elif states is None:
                continue
            elif states.get(job.job_id) in ENDED_STATES or job.job_id not in states:
                # Ended (or forgotten by squeue): give its result file a moment to show.
                since = gone.setdefault(i, time.time())
                if time.time() - since >= RESULT_GRACE_S:
                    ended[i] = states.get(job.job_id)
                    del pending[i]
            else:
                gone.pop(i, None)
        if pending:
            time.sleep(min(MAX_POLL_S, max(1.0, (time.time() - started) / 10)))
    return ended
