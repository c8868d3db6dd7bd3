"""Sweeps on a real SLURM cluster: `hydra/launcher=submitit_slurm` with real jobs.

Needs a running slurmctld/slurmd with an idle node in partition `debug`:
`scripts/slurm_cluster.sh start` (as root; .ci/run starts it). Without one, every
test here is skipped with the reason. The cluster has no accounting (sacct fails),
as many small clusters, and a short credential lifetime (cred_expire=5), so a
requeued job starts again within seconds instead of two minutes (docs/slurm.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import DATA_DIR, REPO, require_data, run_cli
from tests.readme_commands import readme_args
from trainer.checkpoint.io import load_checkpoint

# Marks (and needs) a running cluster: skipped with the reason where there is none.
on_cluster = pytest.mark.usefixtures("slurm")

TRAIN = str(REPO / "train.py")
LAUNCHER = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug"]
# 200 optimizer steps of an MLP with dropout, within the first epoch (859 steps): no
# epoch-end or periodic checkpoint, so a checkpoint mid-run can only come from a signal.
TRAINING = [
    "model.hidden_sizes=[32]",
    "data.batch_size=64",
    "model.dropout=0.2",
    "trainer.max_steps=200",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=25",
    "trainer.deterministic=true",
    "trainer.progress_bar=false",
]
# Slows each training step down (sleep in the loss, same numbers), so that a signal
# finds the job training.
SLOW = ["loss._target_=trainer.testing.FaultInjectingLoss"]
QUEUE_TIMEOUT_S = 600
# submitit's folder per job: `<id>`, or `<array id>_<task>` for the jobs of a sweep.
JOB_ID = re.compile(r"\d+(_\d+)?")


def slurm_unavailable() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (no sinfo); run scripts/slurm_cluster.sh start as root"
    proc = subprocess.run(
        ["sinfo", "-h", "-p", "debug", "-o", "%T"], capture_output=True, text=True, timeout=30
    )
    states = proc.stdout.split()
    if proc.returncode != 0 or not {"idle", "mixed"} & set(states):
        why = (proc.stderr.strip() or f"node states {states}").splitlines()[-1]
        return f"no idle SLURM node in partition debug ({why}); run scripts/slurm_cluster.sh start"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    require_data()


@pytest.fixture
def start_sweep() -> Iterator[Callable[..., subprocess.Popen]]:
    """Starts `train.py -m` on the cluster; a sweep left running is ended, its jobs cancelled."""
    started: list[tuple[subprocess.Popen, Path]] = []

    def start(sweep_dir: Path, *args: str) -> subprocess.Popen:
        env = {**os.environ, "TRAINER_DATA_DIR": str(DATA_DIR)}
        env.pop("HYDRA_FULL_ERROR", None)
        proc = subprocess.Popen(
            [sys.executable, TRAIN, "-m", *args, f"hydra.sweep.dir={sweep_dir}"],
            cwd=sweep_dir.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append((proc, sweep_dir))
        return proc

    yield start
    for proc, sweep_dir in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        ids = [p.name for p in (sweep_dir / ".submitit").glob("*") if JOB_ID.fullmatch(p.name)]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def readme_sweep(run_id_or_option: str) -> list[str]:
    """The overrides of the README's SLURM line that holds this option (a test runs each;
    the README's own test skips them)."""
    return readme_args("python train.py -m", *LAUNCHER, run_id_or_option)


def finish(proc: subprocess.Popen, timeout: float = QUEUE_TIMEOUT_S) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the sweep did not end in {timeout} s:\n{err[-3000:]}")


def wait_for(what: str, check: Callable[[], object], timeout: float = 120) -> object:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def slurm_job_ids(sweep_dir: Path, count: int) -> list[str]:
    """The SLURM ids of the sweep's jobs in job order (`<array>_<task>`, task = job)."""

    def ids() -> list[str]:
        folders = [p.name for p in (sweep_dir / ".submitit").glob("*") if JOB_ID.fullmatch(p.name)]
        # An array also gets a folder of its own id, next to its tasks' `<id>_<task>`.
        tasks = [name for name in folders if "_" in name] or folders
        return sorted(tasks, key=lambda name: int(name.rpartition("_")[2]))

    wait_for(f"{count} SLURM jobs", lambda: len(ids()) == count)
    return ids()


def running_since(job_id: str) -> str | None:
    """The start time of the job's current run, None while it is not running."""
    info = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30
    ).stdout.split()
    if "JobState=RUNNING" not in info:
        return None
    return next(x for x in info if x.startswith("StartTime="))


def training_started(folder: Path) -> bool:
    log = folder / "train.log"
    return log.is_file() and "training MLP" in log.read_text()


def the_job(sweep_dir: Path) -> Path:
    (folder,) = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()]
    return folder


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def assert_same_weights(expected: Path, actual: Path) -> None:
    a = load_checkpoint(expected / "checkpoints" / "last.pt")
    b = load_checkpoint(actual / "checkpoints" / "last.pt")
    assert a["global_step"] == b["global_step"] == 200
    assert a["model"].keys() == b["model"].keys()
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert results(expected)["metrics"] == results(actual)["metrics"]


@pytest.fixture(scope="module")
def straight(slurm: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, outside SLURM."""
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = run_cli([TRAIN, *TRAINING, f"hydra.run.dir={run}"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.slurm
@pytest.mark.slow
@on_cluster
def test_two_job_sweep_writes_folders_results_tensorboard_and_report(
    tmp_path: Path, start_sweep: Callable[..., subprocess.Popen]
) -> None:
    sweep_dir = tmp_path / "sweep"
    # The README's SLURM line (a short run on this cluster's partition).
    proc = start_sweep(sweep_dir, *readme_sweep("trainer=debug"), "trainer.progress_bar=false")
    out, err = finish(proc)
    assert proc.returncode == 0, err[-3000:]
    folders = sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())
    assert [f.name.split("optimizer.lr=")[1].split(",")[0] for f in folders] == ["0.001", "0.003"]
    for folder in folders:
        assert results(folder)["status"] == "completed"
        assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    # Each ran as a task of one SLURM array job.
    assert len(slurm_job_ids(sweep_dir, 2)) == 2
    # Without accounting (as on the test cluster): said once, not three times per poll.
    from trainer.sweep.slurm import accounting_error

    if accounting_error():
        assert (out + err).count("SLURM accounting is off") == 1
        assert "Bypassing sacct error" not in out + err
    report = run_cli([str(REPO / "scripts" / "sweep_report.py"), str(sweep_dir)], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "optimizer.lr=0.003" in report.stdout and (sweep_dir / "sweep_report.csv").is_file()


@pytest.mark.slurm
@pytest.mark.slow
@on_cluster
def test_requeue_of_a_running_job_checkpoints_exits_75_and_resumes_exactly(
    straight: Path, tmp_path: Path, start_sweep: Callable[..., subprocess.Popen]
) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = start_sweep(
        sweep_dir,
        *readme_sweep("run_id=preempted"),
        *TRAINING,
        *SLOW,
        "+loss.sleep_s=0.05",
    )
    (job_id,) = slurm_job_ids(sweep_dir, 1)
    folder = wait_for("training", lambda: next(iter(sweep_dir.glob("*/train.log")), None)).parent
    wait_for("training to start", lambda: training_started(folder))
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    out, err = finish(proc)
    assert proc.returncode == 0, err[-3000:]
    log = (folder / "train.log").read_text()
    assert "SIGTERM received" in log
    # The first run saved its step and exited 75; SLURM ran the job again, which resumed.
    resumed_from = results(folder)["resumed_from"]
    assert resumed_from and "step_" in resumed_from, resumed_from
    assert_same_weights(straight, folder)


@pytest.mark.slurm
@pytest.mark.slow
@on_cluster
def test_time_limit_signal_checkpoints_then_the_job_is_requeued_and_resumes_exactly(
    straight: Path, tmp_path: Path, start_sweep: Callable[..., subprocess.Popen]
) -> None:
    sweep_dir = tmp_path / "sweep"
    # SLURM's shortest limit, 1 minute; submitit asks for SIGUSR2 10 s before it. SLURM
    # sends it when it next checks the limits (once a minute here), 20-80 s into the job.
    # The first run, 200 steps of 0.5 s, outlasts that: the trainer saves on SIGUSR2, then
    # submitit requeues the job, whose next run trains at full speed to the end.
    proc = start_sweep(
        sweep_dir,
        *readme_sweep("run_id=timed_out"),
        *TRAINING,
        *SLOW,
        "+loss.sleep_s=0.5",
        "+loss.sleep_in_first_run_only=true",
    )
    (job_id,) = slurm_job_ids(sweep_dir, 1)
    first_start = wait_for("the job to start", lambda: running_since(job_id), 300)
    # Its next run may take longer than a minute on a busy machine: give it 10 (as root),
    # once it runs (a requeue puts back the limit the job was submitted with).
    wait_for("the next run", lambda: running_since(job_id) not in (None, first_start), 300)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True)
    out, err = finish(proc)
    assert proc.returncode == 0, err[-3000:]
    folder = the_job(sweep_dir)
    log = (folder / "train.log").read_text()
    assert "SIGUSR2 received" in log
    resumed_from = results(folder)["resumed_from"]
    assert resumed_from and "step_" in resumed_from, resumed_from
    # submitit's handler ran after the save, and requeued the job.
    submitit_logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_log.*"))
    assert "Requeued job" in submitit_logs
    assert_same_weights(straight, folder)


@pytest.mark.slurm
@pytest.mark.slow
@on_cluster
def test_cancelled_job_fails_in_one_line_and_the_other_completes(
    tmp_path: Path, start_sweep: Callable[..., subprocess.Popen]
) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = start_sweep(
        sweep_dir,
        *LAUNCHER,
        "hydra.launcher.timeout_min=10",
        "trainer=debug",
        "model.hidden_sizes=[32]",
        "trainer.progress_bar=false",
        *SLOW,
        "+loss.sleep_s=60,0",
    )
    slow_job, _ = slurm_job_ids(sweep_dir, 2)
    slow = wait_for(
        "the slow job to train",
        lambda: next((f.parent for f in sweep_dir.glob("*sleep_s=60*/train.log")), None),
    )
    wait_for("training to start", lambda: training_started(slow))
    subprocess.run(["scancel", slow_job], check=True, timeout=30)
    out, err = finish(proc)
    assert proc.returncode == 1, err[-3000:]
    assert "error: 1 of 2 jobs failed" in err
    (line,) = [x for x in err.splitlines() if x.startswith(f"  {slow.name}: ")]
    assert f"SLURM job {slow_job} ended CANCELLED" in line
    assert results(slow)["status"] == "failed"
    (fast,) = [p for p in sweep_dir.glob("*sleep_s=0*") if (p / ".hydra").is_dir()]
    assert results(fast)["status"] == "completed"


@pytest.mark.slurm
@pytest.mark.slow
@on_cluster
def test_two_devices_inside_one_slurm_task(
    tmp_path: Path, start_sweep: Callable[..., subprocess.Popen]
) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = start_sweep(
        sweep_dir,
        *LAUNCHER,
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.tasks_per_node=1",
        "trainer=debug",
        "model.hidden_sizes=[32]",
        "trainer.progress_bar=false",
        "trainer.devices=2",
    )
    out, err = finish(proc)
    assert proc.returncode == 0, err[-3000:]
    result = results(the_job(sweep_dir))
    assert result["status"] == "completed" and result["world_size"] == 2


def test_submitit_signal_sets_the_flag_and_its_handler_runs_after_the_save() -> None:
    """submitit's SIGUSR2 handler (which requeues) runs once the trainer has stopped."""
    from submitit.core.job_environment import JobEnvironment

    from trainer.loop.preemption import PreemptionHandler

    signum = getattr(signal, f"SIG{JobEnvironment.USR_SIG}")
    calls = []

    def requeue(num: int, frame: object) -> None:
        calls.append(num)
        sys.exit(-1)  # as submitit's handler does after `scontrol requeue`

    previous = signal.signal(signum, requeue)
    try:
        with PreemptionHandler() as handler:
            os.kill(os.getpid(), signum)
            assert handler.requested and handler.signal_name == "SIGUSR2" and calls == []
            handler.agreed = True  # the trainer stopped at a step boundary and saved
        assert calls == [signum]
        assert signal.getsignal(signum) is requeue
        # A run that ends without having stopped for the signal does not requeue.
        with PreemptionHandler():
            pass
        assert calls == [signum]
    finally:
        signal.signal(signum, previous)


def test_submitit_sacct_error_is_shown_once_per_process() -> None:
    import logging

    from trainer.sweep.slurm import quiet_submitit_logging

    logger = logging.getLogger("submitit")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        quiet_submitit_logging()
        quiet_submitit_logging()  # a second sweep in the process adds no second filter
        for call in (1, 2, 3):
            logger.warning(f"Call #{call} - Bypassing sacct error (exit 1), status may be wrong.")
            logger.warning(f"job {call} is running")
    finally:
        logger.removeHandler(handler)
    assert seen == [
        "Call #1 - Bypassing sacct error (exit 1), status may be wrong.",
        "job 1 is running",
        "job 2 is running",
        "job 3 is running",
    ]
