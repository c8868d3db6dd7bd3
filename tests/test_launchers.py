"""What each launcher does when it is signalled or killed: `trainer.devices=2` and torchrun.

Real processes and real signals: the launcher of two CPU workers is sent SIGTERM, SIGUSR1
(alone or with its whole process group) or SIGKILL; a torchrun rank is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR, REPO, require_data, run_cli
from tests.test_distributed import spawned_workers
from trainer.loop.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER

pytestmark = pytest.mark.slow

# 40 steps of a small MLP, slowed to ~0.1 s a step so a signal lands mid-run.
RUN = [
    "model.hidden_sizes=[32]",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=40",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=2",
    "trainer.progress_bar=false",
    "trainer.test_after_fit=false",
    "logger=none",
    "loss._target_=trainer.testing.FaultInjectingLoss",
    "+loss.sleep_s=0.1",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    """Start a launcher in its own process group (as a scheduler's job step is)."""
    env = {**os.environ, "TRAINER_DATA_DIR": str(DATA_DIR)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(proc: subprocess.Popen, text: str, seen: list[str]) -> None:
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError("".join(seen)[-3000:])


def finish(proc: subprocess.Popen, seen: list[str]) -> str:
    out, _ = proc.communicate(timeout=240)
    return "".join(seen) + out


def rank_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the processes under this launcher."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == launcher:
            for var in environ:
                if var.startswith(b"RANK="):
                    ranks[int(var[5:])] = int(proc.name)
    return ranks


@pytest.mark.parametrize(
    ("signum", "whole_group"), [(signal.SIGTERM, False), (signal.SIGUSR1, True)]
)
def test_signal_to_the_launcher_of_two_workers_saves_and_exits_75(
    tmp_path: Path, signum: signal.Signals, whole_group: bool
) -> None:
    """Alone or with its process group (the workers then get it twice: directly and
    forwarded), the launcher's signal ends in one save, one line and exit 75."""
    require_data()
    before = spawned_workers(tmp_path)
    cmd = [sys.executable, str(REPO / "train.py"), *RUN, "trainer.devices=2", "hydra.run.dir=run"]
    proc, seen = start(cmd, tmp_path), []
    wait_for(proc, "first optimizer step done", seen)
    if whole_group:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    out = finish(proc, seen)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    preempted = [line for line in out.splitlines() if line.startswith("preempted:")]
    assert len(preempted) == 1 and signum.name in preempted[0], out[-3000:]
    assert out.count(f"{signum.name} received") == 1, "only rank 0 logs"
    assert "Traceback" not in out and "resource_tracker" not in out
    run = tmp_path / "run"
    saved = preempted[0].split(" to ")[1].split(";")[0]
    assert Path(saved).is_file() and not (run / "results.json").exists()
    assert (run / PREEMPTED_MARKER).read_text().strip() == preempted[0][len("preempted: ") :]
    assert spawned_workers(tmp_path) - before == set(), "workers outlived their launcher"


def test_workers_die_with_a_sigkilled_launcher_and_resume_continues(tmp_path: Path) -> None:
    require_data()
    before = spawned_workers(tmp_path)
    cmd = [sys.executable, str(REPO / "train.py"), *RUN, "trainer.devices=2"]
    cmd += ["checkpoint.every_n_steps=4", "hydra.run.dir=run"]
    proc, seen = start(cmd, tmp_path), []
    wait_for(proc, "first optimizer step done", seen)
    while not list((tmp_path / "run" / "checkpoints").glob("step_*.pt")):
        time.sleep(0.05)
    workers = spawned_workers(tmp_path) - before
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while spawned_workers(tmp_path) & workers and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not spawned_workers(tmp_path) & workers, "workers outlived their SIGKILLed launcher"
    assert not (tmp_path / "run" / "results.json").exists()
    done = run_cli([*cmd[1:], "resume=auto"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resumed from" in log and "step_" in log.split("resumed from")[1].splitlines()[0]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 40


def test_torchrun_rank_killed_gives_one_error_line(tmp_path: Path) -> None:
    require_data()
    cmd = [*TORCHRUN, str(REPO / "train.py"), *RUN, "hydra.run.dir=run"]
    proc, seen = start(cmd, tmp_path), []
    wait_for(proc, "first optimizer step done", seen)
    os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)
    out = finish(proc, seen)
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 0 lost its process group" in errors[0], out[-3000:]
    # torchrun's own ChildFailedError summary follows; the rank printed no traceback.
    assert "[rank0]" not in out and "Error executing job" not in out, out[-3000:]


def test_torchrun_preempted_marks_the_run_folder_for_requeue(tmp_path: Path) -> None:
    """torchrun exits 1 whatever its ranks return: the documented requeue test is the
    PREEMPTED file in the run folder. Rank 1's NaN-skip warning and preempted line are
    not printed: one line per event, rank 0's."""
    require_data()
    nan = ["trainer.nan_policy=skip", "+loss.nan_at_batches=[3]", "+loss.nan_on_ranks=[1]"]
    cmd = [*TORCHRUN, str(REPO / "train.py"), *RUN, *nan, "run_id=job"]
    proc, seen = start(cmd, tmp_path), []
    wait_for(proc, "optimizer step skipped", seen)
    os.kill(proc.pid, signal.SIGTERM)  # to torchrun alone, as a scheduler does
    out = finish(proc, seen)
    assert proc.returncode == 1, out[-3000:]  # torchrun's, not 75
    run = tmp_path / "outputs" / "job"
    assert (run / PREEMPTED_MARKER).is_file(), out[-3000:]
    assert len([ln for ln in out.splitlines() if ln.startswith("preempted:")]) == 1
    assert out.count("optimizer step skipped") == 1, out[-3000:]
    # The docs' recipe: while the marker is there, run the same command with resume=auto
    # (without the injected NaN, which would strike the new process's batch 3 again).
    rerun = [arg for arg in cmd if arg not in nan]
    done = run_cli([*rerun, "resume=auto"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 39 and results["nan_skipped_steps"] == 1
    assert not (run / PREEMPTED_MARKER).exists()


def test_submitit_job_preempted_without_requeue_ends_the_sweep_with_75(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    require_data()
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", *RUN, "hydra/launcher=submitit_local"]
    cmd += ["hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep_dir}"]
    proc = start(cmd, tmp_path)
    deadline = time.monotonic() + 300
    while not list(sweep_dir.glob("*/checkpoints")) and not list(sweep_dir.glob("*/train.log")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    (job_dir,) = [p.parent for p in sweep_dir.glob("*/train.log")]
    while "first optimizer step done" not in (job_dir / "train.log").read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    # The job process, as SLURM signals it on preemption.
    (job,) = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and b"submitit.core._submit" in _cmdline(p)
        and str(sweep_dir).encode() in _cmdline(p)
    ]
    os.kill(job, signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "Traceback" not in out
    assert len([ln for ln in out.splitlines() if ln.startswith("preempted: SIGTERM")]) == 1
    assert (job_dir / PREEMPTED_MARKER).is_file()
    done = run_cli([*cmd[1:], "resume=auto"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((job_dir / "results.json").read_text())["steps"] == 40


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
