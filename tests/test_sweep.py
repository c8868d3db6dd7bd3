"""Multirun sweeps as a user runs them: job folders, TensorBoard runs, failures, the report."""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, require_data, run_cli
from tests.readme_commands import readme_args
from tests.sweep_helpers import REPORT, job_folders, report, results
from trainer.sweep.callback import sweep_subdir

TRAIN = str(REPO / "train.py")
# A short run: 20 batches of a small MLP reach ~85% on MNIST.
SHORT = ["model.hidden_sizes=[32]", "trainer.progress_bar=false", "trainer.log_every_n_steps=10"]


def sweep(tmp_path: Path, *args: str, timeout: float = 600):
    require_data()
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(
        [TRAIN, "-m", *args, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, timeout=timeout
    )
    return proc, sweep_dir


def test_sweep_subdir_is_readable_safe_and_unique() -> None:
    assert sweep_subdir("model.hidden_sizes=[64],optimizer.lr=0.01") == (
        "model.hidden_sizes=[64],optimizer.lr=0.01"
    )
    assert sweep_subdir("") == "default"
    # A `/` would nest folders: replaced, and a hash keeps a=b/c apart from a=b_c.
    slashed = sweep_subdir("tags=[a/b]")
    assert "/" not in slashed and slashed.startswith("tags=[a_b]-")
    assert slashed != sweep_subdir("tags=[a_b]")
    long = sweep_subdir("x=" + "a" * 400)
    assert len(long) <= 150 and long != sweep_subdir("x=" + "a" * 399)
    # Optuna trials: <trial number>_<overrides>, suggested floats shortened.
    trial = sweep_subdir("model.hidden_sizes=[64],optimizer.lr=0.0019960425587510337", 3)
    assert trial == "3_model.hidden_sizes=[64],optimizer.lr=0.001996"


@pytest.mark.slow
def test_grid_sweep_gives_a_folder_tensorboard_run_and_report_row_per_job(tmp_path: Path) -> None:
    """A 2x2 grid, lr x seed: one folder, TB run and report row per job; mean ± std per lr."""
    started = time.monotonic()
    proc, sweep_dir = sweep(
        tmp_path,
        *SHORT,
        "optimizer.lr=0.0003,0.003",
        "seed=0,1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=20",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = job_folders(sweep_dir)
    assert len(folders) == 4
    values, by_lr = {}, {}
    rest = "trainer.limit_train_batches=20,trainer.log_every_n_steps=10,trainer.max_epochs=1"
    for num, folder in enumerate(folders):
        job = results(folder)
        assert job["status"] == "completed" and job["job_num"] == num
        lr = next(o for o in job["overrides"] if o.startswith("optimizer.lr=")).split("=")[1]
        seed = next(o for o in job["overrides"] if o.startswith("seed=")).split("=")[1]
        assert folder.name == f"model.hidden_sizes=[32],optimizer.lr={lr},seed={seed},{rest}"
        values[num] = job["metrics"]["val/acc"]
        by_lr.setdefault(lr, []).append(values[num])
    assert len(set(values.values())) == 4  # the seeds made a difference
    # Each job's time is its own, though the jobs ran in one process.
    assert sum(results(f)["wall_time_s"] for f in folders) < time.monotonic() - started

    # `tensorboard --logdir <sweep dir>`: one run per job, named by its overrides.
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(sweep_dir))
    mux.Reload()
    assert sorted(mux.Runs()) == sorted(f"{f.name}/tensorboard" for f in folders)
    for run in mux.Runs():
        accumulator = mux.GetAccumulator(run)
        assert "val/acc" in accumulator.Tags()["scalars"]
        assert "_hparams_/session_start_info" in accumulator.PluginTagToContent("hparams")

    stdout, rows = report(sweep_dir)
    assert len(rows) == 4
    expected_order = sorted(values, key=lambda n: -values[n])
    assert [r["job"] for r in rows] == [folders[n].name for n in expected_order]
    assert [float(r["val/acc"]) for r in rows] == [values[n] for n in expected_order]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert (sweep_dir / "sweep_report.md").read_text().count("| completed |") == 4
    best = results(folders[expected_order[0]])
    command = stdout.split("```")[-2].strip()
    assert command.startswith("python train.py ")
    for override in best["overrides"]:
        assert override in command.replace("'", "")

    # Jobs that differ only in seed: mean ± std per config, best mean first.
    with (sweep_dir / "sweep_report_by_config.csv").open() as f:
        groups = list(csv.DictReader(f))
    assert len(groups) == 2 and all(g["seeds"] == "2/2" for g in groups)
    means = {lr: statistics.fmean(v) for lr, v in by_lr.items()}
    assert [g["optimizer.lr"] for g in groups] == sorted(means, key=lambda lr: -means[lr])
    for group in groups:
        points = by_lr[group["optimizer.lr"]]
        expected = f"{statistics.fmean(points):.4f} ± {statistics.stdev(points):.4f}"
        assert group["val/acc"] == expected
    assert "Mean ± std over seeds" in stdout


def test_failing_job_is_recorded_marked_and_the_sweep_exits_nonzero(tmp_path: Path) -> None:
    # Job 0 asks for a batch larger than the training set; job 1 is fine.
    proc, sweep_dir = sweep(
        tmp_path,
        *SHORT,
        "trainer=debug",
        "data.batch_size=100000,64",
        "trainer.test_after_fit=false",
    )
    assert proc.returncode == 1
    assert "1 of 2 jobs failed" in proc.stderr and "Traceback" not in proc.stderr
    assert "data.batch_size=100000 is larger than the training set" in proc.stderr
    failed, ok = job_folders(sweep_dir)
    assert "larger than the training set" in (failed / "error.txt").read_text()
    assert results(failed)["status"] == "failed" and results(failed)["job_num"] == 0
    assert results(ok)["status"] == "completed" and results(ok)["metrics"]["val/acc"] > 0.2
    assert list((ok / "checkpoints").glob("*.pt"))

    stdout, rows = report(sweep_dir)
    assert [(r["job"], r["status"], r["rank"]) for r in rows] == [
        (ok.name, "completed", "1"),
        (failed.name, "failed", ""),
    ]
    assert "## Failed jobs" in stdout and "larger than the training set" in stdout


def test_continue_on_error_false_stops_the_sweep_at_the_first_failure(tmp_path: Path) -> None:
    proc, sweep_dir = sweep(
        tmp_path,
        *SHORT,
        "trainer=debug",
        "data.batch_size=100000,64",
        "hydra.callbacks.sweep.continue_on_error=false",
    )
    assert proc.returncode == 1 and "stopping the sweep" in proc.stderr
    (only,) = job_folders(sweep_dir)
    assert "data.batch_size=100000" in only.name


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_jobs(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc, sweep_dir = sweep(
        tmp_path,
        *SHORT,
        "trainer=debug",
        *readme_args("python train.py -m", "hydra/launcher=submitit_local"),  # the README's
        "hydra.launcher.timeout_min=10",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = job_folders(sweep_dir)
    assert len(folders) == 2
    for folder in folders:
        assert results(folder)["status"] == "completed"
        assert list(folder.glob("tensorboard/events.out.tfevents.*"))
    # submitit ran them as its own jobs, each with its own log.
    assert len(list((sweep_dir / ".submitit").glob("*/*_log.out"))) == 2


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes_and_records_failures(
    tmp_path: Path,
) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc, sweep_dir = sweep(
        tmp_path,
        *SHORT,
        "trainer=debug",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "data.batch_size=100000,64",
    )
    assert proc.returncode == 1 and "1 of 2 jobs failed" in proc.stderr
    failed, ok = job_folders(sweep_dir)
    assert results(failed)["status"] == "failed" and (failed / "error.txt").is_file()
    assert results(ok)["status"] == "completed"


def test_report_on_a_folder_without_jobs_is_one_error_line(tmp_path: Path) -> None:
    proc = run_cli([REPORT, str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().startswith("error: no job folders") and "Traceback" not in proc.stderr
    )


def pruned_sweep(tmp_path: Path, lrs: list[str], *args: str) -> tuple[dict, list[Path]]:
    """An Optuna study that tries these learning rates in order and prunes a trial whose
    val/acc is below 0.5 after an epoch; its trials by number, and the job folders."""
    import optuna

    proc, sweep_dir = sweep(
        tmp_path,
        *SHORT,
        "hparams_search=mnist_optuna",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.params=null",
        f"optimizer.lr=choice({','.join(lrs)})",
        f"hydra.sweeper.n_trials={len(lrs)}",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "~hydra.sweeper.pruner.n_startup_trials",
        "hydra.sweeper.pruner.n_warmup_steps=0",
        "+hydra.sweeper.pruner.lower=0.5",
        "trainer.limit_train_batches=20",
        "trainer.test_after_fit=false",
        *args,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="mnist_optuna", storage=f"sqlite:///{sweep_dir}/optuna.db")
    return {t.number: t for t in study.trials}, job_folders(sweep_dir)


@pytest.mark.slow
def test_pruning_stops_every_rank_of_a_multi_process_trial(tmp_path: Path) -> None:
    """Rank 0 talks to the study; the other rank stops after the same epoch."""
    optuna = pytest.importorskip("optuna")
    trials, folders = pruned_sweep(
        tmp_path, ["1e-9", "3e-3"], "trainer.devices=2", "trainer.max_epochs=2"
    )
    for folder in folders:
        job = results(folder)
        trial = trials[job["job_num"]]
        assert job["world_size"] == 2
        assert sorted(trial.intermediate_values) == list(range(1, job["epochs"] + 1))
        if trial.params["optimizer.lr"] < 1e-6:
            assert trial.state == optuna.trial.TrialState.PRUNED and job["status"] == "pruned"
            assert job["epochs"] == 1 and job["steps"] == 20
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and job["epochs"] == 2


@pytest.mark.slow
def test_optuna_sweep_of_three_trials_prunes_the_hopeless_ones(tmp_path: Path) -> None:
    """lr 1e-9 and 1e-8 leave the model at chance: the pruner stops them after epoch 1."""
    optuna = pytest.importorskip("optuna")
    trials, folders = pruned_sweep(tmp_path, ["1e-9", "1e-8", "3e-3"], "trainer.max_epochs=3")
    assert sorted(trials) == [0, 1, 2] and len(folders) == 3
    states = set()
    for folder in folders:
        job = results(folder)
        trial = trials[job["job_num"]]  # trial N ran as job N
        assert f"optimizer.lr={trial.params['optimizer.lr']}" in job["overrides"]
        assert folder.name.startswith(f"{trial.number}_")
        # The job reported its val/acc after every epoch it trained.
        assert sorted(trial.intermediate_values) == list(range(1, job["epochs"] + 1))
        assert trial.intermediate_values[job["epochs"]] == job["last_val"]["val/acc"]
        if trial.params["optimizer.lr"] < 1e-6:
            assert trial.state == optuna.trial.TrialState.PRUNED
            assert job["status"] == "pruned" and job["stop_reason"] == "pruned"
            assert job["epochs"] == 1 and trial.user_attrs["pruned_at_epoch"] == 1
            assert trial.value == trial.intermediate_values[1]  # what samplers rank it by
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE
            assert job["status"] == "completed" and job["epochs"] == 3
            assert trial.value == job["metrics"]["val/acc"] > 0.5
        states.add(trial.state)
    assert len(states) == 2

    _, rows = report(tmp_path / "sweep")
    assert [(r["status"], r["rank"]) for r in rows] == [
        ("completed", "1"),
        ("pruned", ""),
        ("pruned", ""),
    ]


@pytest.mark.slow
def test_optuna_search_continues_from_the_study_in_its_folder(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    args = [
        *SHORT,
        "trainer=debug",
        "trainer.max_epochs=1",
        "trainer.test_after_fit=false",
        "hparams_search=mnist_optuna",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.pruner=null",
    ]
    first, sweep_dir = sweep(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    second, same_dir = sweep(tmp_path, *args)  # the same sweep folder, so the same study
    assert second.returncode == 0 and same_dir == sweep_dir, second.stderr[-3000:]
    study = optuna.load_study(study_name="mnist_optuna", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert [t.number for t in study.trials] == [0, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    folders = job_folders(sweep_dir)
    assert [f.name.split("_", 1)[0] for f in folders] == ["0", "1"]
    for trial, folder in zip(study.trials, folders, strict=True):
        assert trial.value == results(folder)["metrics"]["val/acc"]


def test_submitit_slurm_keys_in_docs_compose(tmp_path: Path) -> None:
    """The SLURM command in docs/sweeps.md composes (no cluster here to run it on)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module

    overrides = [
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=1",
        "hydra.launcher.cpus_per_task=8",
        "hydra.launcher.mem_gb=32",
        "hydra.launcher.timeout_min=240",
        "hydra.launcher.max_num_timeout=3",
        "+hydra.launcher.additional_parameters.requeue=true",
    ]
    with initialize_config_module("trainer.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 240)
    assert launcher.max_num_timeout == 3 and launcher.additional_parameters.requeue is True


def test_a_bug_in_a_job_is_recorded_with_its_traceback_and_cleared_on_rerun(
    tmp_path: Path,
) -> None:
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from trainer.sweep.callback import SweepCallback

    job_dir = tmp_path / "a=1"
    (job_dir / ".hydra").mkdir(parents=True)
    hydra = {"mode": RunMode.MULTIRUN, "runtime": {"output_dir": str(job_dir)}, "job": {"num": 7}}
    config = OmegaConf.create({"hydra": {**hydra, "sweep": {"dir": str(tmp_path)}}})
    try:
        {}["missing"]
    except KeyError as e:
        error = e
    job_return = JobReturn(overrides=["a=1"], status=JobStatus.FAILED, _return_value=error)
    callback = SweepCallback()
    callback.on_multirun_start(config)
    callback.on_job_end(config, job_return)
    # The sweeper gets a finished job with no value, so it goes on.
    assert job_return.status == JobStatus.COMPLETED and job_return.return_value is None
    text = (job_dir / "error.txt").read_text()
    assert text.startswith("Traceback") and text.strip().endswith("KeyError: 'missing'")
    assert results(job_dir) == {
        "job_num": 7,
        "overrides": ["a=1"],
        "status": "failed",
        "error": "KeyError: 'missing'",
    }
    with pytest.raises(SystemExit) as exit_info:
        callback.on_multirun_end(config)
    assert exit_info.value.code == 1
    # The job runs again in the same folder and completes: the old error is no longer its.
    (job_dir / "results.json").write_text('{"status": "completed"}')
    callback.on_job_end(config, JobReturn(overrides=["a=1"], status=JobStatus.COMPLETED))
    assert not (job_dir / "error.txt").exists() and results(job_dir)["status"] == "completed"
