"""The framework's guarantees on the GPT recipe (experiment=shakespeare_char_cpu), run as a
user runs them: exact resume after SIGKILL, 2 processes equal to one, sweeps.

The recipe is shortened (30 steps, a small validation set) but keeps its model, data,
optimizer and schedule. Each process gets one thread: the tests share 2 cores with
each other, and oversubscribed threads make a GPT step ten times slower there.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import REPO, require_data, run_cli
from tests.run_checks import assert_same_final_state, scalars
from tests.test_sweep import job_folders, report, results

pytestmark = pytest.mark.slow

SHORT = [
    "experiment=shakespeare_char_cpu",
    "trainer.max_steps=30",
    "scheduler.warmup_steps=5",
    "trainer.val_every_n_steps=15",
    "trainer.log_every_n_steps=5",
    "checkpoint.every_n_steps=10",
    "data.val_windows=24",
    "task.sample_tokens=40",
    "trainer.progress_bar=false",
]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
FAULTY = ["loss._target_=trainer.testing.FaultInjectingLoss"]
TAGS = ["train/loss", "train/lr", "val/loss", "val/token_acc"]


def train_cmd(run: Path, *extra: str):
    require_data()
    args = [str(REPO / "train.py"), *SHORT, f"hydra.run.dir={run}", *extra]
    return run_cli(args, cwd=run.parent, env=ONE_THREAD)


def samples(run: Path) -> list[tuple[int, bytes]]:
    """The text samples the validations wrote to TensorBoard, with their steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    tag = "samples/text/text_summary"
    return [(e.step, e.tensor_proto.string_val[0]) for e in acc.Tensors(tag)]


def hparams(job: Path) -> dict:
    """The hyperparameters a job wrote for TensorBoard's HParams tab, by name."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(job / "tensorboard"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shortened recipe, uninterrupted, on one process."""
    run = tmp_path_factory.mktemp("straight") / "run"
    done = train_cmd(run)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_sigkill_then_resume_auto_ends_as_the_uninterrupted_run(straight, tmp_path) -> None:
    killed = tmp_path / "killed"
    done = train_cmd(killed, *FAULTY, "+loss.kill_at_batch=23")
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert not (killed / "results.json").exists()
    assert sorted(p.name for p in (killed / "checkpoints").glob("step_*.pt"))[-1] == (
        "step_00000020.pt"
    )
    done = train_cmd(killed, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    assert_same_final_state(straight, killed, 30, TAGS)
    # The samples at validation draw from their own generator: the same text both ways.
    assert samples(straight) == samples(killed)
    assert [step for step, _ in samples(killed)] == [15, 30]


def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(
    straight, tmp_path
) -> None:
    # Batch sizes are per process: 2 x 6 windows is the recipe's global batch of 12.
    two = train_cmd(tmp_path / "two", "trainer.devices=2", "data.batch_size=6")
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (a["world_size"], b["world_size"], a["steps"], b["steps"]) == (1, 2, 30, 30)
    for name, value in a["metrics"].items():
        assert abs(value - b["metrics"][name]) < 1e-6, (name, value, b["metrics"][name])
    for tag in ("train/loss", "val/loss"):
        curve_one, curve_two = scalars(straight, tag), scalars(tmp_path / "two", tag)
        assert [s for s, _ in curve_one] == [s for s, _ in curve_two], tag
        for (step, x), (_, y) in zip(curve_one, curve_two, strict=True):
            assert abs(x - y) < 1e-6, (tag, step, x, y)


def test_a_learning_rate_sweep_writes_a_job_each_with_report_and_hparams(
    straight, tmp_path
) -> None:
    sweep_dir = tmp_path / "sweep"
    args = [str(REPO / "train.py"), "-m", *SHORT, "optimizer.lr=3e-3,1e-3"]
    done = run_cli([*args, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    folders = job_folders(sweep_dir)
    assert len(folders) == 2
    losses = {}
    for num, folder in enumerate(folders):
        job = results(folder)
        assert job["status"] == "completed" and job["job_num"] == num and job["steps"] == 30
        lr = next(o for o in job["overrides"] if o.startswith("optimizer.lr="))
        assert job["provenance"]["config"]["optimizer"]["lr"] == float(lr.split("=")[1])
        losses[folder.name] = job["metrics"]["val/loss"]
        # Each job is its own TensorBoard run, with its hyperparameters in the HParams tab.
        assert hparams(folder)["optimizer.lr"].number_value == float(lr.split("=")[1])
    assert len(set(losses.values())) == 2  # the learning rate made a difference
    # lr=1e-3 is the recipe's own: its job, run second in the sweep's process, ends
    # exactly as the single run did (nothing leaks from one job into the next).
    assert "optimizer.lr=0.001" in folders[1].name
    assert losses[folders[1].name] == results(straight)["metrics"]["val/loss"]
    _, rows = report(sweep_dir)
    # Best (lowest val/loss) first: the report ranks by the monitored metric's mode.
    assert [r["job"] for r in rows] == sorted(losses, key=losses.get)
    assert [float(r["val/loss"]) for r in rows] == sorted(losses.values())
    assert {r["optimizer.lr"] for r in rows} == {"0.001", "0.003"}
