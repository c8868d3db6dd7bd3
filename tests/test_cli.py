"""The entry points as a user runs them: train.py, eval.py, -m sweeps, console scripts."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require_data, run_cli

TINY = ["model.hidden_sizes=[32]", "trainer.max_epochs=1", "trainer.limit_train_batches=20"]


def test_train_then_eval_from_checkpoint(tmp_path: Path) -> None:
    require_data()
    run_dir = tmp_path / "run"
    done = run_cli([str(REPO / "train.py"), *TINY, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "train.log").read_text().count("first optimizer step done") == 1
    assert (run_dir / ".hydra" / "config.yaml").is_file()

    # The run names its folder at the start, and at the end its files and the commands
    # to view and evaluate it, on the console and in train.log, ready to paste.
    log = (run_dir / "train.log").read_text()
    for shown in (done.stdout, log):
        assert shown.index("run folder: run\n") < shown.index("first optimizer step done")
        assert "results file: run/results.json" in shown
        assert "checkpoints: run/checkpoints/best.pt, run/checkpoints/last.pt" in shown
        assert "TensorBoard events: run/tensorboard" in shown
        assert "tensorboard --logdir run\n" in shown
    evaluate = shlex.split(done.stdout.split("evaluate: ")[1].splitlines()[0])
    assert evaluate == ["python", "eval.py", "ckpt_path=run/checkpoints/best.pt"]
    eval_dir = tmp_path / "eval"
    done = run_cli([str(REPO / "eval.py"), *evaluate[2:], f"hydra.run.dir={eval_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"test/acc: {results['metrics']['test/acc']:.4f}" in done.stdout
    recorded = json.loads((eval_dir / "eval_results.json").read_text())
    assert recorded["metrics"]["test/acc"] == pytest.approx(results["metrics"]["test/acc"])


def test_a_user_error_is_also_written_into_the_run_log(tmp_path: Path) -> None:
    require_data()
    run_dir = tmp_path / "run"
    done = run_cli([str(REPO / "train.py"), "optimizer.lr=0", f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: optimizer.lr=0 must be > 0"]
    log = (run_dir / "train.log").read_text()
    assert log.endswith("[ERROR] - error: optimizer.lr=0 must be > 0\n")
    assert "error:" not in done.stdout  # the terminal gets the line once, on stderr


def test_multirun_sweep_gives_one_folder_per_job(tmp_path: Path) -> None:
    require_data()
    done = run_cli(
        [str(REPO / "train.py"), "-m", "optimizer.lr=1e-3,3e-3", *TINY, "hydra.sweep.dir=sweep"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name != ".hydra")
    assert len(jobs) == 2
    lrs = set()
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        lrs.update(o for o in results["overrides"] if o.startswith("optimizer.lr="))
        events = list((job / "tensorboard").glob("events.out.tfevents.*"))
        assert len(events) == 1
        assert b"_hparams_/session_start_info" in events[0].read_bytes()
    assert lrs == {"optimizer.lr=0.001", "optimizer.lr=0.003"}


def test_a_config_that_sets_hydra_mode_multirun_still_sweeps(tmp_path: Path) -> None:
    """A plain run skips Hydra's mode-probing composition; a config asking for a sweep
    (hydra.mode=MULTIRUN, without -m) must still get one, and leave no run folder."""
    require_data()
    (tmp_path / "extra" / "experiment").mkdir(parents=True)
    (tmp_path / "extra" / "experiment" / "sweepy.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n"
        "  sweeper:\n    params:\n      optimizer.lr: 1e-3,3e-3\n"
    )
    args = ["--config-dir", str(tmp_path / "extra"), "experiment=sweepy", *TINY, "logger=none"]
    done = run_cli(
        [str(REPO / "train.py"), *args, "hydra.sweep.dir=sweep", "hydra.run.dir=single"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    jobs = [p for p in (tmp_path / "sweep").iterdir() if (p / "results.json").is_file()]
    assert len(jobs) == 2
    assert not (tmp_path / "single").exists()


def test_default_layout_outputs_date_time(tmp_path: Path) -> None:
    require_data()
    done = run_cli([str(REPO / "train.py"), "trainer=debug", "logger=none"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run_dir,) = list((tmp_path / "outputs").glob("*/*"))
    assert (run_dir / "results.json").is_file()
    assert len(run_dir.parent.name) == len("2026-01-01") and len(run_dir.name) == len("12-00-00")


@pytest.mark.slow
def test_console_scripts_work_from_a_non_editable_install(tmp_path: Path) -> None:
    """A wheel install has no configs/ folder beside it: the packaged configs must be found."""
    require_data()
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        # With this environment's setuptools (a dev requirement): an isolated build env
        # would install it again first.
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", wheel_dir, REPO],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheel_dir.glob("trainer-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel],
        check=True,
        capture_output=True,
    )
    env = {"PYTHONPATH": str(site), "PATH": f"{site / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    done = run_cli(["trainer-train", *TINY, "logger=none", "hydra.run.dir=run"], cwd=work, env=env)
    assert done.returncode == 0, done.stderr
    ckpt = work / "run" / "checkpoints" / "best.pt"
    done = run_cli(["trainer-eval", f"ckpt_path={ckpt}", "hydra.run.dir=ev"], cwd=work, env=env)
    assert done.returncode == 0, done.stderr
    assert "test/acc:" in done.stdout
    done = run_cli(["trainer-generate", "ckpt_path=none.pt"], cwd=work, env=env)
    assert done.returncode == 2 and "checkpoint none.pt does not exist" in done.stderr
    # The installed copy, not the source tree, was imported.
    check = subprocess.run(
        [sys.executable, "-c", "import trainer.configs as c; print(c.__file__)"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=work,
    )
    assert check.stdout.startswith(str(site))
