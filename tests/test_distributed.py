"""torch.distributed on CPU with gloo, 2 processes: spawned, torchrun, inside sweeps."""

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

from tests.conftest import DATA_DIR, REPO, require_data, run_cli
from tests.readme_commands import readme_args
from trainer.checkpoint.io import load_checkpoint
from trainer.distributed.launch import threads_per_worker
from trainer.errors import CheckpointError
from trainer.run import train

pytestmark = pytest.mark.slow
TINY = ["model.hidden_sizes=[64]", "trainer.max_epochs=1", "trainer.log_every_n_steps=5"]


def spawned_workers(under: Path, parent: int | None = None) -> set[int]:
    """PIDs of live torch.multiprocessing workers (of `parent` only) working in `under` or
    a folder below it: the test's own, not those of a test running beside it."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cwd = Path(os.readlink(proc / "cwd"))
            except (OSError, IndexError, ValueError):
                continue
            mine = cwd == under or under in cwd.parents
            if b"multiprocessing.spawn" in cmdline and parent in (None, ppid) and mine:
                pids.add(int(proc.name))
    return pids


def test_two_ranks_match_one_process_with_double_batch(
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the workers share the cores out
    common = [*TINY, "trainer.limit_train_batches=12", "model.dropout=0.0"]
    train(make_config(*common, "data.batch_size=64", output_dir=tmp_path / "one"))
    two_ranks = readme_args("python train.py", "trainer.devices=2")  # the README's line
    train(make_config(*common, "data.batch_size=32", *two_ranks, output_dir=tmp_path / "two"))
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert one["global_step"] == two["global_step"] == 12
    for key, tensor in one["model"].items():
        assert torch.allclose(tensor, two["model"][key], atol=1e-6, rtol=0), key
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 12
    assert isinstance(two["rng"], list) and len(two["rng"]) == 2
    assert results["provenance"]["cpu_threads"] == threads_per_worker(2)


def test_checkpoints_move_between_world_sizes(make_config, tmp_path: Path) -> None:
    base = [*TINY, "trainer.limit_train_batches=8", "model.dropout=0.0", "trainer.max_epochs=2"]
    first = make_config(
        *base,
        "data.batch_size=32",
        "trainer.devices=2",
        "trainer.stop_at=0",
        output_dir=tmp_path / "ddp",
    )
    train(first)
    ckpt = tmp_path / "ddp" / "checkpoints" / "last.pt"
    # Same global batch (1 x 64 = 2 x 32): a single process continues the DDP run.
    train(make_config(*base, "data.batch_size=64", f"ckpt_path={ckpt}", output_dir=tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "results.json").read_text())["steps"] == 16
    # A different global batch cannot continue exactly: refused with the numbers to fix it,
    # also where it changes the schedule's length too (no limit: 2x the steps per epoch).
    for limits in (base, [b for b in base if "limit_train_batches" not in b]):
        with pytest.raises(CheckpointError, match="global batch of 64"):
            train(
                make_config(
                    *limits, "data.batch_size=32", f"ckpt_path={ckpt}", output_dir=tmp_path / "c"
                )
            )


def test_torchrun_val_accuracy_equals_single_process_eval(tmp_path: Path) -> None:
    require_data()
    run_dir = tmp_path / "run"
    done = run_cli(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *[a for a in readme_args("torchrun", "--standalone") if a != "train.py"],  # README
            str(REPO / "train.py"),
            *TINY,
            "trainer.limit_train_batches=20",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2
    assert not list(tmp_path.glob("outputs")), "non-zero ranks must not make run folders"
    done = run_cli(
        [
            str(REPO / "eval.py"),
            f"ckpt_path={run_dir / 'checkpoints' / 'best.pt'}",
            "split=val",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    single = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["metrics"]
    assert single["val/acc"] == results["metrics"]["val/acc"]
    assert single["val/loss"] == pytest.approx(results["metrics"]["val/loss"], rel=1e-6)


def test_two_node_torchrun_writes_one_run_folder(tmp_path: Path) -> None:
    """Two torchrun launchers on this machine stand in for two nodes of one process each,
    without a shared filesystem: RANK 1 has LOCAL_RANK 0, as on a real second node, and
    must leave no run folder; RANK 0's folder gets the results and checkpoints."""
    import socket

    require_data()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launchers = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"  # each "node" has its own working directory
        cwd.mkdir()
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=two-node-test",
            str(REPO / "train.py"),
            *TINY,
            "trainer.limit_train_batches=10",
            "logger=none",
        ]
        env = {**os.environ, "TRAINER_DATA_DIR": str(DATA_DIR)}
        launchers.append(
            subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    outputs = [launcher.communicate(timeout=300) for launcher in launchers]
    for launcher, (_, stderr) in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, stderr.decode()[-3000:]
    # outputs/<date>/<time> under the working directory of whichever node has rank 0.
    runs = [p.parent for p in tmp_path.glob("node*/outputs/*/*/results.json")]
    assert len(runs) == 1, sorted(str(p) for p in tmp_path.rglob("*"))
    assert [p.name for p in tmp_path.glob("node*/outputs")] == ["outputs"]
    results = json.loads((runs[0] / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 10
    assert (runs[0] / "checkpoints" / "last.pt").is_file()


def test_ddp_inside_a_multirun_sweep(tmp_path: Path) -> None:
    require_data()
    before = spawned_workers(tmp_path)
    done = run_cli(
        [
            str(REPO / "train.py"),
            "-m",
            *readme_args("python train.py -m", "trainer.devices=2"),  # the README's line
            *TINY,
            "trainer.limit_train_batches=10",
            "logger=none",
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 2
    assert all(json.loads(r.read_text())["world_size"] == 2 for r in results)
    assert spawned_workers(tmp_path) - before == set(), "worker processes were left behind"


def test_killing_one_rank_stops_the_run_with_a_clear_error(tmp_path: Path) -> None:
    require_data()
    before = spawned_workers(tmp_path)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "train.py"),
            "trainer.devices=2",
            "model.hidden_sizes=[64]",
            "trainer.max_epochs=50",
            "logger=none",
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
        env={**os.environ, "TRAINER_DATA_DIR": str(DATA_DIR)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if "first optimizer step done" in line:
            break
    victim = max(spawned_workers(tmp_path, parent=proc.pid))  # not another test's worker
    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - started < 60
    assert proc.returncode == 2
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "SIGKILL" in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert spawned_workers(tmp_path) - before == set()


def test_fsdp_matches_one_process_and_its_checkpoint_loads_anywhere(
    make_config, tmp_path: Path
) -> None:
    # SGD: its step is linear in the gradient, so the all-reduce's other summation order
    # stays at float rounding. Adam divides by sqrt(v) and, on CPUs whose kernels sum a
    # 64-row batch in another order than two 32-row halves (AVX2 here), grows it to 1e-3.
    common = [*TINY, "trainer.limit_train_batches=10", "model.dropout=0.0", "trainer.max_epochs=2"]
    common.append("optimizer=sgd")
    train(make_config(*common, "data.batch_size=64", output_dir=tmp_path / "one"))
    fsdp = [*common, "data.batch_size=32"]
    fsdp += readme_args("python train.py", "trainer.devices=2", "trainer.strategy=fsdp")  # README
    train(make_config(*fsdp, "trainer.stop_at=0", output_dir=tmp_path / "half"))
    ckpt = tmp_path / "half" / "checkpoints" / "last.pt"
    # Resume the FSDP run from its epoch-1 checkpoint: full state goes back into the shards.
    train(make_config(*fsdp, f"ckpt_path={ckpt}", output_dir=tmp_path / "fsdp"))
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    sharded = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.pt")
    assert sharded["strategy"] == "fsdp" and sharded["global_step"] == 20
    for key, tensor in one.items():
        assert torch.allclose(tensor, sharded["model"][key], atol=1e-6, rtol=0), key
    # Optimizer state is laid out per strategy: resuming FSDP state under DDP is refused.
    with pytest.raises(CheckpointError, match="trainer.strategy=fsdp"):
        train(
            make_config(
                *common, "data.batch_size=64", f"ckpt_path={ckpt}", output_dir=tmp_path / "x"
            )
        )


NAN_ON_RANK_1 = [
    "loss._target_=trainer.testing.FaultInjectingLoss",
    "+loss.nan_at_batches=[6]",
    "+loss.nan_on_ranks=[1]",
]


def test_a_nan_on_one_rank_stops_every_rank_with_one_clear_error(tmp_path: Path) -> None:
    """The other rank must not wait in a gradient all-reduce until the group times out."""
    require_data()
    before = spawned_workers(tmp_path)
    started = time.monotonic()
    done = run_cli(
        [
            str(REPO / "train.py"),
            *TINY,
            "trainer.devices=2",
            "trainer.limit_train_batches=20",
            "trainer.dist_timeout_s=300",
            "logger=none",
            *NAN_ON_RANK_1,
            "hydra.run.dir=run",
        ],
        cwd=tmp_path,
    )
    assert time.monotonic() - started < 100, "a rank waited for the process-group timeout"
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    # As one process does: the state after the last good step (5) is saved and named.
    assert "loss is nan at step 6" in errors[0] and "step_00000005.pt" in errors[0]
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["global_step"] == 5
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert spawned_workers(tmp_path) - before == set()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nan_policy_skip_skips_the_same_step_on_every_rank(
    make_config, tmp_path: Path, strategy: str
) -> None:
    common = [*TINY, "trainer.limit_train_batches=20", "model.dropout=0.0", "logger=none"]
    train(
        make_config(
            *common,
            "data.batch_size=32",
            "trainer.devices=2",
            f"trainer.strategy={strategy}",
            "trainer.nan_policy=skip",
            *NAN_ON_RANK_1,
            output_dir=tmp_path / "two",
        )
    )
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["nan_skipped_steps"] == 1 and results["steps"] == 19
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert two["trainer"]["nan_guard"]["skipped"] == 1
    assert all(torch.isfinite(t).all() for t in two["model"].values())
