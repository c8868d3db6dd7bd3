"""Every bad input gets one `error:` line, exit code 2, no traceback, and loses nothing.

Each case of the table is a real `python train.py ...` (or eval.py) subprocess
pointed at the output folder of a finished run, so the test also proves that a
failing command leaves that run's checkpoints, results and log as they were.
The cases run in a thread pool; most fail before any data is read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.conftest import DATA_DIR, REPO, require_data, run_cli
from tests.user_error_cases import (
    CASES,
    FIT_ONE_EPOCH,
    GPT_CKPT_RUN,
    LM_TINY,
    SLOW_IDS,
    TINY,
    Case,
    check_case,
    make_bad_data,
    write_other_characters,
)


def run_script(
    script: str, args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return run_cli([str(REPO / script), *args], cwd, env=env)


def snapshot(run: Path) -> dict[str, bytes]:
    """The files a finished run wrote (Hydra's own .hydra/ copies are rewritten by design)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_data()
    tmp = tmp_path_factory.mktemp("user_errors")
    run = tmp / "run"
    done = run_script("train.py", [*FIT_ONE_EPOCH, f"hydra.run.dir={run}"], tmp)
    assert done.returncode == 0, done.stderr
    # An interrupted run: checkpoints but no results.json, so the cases below can point
    # `resume=auto` at it and get past the check that protects a folder's checkpoints.
    (run / "results.json").unlink()
    ckpt = run / "checkpoints" / "last.pt"
    (tmp / "truncated.pt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "format_version": 99}, tmp / "newer.pt")
    (tmp / "notes.txt").write_text("not a checkpoint\n")
    make_bad_data(tmp / "data")
    before = snapshot(run)
    assert {"checkpoints/last.pt", "checkpoints/best.pt", "train.log"} <= set(before)
    return {"tmp": tmp, "run": run, "ckpt": ckpt, "before": before}


def run_cases(workspace: dict, cases: list[Case]) -> dict[str, tuple]:
    """Run cases two at a time; returns each one's process and the run folder after it."""
    tmp, run = workspace["tmp"], workspace["run"]
    values = {"tmp": tmp, "file": tmp / "notes.txt", "ckpt": workspace["ckpt"]}
    values.update(workspace.get("lm", {}))

    def run_case(case: Case) -> tuple[subprocess.CompletedProcess, dict]:
        args = list(case.args)
        for name, value in values.items():
            args = [a.replace(f"{{{name}}}", str(value)) for a in args]
        if case.in_run_dir:
            args.append(f"hydra.run.dir={run}")
            if case.script == "train.py":
                args.append("resume=auto")
        env = {}
        if "D" in case.env:
            env["TRAINER_DATA_DIR"] = str(tmp / "data" / case.env["D"])
        preset = LM_TINY if case.lm else TINY
        train_args = preset if case.script == "train.py" and "-cn" not in case.flags else []
        done = run_script(case.script, [*case.flags, *train_args, *args], tmp, env)
        return done, snapshot(run)

    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = pool.map(run_case, cases)
        return {case.id: outcome for case, outcome in zip(cases, outcomes, strict=True)}


FAST_CASES = [c for c in CASES if c.id not in SLOW_IDS]
SLOW_CASES = [c for c in CASES if c.id in SLOW_IDS]


@pytest.fixture(scope="module")
def fast_results(workspace: dict) -> dict[str, tuple]:
    return run_cases(workspace, FAST_CASES)


@pytest.fixture(scope="module")
def slow_results(workspace: dict) -> dict[str, tuple]:
    return run_cases({**workspace, "lm": lm_files(workspace["tmp"])}, SLOW_CASES)


def lm_files(tmp: Path) -> dict[str, Path]:
    """A finished GPT run at block_size 32 and a text of other characters, for LM_FILE_IDS."""
    run = tmp / "gpt_run"
    done = run_script("train.py", [*GPT_CKPT_RUN, f"hydra.run.dir={run}"], tmp)
    assert done.returncode == 0, done.stderr
    (run / "results.json").unlink()  # interrupted, so that resume=auto continues it
    write_other_characters(tmp / "other_chars.txt")
    return {
        "gpt_run": run,
        "gpt_ckpt": run / "checkpoints" / "last.pt",
        "other_chars": tmp / "other_chars.txt",
    }


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert SLOW_IDS <= {c.id for c in CASES} | {"devices-too-many", "no-cuda"}


@pytest.mark.parametrize("case", FAST_CASES, ids=[c.id for c in FAST_CASES])
def test_bad_input_gets_one_clear_line(case: Case, fast_results: dict, workspace: dict) -> None:
    check_case(case, *fast_results[case.id], workspace["before"])


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=[c.id for c in SLOW_CASES])
def test_bad_input_past_config_gets_one_clear_line(
    case: Case, slow_results: dict, workspace: dict
) -> None:
    check_case(case, *slow_results[case.id], workspace["before"])


# A full disk, simulated by a file object that fails like one: a second run into the
# folder of a finished run hits ENOSPC on its first checkpoint write.
# Continue the interrupted run for one more epoch, so that a checkpoint gets written.
RESUME_ONE_MORE_EPOCH = ["resume=auto", "trainer.max_epochs=2", "scheduler=none"]

FULL_DISK_RUNNER = """
import errno, os, sys, types
import trainer.checkpoint.io as checkpoint

class FullDiskFile:
    def __init__(self, file):
        self.file, self.written = file, 0
    def write(self, data):
        if self.written + len(data) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.file.write(data)
    def __getattr__(self, name):
        return getattr(self.file, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.file.close()

full_disk_os = types.ModuleType("os")
full_disk_os.__dict__.update(os.__dict__)
full_disk_os.fdopen = lambda fd, *a, **k: FullDiskFile(os.fdopen(fd, *a, **k))
checkpoint.os = full_disk_os
sys.argv = ["train.py", *sys.argv[1:]]
from trainer.cli import train_main
train_main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("async_write", ["true", "false"], ids=["async", "sync"])
def test_full_disk_during_checkpoint_write_keeps_previous(
    workspace: dict, tmp_path: Path, async_write: str
) -> None:
    # A background write's error reaches the training thread: the same one line.
    run = tmp_path / "run"
    shutil.copytree(workspace["run"], run)
    before = snapshot(run)
    args = [*FIT_ONE_EPOCH, *RESUME_ONE_MORE_EPOCH, f"hydra.run.dir={run}"]
    args.append(f"checkpoint.async_write={async_write}")
    env = {**os.environ, "TRAINER_DATA_DIR": str(DATA_DIR)}
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_RUNNER, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], done.stderr
    assert "the previous checkpoint there is intact" in errors[0]
    after = snapshot(run)
    for name in ("checkpoints/last.pt", "checkpoints/best.pt"):
        assert after[name] == before[name], name
    assert not list((run / "checkpoints").glob(".*.tmp")), "a temp file was left behind"
    torch.load(run / "checkpoints" / "last.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="mounting needs root")
def test_full_tmpfs_during_checkpoint_write_keeps_previous(workspace: dict, tmp_path: Path) -> None:
    """The same with a real full disk: the checkpoint folder is a nearly full tmpfs."""
    run = tmp_path / "run"
    shutil.copytree(workspace["run"], run)
    before = snapshot(run)
    checkpoints = run / "checkpoints"
    saved = {p.name: p.read_bytes() for p in checkpoints.glob("*.pt")}
    shutil.rmtree(checkpoints)
    checkpoints.mkdir()
    size = sum(map(len, saved.values())) + 256 * 1024
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(checkpoints)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        for name, content in saved.items():
            (checkpoints / name).write_bytes(content)
        stat = os.statvfs(checkpoints)
        # Leave two pages free: the next checkpoint runs out of space mid-file.
        (checkpoints / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 8192))
        args = [*FIT_ONE_EPOCH, *RESUME_ONE_MORE_EPOCH, f"hydra.run.dir={run}"]
        done = run_script("train.py", args, tmp_path)
        assert done.returncode == 2, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0], done.stderr
        assert "Traceback" not in done.stderr
        after = snapshot(run)
        for name in ("checkpoints/last.pt", "checkpoints/best.pt"):
            assert after[name] == before[name], name
        assert not list(checkpoints.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)


@pytest.mark.slow
def test_real_bug_keeps_its_traceback(tmp_path: Path) -> None:
    require_data()
    bug = (
        "import sys, trainer.loop.trainer as t\n"
        "def broken(self): raise ZeroDivisionError('a bug in the loop')\n"
        "t.Trainer.fit = broken\n"
        "sys.argv = ['train.py', *sys.argv[1:]]\n"
        "from trainer.cli import train_main\n"
        "train_main()\n"
    )
    env = {**os.environ, "TRAINER_DATA_DIR": str(DATA_DIR)}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        [sys.executable, "-c", bug, *TINY, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode not in (0, 2)
    assert "Traceback" in done.stderr and "ZeroDivisionError: a bug in the loop" in done.stderr
    assert not [line for line in done.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    "args,env,exception",
    [
        (["optimizer.lr=0"], {"HYDRA_FULL_ERROR": "1"}, "trainer.errors.ConfigError"),
        (["model=mlpp"], {"HYDRA_FULL_ERROR": "1"}, "MissingConfigException"),
        (["--verbose", "optimizer.lr=0"], {}, "trainer.errors.ConfigError"),
        (["trainer.max_epoch=3", "--verbose"], {}, "ConfigCompositionException"),
    ],
    ids=["full-error-config", "full-error-hydra", "verbose-config", "verbose-hydra"],
)
def test_full_trace_on_request(args: list[str], env: dict, exception: str, tmp_path: Path) -> None:
    done = run_script("train.py", [*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and exception in done.stderr


def test_help_cfg_multirun_and_completion_still_work(tmp_path: Path) -> None:
    shown = run_script("train.py", ["--help"], tmp_path)
    assert shown.returncode == 0 and "Powered by Hydra" in shown.stdout
    groups = shown.stdout.split("== Config ==")[0]
    assert "trainer: debug, default" in groups and "schema" not in groups  # not a user's choice
    job = run_script("train.py", ["--cfg", "job", "model=cnn"], tmp_path)
    assert job.returncode == 0 and "trainer.models.cnn.CNN" in job.stdout
    completion = run_script("train.py", ["-sc", "install=bash"], tmp_path)
    assert completion.returncode == 0 and "complete" in completion.stdout
    # A sweep over bad values records each job's one-line error and exits 1 at the end
    # (the sweep's own exit code: some jobs failed), with no traceback.
    sweep = run_script("train.py", ["-m", "optimizer.lr=0,-1", *TINY], tmp_path)
    assert sweep.returncode == 1 and "Traceback" not in sweep.stderr
    errors = [line for line in sweep.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 of 2 jobs failed" in errors[0], sweep.stderr
    assert "ConfigError: optimizer.lr=0 must be > 0" in sweep.stderr


def test_did_you_mean_hints() -> None:
    from trainer.error_messages import close_matches

    keys = ["trainer.max_epochs", "trainer.max_steps", "optimizer.lr", "scheduler.max_lr"]
    keys += ["trainer.early_stopping.patience", "trainer.early_stopping.min_delta"]
    assert close_matches("trainer.max_epoch", keys) == ["trainer.max_epochs"]
    assert close_matches("lr", keys) == ["optimizer.lr"]
    assert close_matches("trainer.lr", keys) == ["optimizer.lr"]
    assert close_matches("trainer.early_stopping.patiense", keys) == [
        "trainer.early_stopping.patience"
    ]
    assert close_matches("trainer.foo", keys) == []


def test_troubleshooting_doc_shows_real_messages(tmp_path: Path) -> None:
    """The messages in docs/troubleshooting.md are exactly what the commands print."""
    require_data()
    lines = (REPO / "docs" / "troubleshooting.md").read_text().splitlines()
    shown = [
        (command.removeprefix("$ python train.py ").split(), output)
        for command, output in zip(lines, lines[1:], strict=False)
        if command.startswith("$ python train.py ") and output.startswith("error: ")
    ]
    assert len(shown) >= 3
    for args, output in shown:
        done = run_script("train.py", [*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
        assert done.returncode == 2
        assert done.stderr.splitlines()[-1] == output
