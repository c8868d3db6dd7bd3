"""The bring-your-own example, run as a user runs it: from its folder, through the CLI.

A GRU and a Dataset in one file (examples/byo/my_project.py) get exact resume
after SIGKILL and a 2-process run that equals one process.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch

from tests.conftest import REPO, require_data, run_cli
from trainer.checkpoint.io import load_checkpoint

EXAMPLE = REPO / "examples" / "byo"
SMALL = [
    "--config-dir",
    ".",
    "experiment=char_gru",
    "model.hidden_size=32",
    "data.dataset.block_size=32",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=4",
    "trainer.test_after_fit=false",
    "trainer.deterministic=true",
    "trainer.progress_bar=false",
    "checkpoint.every_n_steps=3",
]


def run_example(run: Path, *extra: str) -> None:
    done = run_cli([str(REPO / "train.py"), *SMALL, f"hydra.run.dir={run}", *extra], cwd=EXAMPLE)
    return done


def final_model(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_own_model_and_data_resume_exactly_after_sigkill(tmp_path: Path) -> None:
    require_data()
    done = run_example(tmp_path / "straight")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert results["steps"] == 16 and results["metrics"]["val/loss"] < 4.17  # ln 65 = 4.17
    killed = tmp_path / "killed"
    faulty = ["loss._target_=trainer.testing.FaultInjectingLoss", "+loss.kill_at_batch=11"]
    done = run_example(killed, *faulty)
    assert done.returncode == -signal.SIGKILL
    done = run_example(killed, "resume=auto")
    assert done.returncode == 0, done.stderr[-2000:]
    expected, resumed = final_model(tmp_path / "straight"), final_model(killed)
    for key, tensor in expected.items():
        assert torch.equal(tensor, resumed[key]), key


def test_own_model_and_data_on_two_processes_equal_one(tmp_path: Path) -> None:
    require_data()
    one = run_example(tmp_path / "one", "data.batch_size=16")
    # Batch sizes are per process: half of each on two processes is the same global batch.
    two = run_example(
        tmp_path / "two", "data.batch_size=8", "data.eval_batch_size=64", "trainer.devices=2"
    )
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())["metrics"]
    b = json.loads((tmp_path / "two" / "results.json").read_text())["metrics"]
    for name in ("val/loss", "val/token_acc"):
        assert abs(a[name] - b[name]) < 1e-5, (name, a[name], b[name])
