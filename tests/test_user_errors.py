"""Every bad input gets one `error:` line, exit code 2, no traceback, and loses nothing.

Each case of the table is a real `python train.py ...` (or eval.py) subprocess
pointed at the output folder of a finished run, so the test also proves that a
failing command leaves that run's checkpoints, results and log as they were.
The cases run in a thread pool; most fail before any data is read.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.conftest import DATA_DIR, REPO, require_data

TINY = ["model.hidden_sizes=[16]", "logger=none", "trainer.progress_bar=false"]
FIT_ONE_EPOCH = [
    *TINY,
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=1",
    "data.eval_batch_size=2000",
]


@dataclass(frozen=True)
class Case:
    id: str
    args: list[str]
    phrase: str
    script: str = "train.py"
    env: dict[str, str] = field(default_factory=dict)
    # False for cases that cannot point Hydra at the finished run's folder.
    in_run_dir: bool = True
    # Hydra's own flags (--cfg, -m, -cn) go before all overrides.
    flags: list[str] = field(default_factory=list)


CASES = [
    # Hydra composition: unknown group option, unknown keys, types, override syntax.
    Case("group-option", ["model=mlpp"], "model=mlpp is not an option; available: cnn, mlp"),
    Case("group-option-data", ["data=cifar"], "data=cifar is not an option; available:"),
    Case("key-typo", ["trainer.max_epoch=3"], "did you mean trainer.max_epochs"),
    Case("key-misplaced", ["lr=0.1"], "unknown config key lr; did you mean optimizer.lr"),
    Case("model-key-typo", ["model.hidden_sizez=[8]"], "did you mean model.hidden_sizes"),
    Case("nested-key-typo", ["trainer.early_stopping.patiense=2"], "early_stopping.patience"),
    Case("wrong-type", ["trainer.max_epochs=abc"], "trainer.max_epochs='abc' has the wrong type"),
    Case("override-syntax", ["trainer.max_epochs=[1"], "cannot parse the override"),
    Case("ambiguous-list", ["data.batch_size=1,2"], "data.batch_size=1,2 is ambiguous"),
    Case("delete-missing-key", ["~trainer.nothing"], "'trainer.nothing' does not exist"),
    Case("no-such-config", [], "there is no config named 'nope'", flags=["-cn", "nope"]),
    Case("cfg-job-typo", ["trainer.max_epoch=3"], "did you mean", flags=["--cfg", "job"]),
    Case("multirun-option", ["model=mlpp,cnn"], "model=mlpp is not an option", flags=["-m"]),
    # Keys the target does not take, and targets that do not exist.
    Case("added-model-kwarg", ["+model.foo=1"], "model.foo is not an argument of"),
    Case("added-trainer-key", ["+trainer.foo=1"], "unknown config key trainer.foo"),
    Case("bad-target", ["model._target_=trainer.models.mlp.Nope"], "cannot be imported"),
    Case("interpolation", ["model.in_shape=${data.shap}"], "cannot resolve an interpolation"),
    # Values, checked before data loads.
    Case("lr-zero", ["optimizer.lr=0"], "optimizer.lr=0 must be > 0"),
    Case("batch-size-zero", ["data.batch_size=0"], "data.batch_size=0 must be >= 1"),
    Case("no-length", ["trainer.max_epochs=null"], "set trainer.max_epochs or trainer.max_steps"),
    Case("steps-zero", ["trainer.max_steps=0"], "trainer.max_steps=0 must be >= 1"),
    Case("precision-alias", ["trainer.precision=16-mixed"], "did you mean trainer.precision=fp16"),
    Case(
        "fp16-on-cpu",
        ["trainer.accelerator=cpu", "trainer.precision=fp16"],
        "trainer.precision=fp16 needs a CUDA GPU",
    ),
    Case("accumulate-zero", ["trainer.accumulate_grad_batches=0"], "must be >= 1"),
    Case("clip-negative", ["trainer.gradient_clip_val=-1"], "gradient_clip_val=-1.0 must be > 0"),
    Case("monitor", ["trainer.monitor=val/accuracy"], "not a validation metric"),
    Case(
        "stopping-without-val",
        ["data.val_size=0", "trainer.early_stopping.patience=2"],
        "need validation, but data.val_size=0",
    ),
    Case(
        "optimized-metric",
        ["optimized_metric=test/acc", "trainer.test_after_fit=false"],
        "optimized_metric='test/acc' is not a result of this run",
    ),
    Case("accelerator-name", ["trainer.accelerator=tpu"], "trainer.accelerator='tpu' is not one"),
    Case("devices-zero", ["trainer.devices=0"], "trainer.devices=0 must be >= 1"),
    Case("data-name", ["data.name=MNSIT"], "did you mean MNIST"),
    Case("optimizer-range", ["optimizer.betas=[1.5,0.9]"], "Invalid beta parameter"),
    # Model/data mismatch, caught by a dry forward at setup.
    Case("model-input", ["model.in_shape=[1,32,32]"], "model.in_shape=[1, 32, 32]"),
    Case("model-classes", ["model.num_classes=5"], "data.num_classes=10"),
    # Output.
    Case("output-dir", ["paths.output_dir={file}/out"], "is not a writable folder"),
    Case(
        "run-dir",
        ["hydra.run.dir={file}/run"],
        "cannot write the run's output folder",
        in_run_dir=False,
    ),
    # Data, read through the real loader.
    Case("data-missing", ["data.download=false"], "downloading is off", env={"D": "missing"}),
    Case("data-corrupt-gz", ["data.download=false"], "truncated gzip", env={"D": "gz"}),
    Case("data-magic", ["data.download=false"], "bad magic number", env={"D": "magic"}),
    Case("data-truncated", ["data.download=false"], "truncated data", env={"D": "truncated"}),
    Case("data-count", ["data.download=false"], "holds 9999 labels", env={"D": "count"}),
    Case("data-dir-unwritable", ["paths.data_dir={file}/data"], "is not writable"),
    Case("labels-vs-classes", ["data.num_classes=5"], "labels range from 0 to 9"),
    Case("val-size", ["data.val_size=60000"], "smaller than the 60000 training images"),
    Case("onecycle-too-short", ["trainer.max_steps=2"], "scheduler=onecycle needs each phase"),
    # Checkpoints.
    Case("ckpt-missing", ["ckpt_path={tmp}/nope.pt"], "does not exist"),
    Case("ckpt-not-a-ckpt", ["ckpt_path={file}"], "is not a checkpoint"),
    Case("ckpt-truncated", ["ckpt_path={tmp}/truncated.pt"], "truncated or corrupt"),
    Case(
        "ckpt-other-model",
        ["ckpt_path={ckpt}", "model.hidden_sizes=[32]"],
        "does not fit this model (shape mismatch: net.",
    ),
    Case("ckpt-newer", ["ckpt_path={tmp}/newer.pt"], "newer than this version's"),
    # Evaluation.
    Case("eval-no-ckpt", [], "ckpt_path is required", script="eval.py"),
    Case("eval-split", ["ckpt_path={ckpt}", "split=train"], "must be test or val", "eval.py"),
    Case("eval-not-a-ckpt", ["ckpt_path={file}"], "is not a checkpoint", "eval.py"),
    Case("eval-newer", ["ckpt_path={tmp}/newer.pt"], "newer than this version's", "eval.py"),
]
# These get past the plain value checks, so they import torch (~2 s of CPU each) and
# some read the dataset; the others fail in well under a second.
SLOW_IDS = {
    "added-model-kwarg", "bad-target", "interpolation", "data-name", "optimizer-range",
    "model-input", "model-classes", "fp16-on-cpu", "data-missing", "data-corrupt-gz",
    "data-magic", "data-truncated", "data-count", "data-dir-unwritable", "labels-vs-classes",
    "val-size", "onecycle-too-short", "ckpt-not-a-ckpt", "ckpt-truncated", "ckpt-other-model",
    "ckpt-newer", "eval-no-ckpt", "eval-split", "eval-not-a-ckpt", "eval-newer",
    "devices-too-many", "no-cuda",
}  # fmt: skip
if torch.cuda.is_available():
    CASES.append(Case("devices-too-many", ["trainer.devices=999"], "device"))
else:
    CASES.append(Case("no-cuda", ["trainer.accelerator=cuda"], "no CUDA GPU is visible"))


def run_script(
    script: str, args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"TRAINER_DATA_DIR": str(DATA_DIR), **(env or {})})
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def make_bad_data(root: Path) -> None:
    """MNIST folders with one broken file each; the good files are symlinks."""
    source = DATA_DIR / "MNIST" / "raw"
    labels = gzip.decompress((source / "t10k-labels-idx1-ubyte.gz").read_bytes())
    images = gzip.decompress((source / "t10k-images-idx3-ubyte.gz").read_bytes())
    broken = {
        "missing": ("t10k-labels-idx1-ubyte.gz", None),
        "gz": ("t10k-labels-idx1-ubyte.gz", gzip.compress(labels)[:3000]),
        "magic": ("t10k-labels-idx1-ubyte", b"\x12\x34\x08\x01" + labels[4:]),
        "truncated": ("t10k-images-idx3-ubyte", images[: len(images) // 2]),
        "count": ("t10k-labels-idx1-ubyte", labels[:4] + struct.pack(">I", 9999) + labels[8:-1]),
    }
    for name, (bad_file, content) in broken.items():
        raw = root / name / "MNIST" / "raw"
        raw.mkdir(parents=True)
        stem = bad_file.removesuffix(".gz")
        for good in source.iterdir():
            if good.name.removesuffix(".gz") != stem:
                (raw / good.name).symlink_to(good)
        if content is not None:
            (raw / bad_file).write_bytes(content)


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
    ckpt = run / "checkpoints" / "last.pt"
    (tmp / "truncated.pt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "format_version": 99}, tmp / "newer.pt")
    (tmp / "notes.txt").write_text("not a checkpoint\n")
    make_bad_data(tmp / "data")
    before = snapshot(run)
    assert {"checkpoints/last.pt", "checkpoints/best.pt", "results.json", "train.log"} <= set(
        before
    )
    return {"tmp": tmp, "run": run, "ckpt": ckpt, "before": before}


def run_cases(workspace: dict, cases: list[Case]) -> dict[str, tuple]:
    """Run cases two at a time; returns each one's process and the run folder after it."""
    tmp, run = workspace["tmp"], workspace["run"]
    values = {"tmp": tmp, "file": tmp / "notes.txt", "ckpt": workspace["ckpt"]}

    def run_case(case: Case) -> tuple[subprocess.CompletedProcess, dict]:
        args = list(case.args)
        for name, value in values.items():
            args = [a.replace(f"{{{name}}}", str(value)) for a in args]
        if case.in_run_dir:
            args.append(f"hydra.run.dir={run}")
        env = {}
        if "D" in case.env:
            env["TRAINER_DATA_DIR"] = str(tmp / "data" / case.env["D"])
        train_args = TINY if case.script == "train.py" and "-cn" not in case.flags else []
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
    return run_cases(workspace, SLOW_CASES)


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


def check_case(case: Case, done: subprocess.CompletedProcess, after: dict, before: dict) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, done.stderr
    assert case.phrase in error_lines[0]
    assert "Error executing job" not in done.stderr
    for name, content in before.items():
        if name.endswith(".log"):
            # Hydra appends to the log file; what was there stays.
            assert after[name].startswith(content), name
        else:
            assert after[name] == content, f"{name} changed"
    assert not [n for n in set(after) - set(before) if not n.endswith(".log")]


# A full disk, simulated by a file object that fails like one: a second run into the
# folder of a finished run hits ENOSPC on its first checkpoint write.
FULL_DISK_RUNNER = """
import errno, os, sys, types
import trainer.checkpoint as checkpoint

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
def test_full_disk_during_checkpoint_write_keeps_previous(workspace: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(workspace["run"], run)
    before = snapshot(run)
    args = [*FIT_ONE_EPOCH, "seed=7", f"hydra.run.dir={run}"]
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
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "results.json"):
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
        done = run_script("train.py", [*FIT_ONE_EPOCH, "seed=7", f"hydra.run.dir={run}"], tmp_path)
        assert done.returncode == 2, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0], done.stderr
        assert "Traceback" not in done.stderr
        after = snapshot(run)
        for name in ("checkpoints/last.pt", "checkpoints/best.pt", "results.json"):
            assert after[name] == before[name], name
        assert not list(checkpoints.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)


@pytest.mark.slow
def test_real_bug_keeps_its_traceback(tmp_path: Path) -> None:
    require_data()
    bug = (
        "import sys, trainer.trainer as t\n"
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
    job = run_script("train.py", ["--cfg", "job", "model=cnn"], tmp_path)
    assert job.returncode == 0 and "trainer.models.cnn.CNN" in job.stdout
    completion = run_script("train.py", ["-sc", "install=bash"], tmp_path)
    assert completion.returncode == 0 and "complete" in completion.stdout
    # A sweep over bad values fails like a single run: one line, exit 2.
    sweep = run_script("train.py", ["-m", "optimizer.lr=0,-1", *TINY], tmp_path)
    assert sweep.returncode == 2 and "Traceback" not in sweep.stderr
    assert "error: optimizer.lr=0 must be > 0" in sweep.stderr.splitlines()


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
