"""Crash-proof training end to end: real `python train.py` processes on MNIST are
killed (SIGKILL), preempted (SIGTERM/SIGUSR1), damaged and resumed; every
resumed run must end bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, require_data, run_cli
from tests.run_checks import assert_same_final_state
from trainer.checkpoint.io import load_checkpoint
from trainer.errors import CheckpointError
from trainer.loop.preemption import EXIT_PREEMPTED
from trainer.testing import KILL_IN_SAVE_ENV

pytestmark = pytest.mark.slow

# 2 epochs of 16 steps; checkpoints every 5 steps and at epoch ends (16, 32);
# validation every 6 steps; dropout so that the torch RNG matters.
BASE = [
    "model.hidden_sizes=[32]",
    "model.dropout=0.2",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=16",
    "trainer.limit_val_batches=2",
    "trainer.val_every_n_steps=6",
    "trainer.early_stopping.patience=20",
    "trainer.log_every_n_steps=3",
    "trainer.deterministic=true",
    "trainer.progress_bar=false",
    "checkpoint.every_n_steps=5",
    "checkpoint.keep_last_k=3",
]
FAULTY = "loss._target_=trainer.testing.FaultInjectingLoss"
# The curves a resumed run must draw exactly as an uninterrupted one.
TAGS = ["train/loss", "train/lr", "val/acc", "val/loss", "test/acc"]


def train_cmd(run: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(["train.py", *BASE, f"hydra.run.dir={run}", *extra], cwd=REPO, env=env)


def step_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))


def restart_steps(run: Path) -> list[int]:
    """Steps at which a resumed run told TensorBoard to purge later points."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    steps = []
    for path in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                steps.append(event.step)
    return sorted(steps)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_data()
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = train_cmd(run)
    assert proc.returncode == 0, proc.stderr
    return run


def test_sigkill_at_any_point_then_resume_matches_uninterrupted_run(straight, tmp_path) -> None:
    run = tmp_path / "run"
    # 1. Killed mid-epoch 0 at batch 13: the newest checkpoint is step 10.
    proc = train_cmd(run, FAULTY, "+loss.kill_at_batch=13")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert step_files(run)[-1] == "step_00000010.pt"
    # 2. Resumed at step 10, killed while writing the epoch-end checkpoint of step 16.
    proc = train_cmd(run, "resume=auto", env={KILL_IN_SAVE_ENV: "step_00000016.pt"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list((run / "checkpoints").glob(".step_00000016.pt.*.tmp"))  # the unfinished write
    assert step_files(run)[-1] == "step_00000015.pt"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["global_step"] == 15
    # 3. Resumed at step 15, killed mid-epoch 1 at its 10th batch (step 25).
    proc = train_cmd(run, "resume=auto", FAULTY, "+loss.kill_at_batch=10")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert step_files(run)[-1] == "step_00000020.pt"
    # 4. Resumed at step 20, runs to the end.
    proc = train_cmd(run, "resume=auto")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout + proc.stderr
    assert_same_final_state(straight, run, 32, TAGS)
    assert restart_steps(run) == [11, 16, 21]
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert step_files(run) == ["step_00000025.pt", "step_00000030.pt", "step_00000032.pt"]
    assert (run / "checkpoints" / "best.pt").is_file()


def test_sigterm_saves_exits_for_requeue_and_rerun_matches(straight, tmp_path) -> None:
    run = tmp_path / "run"
    proc = train_cmd(run, FAULTY, "+loss.signal_at_batch=7")
    assert proc.returncode == EXIT_PREEMPTED == 75, proc.stderr
    assert "preempted: SIGTERM" in proc.stderr and "resume=auto" in proc.stderr
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["global_step"] == 7 and (run / "checkpoints" / "step_00000007.pt").is_file()
    assert not (run / "results.json").exists()
    proc = train_cmd(run, "resume=auto")
    assert proc.returncode == 0, proc.stderr
    assert_same_final_state(straight, run, 32, TAGS)


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    require_data()
    run = tmp_path / "run"
    proc = train_cmd(
        run, FAULTY, "+loss.signal_at_batch=7", "+loss.signal_count=2", "+loss.signal_name=SIGUSR1"
    )
    assert proc.returncode == -signal.SIGUSR1, proc.stderr
    assert step_files(run) == ["step_00000005.pt"]  # no checkpoint for the step it was in


def test_damaged_newest_checkpoints_are_reported_and_skipped(straight, tmp_path) -> None:
    run = tmp_path / "run"
    proc = train_cmd(run, FAULTY, "+loss.kill_at_batch=23")
    assert proc.returncode == -signal.SIGKILL
    ckpts = run / "checkpoints"
    assert step_files(run) == ["step_00000015.pt", "step_00000016.pt", "step_00000020.pt"]
    newest, second = ckpts / "step_00000020.pt", ckpts / "step_00000016.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    second.write_bytes(os.urandom(second.stat().st_size))  # random bytes
    proc = train_cmd(run, "resume=auto")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert f"skipping unusable checkpoint: {newest} is not a readable checkpoint" in out
    assert f"skipping unusable checkpoint: {second} is not a readable checkpoint" in out
    assert f"resuming from the previous checkpoint {ckpts / 'step_00000015.pt'}" in out
    assert_same_final_state(straight, run, 32, TAGS)


def test_malicious_checkpoint_is_refused_by_the_cli(tmp_path: Path) -> None:
    require_data()
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    code = (
        "import os, sys, torch\n"
        "class P:\n"
        "    def __reduce__(self): return (os.system, ('touch ' + sys.argv[2],))\n"
        "torch.save({'model': {}, 'x': P()}, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(evil), str(marker)], check=True)
    proc = train_cmd(tmp_path / "run", f"ckpt_path={evil}")
    assert proc.returncode == 2
    assert "refused unread (nothing in it ran)" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_checkpoint_of_another_model_names_keys_and_shapes(make_config, tmp_path) -> None:
    from trainer.run import train

    small = ["trainer.max_steps=2", "trainer.max_epochs=null", "logger=none", "scheduler=none"]
    train(make_config(*small, "model.hidden_sizes=[32]", output_dir=tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    cfg = make_config(*small, "model.hidden_sizes=[48]", f"ckpt_path={ckpt}")
    with pytest.raises(CheckpointError) as error:
        train(cfg)
    message = str(error.value)
    assert "net.1.weight (checkpoint [32, 784] vs model [48, 784])" in message
    assert "net.4.weight (checkpoint [10, 32] vs model [10, 48])" in message


def test_resume_guards(make_config, tmp_path: Path) -> None:
    from trainer.errors import ConfigError
    from trainer.run import train

    small = ["trainer.max_steps=2", "trainer.max_epochs=null", "logger=none", "scheduler=cosine"]
    train(make_config(*small, "model.hidden_sizes=[16]"))
    # A new run into a folder with checkpoints would overwrite them: refused.
    with pytest.raises(ConfigError, match="already holds checkpoints.*resume=auto"):
        train(make_config(*small, "model.hidden_sizes=[16]"))
    with pytest.raises(ConfigError, match="resume='yes' must be auto or null"):
        train(make_config(*small, "resume=yes"))
    # resume=auto on a finished run: nothing to do, the stored result comes back.
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    before = (tmp_path / "run" / "results.json").stat().st_mtime_ns
    value = train(make_config(*small, "model.hidden_sizes=[16]", "resume=auto"))
    assert value == results["metrics"]["val/acc"]
    assert (tmp_path / "run" / "results.json").stat().st_mtime_ns == before
    # resume=auto in a folder without checkpoints starts from ckpt_path, when given.
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    more = [f"ckpt_path={ckpt}", "resume=auto", "model.hidden_sizes=[16]", "trainer.max_steps=3"]
    # A longer run cannot reuse a schedule planned for 2 steps: a clear error, no traceback.
    with pytest.raises(CheckpointError, match="run of 2 optimizer steps and this config runs 3"):
        train(make_config(*small[1:], *more, output_dir=tmp_path / "other"))
    train(make_config(*small[1:], *more, "scheduler=none", output_dir=tmp_path / "other"))
    results = json.loads((tmp_path / "other" / "results.json").read_text())
    assert results["resumed_from"] == str(ckpt) and results["steps"] == 3


def test_every_n_minutes_checkpoints_mid_epoch(make_config, tmp_path: Path) -> None:
    from trainer.run import train

    common = ["trainer.max_epochs=1", "trainer.limit_train_batches=12", "logger=none"]
    common += ["model.hidden_sizes=[16]", FAULTY, "+loss.sleep_s=0.05"]
    # 0.001 min = 60 ms: a checkpoint every step or two.
    train(make_config(*common, "checkpoint.every_n_minutes=0.001", "checkpoint.keep_last_k=null"))
    mid_epoch = [p for p in step_files(tmp_path / "run") if p != "step_00000012.pt"]
    assert len(mid_epoch) >= 3
    train(make_config(*common, "checkpoint.every_n_minutes=60", output_dir=tmp_path / "hour"))
    assert step_files(tmp_path / "hour") == ["step_00000012.pt"]


def test_sweep_resume_skips_finished_jobs_and_resumes_the_rest(tmp_path: Path) -> None:
    require_data()
    sweep = tmp_path / "sweep"
    args = ["train.py", "-m", *BASE, f"hydra.sweep.dir={sweep}", FAULTY, "+loss.sleep_s=0.03"]
    env = {**os.environ, "TRAINER_DATA_DIR": str(require_data())}
    proc = subprocess.Popen(
        [sys.executable, *args, "seed=1,2,3,4"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill the sweep once jobs 1-2 are done and job 3 has saved a checkpoint.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        jobs = sweep_jobs(sweep)
        done = [job for job in jobs.values() if (job / "results.json").exists()]
        if len(done) == 2 and 3 in jobs and list(jobs[3].glob("checkpoints/step_*.pt")):
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    jobs = sweep_jobs(sweep)
    assert sorted(jobs) == [1, 2, 3], "the sweep was not stopped during job 3"
    finished = {s: (jobs[s] / "results.json").stat().st_mtime_ns for s in (1, 2)}
    assert not (jobs[3] / "results.json").exists()

    # The rerun lists the jobs in another order: identity is the overrides, not the index.
    rerun = run_cli([*args, "seed=4,3,2,1", "resume=auto"], cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr
    jobs = sweep_jobs(sweep)
    assert sorted(jobs) == [1, 2, 3, 4]
    for seed in (1, 2):
        assert (jobs[seed] / "results.json").stat().st_mtime_ns == finished[seed]
        assert "already finished" in (jobs[seed] / "train.log").read_text()
    assert "resumed from" in (jobs[3] / "train.log").read_text()
    assert "resumed from" not in (jobs[4] / "train.log").read_text()
    for seed in (3, 4):
        assert json.loads((jobs[seed] / "results.json").read_text())["steps"] == 32


def sweep_jobs(sweep: Path) -> dict[int, Path]:
    """Job folders by seed, read from the overrides Hydra saved in each."""
    jobs = {}
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        seeds = [line for line in overrides.read_text().splitlines() if "- seed=" in line]
        if seeds:
            jobs[int(seeds[0].split("=")[1])] = overrides.parent.parent
    return jobs


def test_preempted_mid_epoch_on_the_dataloader_path_resumes_exactly(make_config, tmp_path) -> None:
    from trainer.errors import Preempted
    from trainer.run import train

    common = [
        "model.hidden_sizes=[16]",
        "model.dropout=0.3",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=10",
        "trainer.limit_val_batches=1",
        "trainer.test_after_fit=false",
        "logger=none",
        "data.in_memory=false",
        FAULTY,
    ]
    train(make_config(*common, output_dir=tmp_path / "straight"))
    # The signal goes to this very process: the trainer's handler turns it into Preempted.
    with pytest.raises(Preempted, match="saved step 4"):
        train(make_config(*common, "+loss.signal_at_batch=4"))
    train(make_config(*common, "resume=auto"))
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


# ------------------------------------------------ background writes (checkpoint.async_write)
# A save every 2 steps and a validation every 3: best.pt is written, then linked as the
# step file of the same step (which must wait for it), and plain step files are written
# while training goes on. Every file is kept.
WRITES = [
    "model.hidden_sizes=[32]",
    "model.dropout=0.2",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=10",
    "trainer.limit_val_batches=1",
    "trainer.val_every_n_steps=3",
    "trainer.deterministic=true",
    "trainer.test_after_fit=false",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_last_k=null",
    "logger=none",
]


def assert_same_contents(a: object, b: object, where: str = "") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_contents(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_contents(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_async_and_sync_writes_give_the_same_checkpoints(
    make_config, tmp_path: Path, monkeypatch
) -> None:
    import threading

    from trainer.checkpoint import resume
    from trainer.run import train

    assert make_config().checkpoint.async_write is True  # the default
    writers: dict[str, set[str]] = {"async": set(), "sync": set()}
    real_save, current = resume.save_checkpoint, ["async"]

    def slow_save(state: dict, path: Path) -> None:
        # Slow enough that training goes on, updating params in place, during each write.
        writers[current[0]].add(threading.current_thread().name)
        if current[0] == "async":
            time.sleep(0.05)
        real_save(state, path)

    monkeypatch.setattr(resume, "save_checkpoint", slow_save)
    train(make_config(*WRITES, output_dir=tmp_path / "async"))
    assert not [t for t in threading.enumerate() if t.name.startswith("checkpoint-write")]
    current[0] = "sync"
    train(make_config(*WRITES, "checkpoint.async_write=false", output_dir=tmp_path / "sync"))
    assert writers == {"async": {"checkpoint-write_0"}, "sync": {"MainThread"}}

    folders = {mode: tmp_path / mode / "checkpoints" for mode in writers}
    names = {mode: sorted(p.name for p in folder.iterdir()) for mode, folder in folders.items()}
    assert names["async"] == names["sync"]
    assert {"best.pt", "last.pt", "step_00000002.pt", "step_00000020.pt"} <= set(names["async"])
    links = {mode: hard_links(folder) for mode, folder in folders.items()}
    assert links["async"] == links["sync"]
    assert ("last.pt", "step_00000020.pt") in links["async"]
    assert [b for a, b in links["async"] if a == "best.pt" and b.startswith("step_")]
    for name in names["async"]:
        a = load_checkpoint(folders["async"] / name)
        b = load_checkpoint(folders["sync"] / name)
        configs = a.pop("config"), b.pop("config")
        for config in configs:
            del config["checkpoint"]["async_write"], config["paths"]["output_dir"]
        assert configs[0] == configs[1], name
        assert_same_contents(a, b, name)


def hard_links(folder: Path) -> set[tuple[str, str]]:
    """Pairs of names (in order) of one file."""
    names = sorted(p.name for p in folder.iterdir())
    return {(a, b) for a in names for b in names if a < b and (folder / a).samefile(folder / b)}


def test_a_failed_write_never_masks_the_error_that_ends_fit(
    make_config, full_disk, monkeypatch, caplog
) -> None:
    from trainer.loop.trainer import Trainer
    from trainer.run import train

    def broken_evaluate(self, batches, prefix):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(Trainer, "evaluate", broken_evaluate)
    full_disk()
    # The step-3 checkpoint fails in the background; the epoch-end validation fails next.
    small = ["model.hidden_sizes=[16]", "trainer.max_epochs=1", "trainer.limit_train_batches=4"]
    small.append("scheduler=none")
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train(make_config(*small, "checkpoint.every_n_steps=3", "logger=none"))
    assert "a background checkpoint write failed as well" in caplog.text
    assert "step_00000003.pt: No space left on device" in caplog.text


def test_a_run_killed_after_its_final_checkpoint_finishes_without_training_more(
    make_config, tmp_path: Path
) -> None:
    """The final checkpoint is best.pt linked, and says nothing of max_epochs: the resumed
    run finds the limit again from its config, trains no further, and writes results."""
    from trainer.run import train

    args = ["model.hidden_sizes=[32]", "trainer.max_epochs=1", "trainer.limit_train_batches=10"]
    train(make_config(*args, "logger=none"))
    run = tmp_path / "run"
    first = json.loads((run / "results.json").read_text())
    ckpts = run / "checkpoints"
    assert (ckpts / "step_00000010.pt").samefile(ckpts / "best.pt")  # written once
    (run / "results.json").unlink()  # as if killed between the last save and the results
    train(make_config(*args, "logger=none", "resume=auto"))
    again = json.loads((run / "results.json").read_text())
    assert again["steps"] == first["steps"] == 10 and again["stop_reason"] == "max_epochs"
    assert again["metrics"] == first["metrics"]
    assert load_checkpoint(ckpts / "last.pt")["global_step"] == 10
