"""trainer.nan_policy on real MNIST runs, with NaN/Inf injected by a test-only loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import require_data, run_cli
from trainer.checkpoint.io import load_checkpoint
from trainer.errors import NonFiniteLossError
from trainer.loop.nan_guard import NanGuard
from trainer.run import train

FAULTY = "loss._target_=trainer.testing.FaultInjectingLoss"
RUN = [
    "model.hidden_sizes=[32]",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=12",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=4",
    "logger=none",
    FAULTY,
]


def _finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state["model"].values())


def test_error_names_the_step_and_saves_the_last_good_state(make_config, tmp_path: Path) -> None:
    cfg = make_config(*RUN, "+loss.nan_at_batches=[7]")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 7 \(epoch 0, batch 6\)"):
        train(cfg)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (last["global_step"], last["batch_in_epoch"]) == (6, 6) and _finite(last)
    assert not (tmp_path / "run" / "results.json").exists()
    # The saved state is a starting point: resume=auto continues from step 6 to the end.
    train(make_config(*RUN, "trainer.gradient_clip_val=1.0", "resume=auto"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 12 and results["resumed_from"].endswith("step_00000006.pt")


def test_error_with_accumulation_rewinds_to_the_start_of_the_step(make_config, tmp_path) -> None:
    cfg = make_config(
        *RUN,
        "trainer.accumulate_grad_batches=2",
        "+loss.nan_at_batches=[6]",
        "+loss.nonfinite_value=inf",
    )
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at step 3 \(epoch 0, batch 5\)"):
        train(cfg)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    # Step 3 is batches 4-5 (0-based): the saved position is its start, after step 2.
    assert (last["global_step"], last["batch_in_epoch"]) == (2, 4) and _finite(last)


def test_skip_policy_skips_counts_and_logs(make_config, tmp_path: Path) -> None:
    cfg = make_config(
        *RUN,
        "trainer.nan_policy=skip",
        "logger=tensorboard",
        "+loss.nan_at_batches=[3,8]",
    )
    train(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["nan_skipped_steps"] == 2
    assert results["steps"] == 10  # 12 batches, 2 skipped: no optimizer step for them
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert _finite(last) and last["trainer"]["nan_guard"]["skipped"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    skipped = [(e.step, e.value) for e in acc.Scalars("train/nan_skipped")]
    assert skipped[0] == (4, 1.0) and skipped[-1][1] == 2.0
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_skip_policy_stops_after_max_consecutive(make_config, tmp_path: Path) -> None:
    cfg = make_config(
        *RUN,
        "trainer.nan_policy=skip",
        "trainer.max_consecutive_nan=3",
        "+loss.nan_at_batches=[3,4,5]",
    )
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        train(cfg)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["global_step"] == 2 and _finite(last)


def test_deferred_check_never_checkpoints_after_a_nan(make_config, tmp_path, monkeypatch) -> None:
    # The accelerator path: the loss is only read back at log intervals and saves.
    monkeypatch.setattr(NanGuard, "reads_back_free", staticmethod(lambda device: False))
    cfg = make_config(*RUN, "checkpoint.every_n_steps=5", "+loss.nan_at_batches=[6]")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 6; .*step_00000005\.pt"):
        train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == ["step_00000005.pt"]
    assert load_checkpoint(ckpts / "last.pt")["global_step"] == 5


def test_cli_nan_error_is_one_line_with_exit_code_2(tmp_path: Path) -> None:
    require_data()
    proc = run_cli(
        ["train.py", *RUN, "+loss.nan_at_batches=[2]", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss is nan at step 2" in errors[0]
