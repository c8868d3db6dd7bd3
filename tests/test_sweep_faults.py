"""Sweeps and run folders rerun the wrong way: nothing written is overwritten, every job is
counted and named by what it runs, and a continued Optuna study goes on correctly."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR, require_data, run_cli
from tests.test_sweep import SHORT, TRAIN, job_folders, report, results, sweep

pytestmark = pytest.mark.slow
DEBUG = [*SHORT, "trainer=debug", "trainer.test_after_fit=false", "logger=none"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its content."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_sweep_reruns_count_every_job_name_jobs_by_overrides_and_keep_folders(
    tmp_path: Path,
) -> None:
    # Job 64 completes, job 100000 fails (a batch larger than the training set).
    first, sweep_dir = sweep(tmp_path, *DEBUG, "data.batch_size=64,100000")
    assert first.returncode == 1 and "1 of 2 jobs failed" in first.stderr, first.stderr[-2000:]
    ok = next(f for f in job_folders(sweep_dir) if "data.batch_size=64," in f.name + ",")
    ok_files = snapshot(ok)

    # Rerun with resume=auto and the values reordered: the finished job is skipped, the
    # failing one fails again; both are jobs of this sweep.
    second, _ = sweep(tmp_path, *DEBUG, "data.batch_size=100000,64", "resume=auto")
    assert second.returncode == 1 and "1 of 2 jobs failed" in second.stderr, second.stderr
    assert snapshot(ok)["results.json"] == ok_files["results.json"]
    # Job numbers moved with the order; the identity in results.json and the report did not.
    assert results(ok)["job_id"] == ok.name
    _, rows = report(sweep_dir)
    assert sorted(r["job"] for r in rows) == sorted(f.name for f in job_folders(sweep_dir))
    assert rows[0]["job"] == ok.name and rows[0]["status"] == "completed"
    assert f"Best: `{ok.name}`" in (sweep_dir / "sweep_report.md").read_text()

    # Rerun without resume=auto: the completed job is refused and its folder left exactly
    # as it was (no "failed" results.json, no error.txt); the failed job runs again.
    ok_files = snapshot(ok)
    third, _ = sweep(tmp_path, *DEBUG, "data.batch_size=64,100000")
    assert third.returncode == 1 and "2 of 2 jobs failed" in third.stderr, third.stderr
    assert "already holds checkpoints" in third.stderr and "Traceback" not in third.stderr
    assert snapshot(ok) == ok_files


def test_ckpt_path_never_overwrites_a_run_and_names_sweep_jobs(tmp_path: Path) -> None:
    require_data()
    for name in ("a", "b"):
        done = run_cli([TRAIN, *DEBUG, f"hydra.run.dir={name}"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    a_ckpt, b_ckpt = (tmp_path / n / "checkpoints" / "last.pt" for n in ("a", "b"))
    b_files = snapshot(tmp_path / "b")
    # Starting from a's checkpoint in b's folder would overwrite b's results and checkpoints.
    done = run_cli([TRAIN, *DEBUG, f"ckpt_path={a_ckpt}", "hydra.run.dir=b"], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "already holds checkpoints" in done.stderr and "resume=auto" in done.stderr
    # Results and checkpoints as they were (Hydra itself rewrites .hydra/ and the log).
    kept = {k: v for k, v in b_files.items() if not k.startswith(".hydra/") and k != "train.log"}
    assert "results.json" in kept and "checkpoints/last.pt" in kept
    now = snapshot(tmp_path / "b")
    assert {k: v for k, v in now.items() if k in kept} == kept and set(now) == set(b_files)
    # Two jobs from two checkpoints: two folders.
    proc, sweep_dir = sweep(tmp_path, *DEBUG, f"ckpt_path={a_ckpt},{b_ckpt}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    folders = job_folders(sweep_dir)
    assert len(folders) == 2
    assert {results(f)["resumed_from"] for f in folders} == {str(a_ckpt), str(b_ckpt)}


def test_a_continued_study_fails_killed_trials_and_proposes_new_points(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    require_data()
    sweep_dir = tmp_path / "sweep"
    args = [
        TRAIN,
        "-m",
        *DEBUG,
        "hparams_search=mnist_optuna",
        "hydra.sweeper.pruner=null",
        "hydra.sweeper.sampler.seed=7",
        "hydra.sweeper.heartbeat_interval=1",
        f"hydra.sweep.dir={sweep_dir}",
        "loss._target_=trainer.testing.FaultInjectingLoss",
        "+loss.sleep_s=0.2",
    ]
    env = {**os.environ, "TRAINER_DATA_DIR": str(DATA_DIR)}
    # Three trials; the sweep is SIGKILLed while it runs trial 2.
    proc = subprocess.Popen(
        [sys.executable, *args, "hydra.sweeper.n_trials=3"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list(sweep_dir.glob("2_*/.hydra/overrides.yaml")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before trial 2"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # past the grace period of 2 heartbeats
    storage = f"sqlite:///{sweep_dir}/optuna.db"
    killed = optuna.load_study(study_name="mnist_optuna", storage=storage).trials[2]
    assert killed.state == optuna.trial.TrialState.RUNNING

    done = run_cli([*args, "hydra.sweeper.n_trials=1"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = optuna.load_study(study_name="mnist_optuna", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    # The same seed, but a continued study: trial 3 does not repeat trial 0's parameters.
    params = [json.dumps(t.params, sort_keys=True) for t in trials]
    assert len(set(params)) == len(params), params
    (killed_folder,) = sweep_dir.glob("2_*")
    assert results(killed_folder)["status"] == "failed"
    _, rows = report(sweep_dir)
    assert [r["status"] for r in rows].count("failed") == 1
    assert "unfinished" not in [r["status"] for r in rows]
