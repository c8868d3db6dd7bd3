"""Real, short training runs on MNIST through train(cfg)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.checkpoint.io import load_checkpoint
from trainer.run import train

FAST = ["model.hidden_sizes=[64]", "trainer.log_every_n_steps=10"]


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_short_run_learns_and_writes_results_and_tensorboard(make_config, tmp_path: Path) -> None:
    cfg = make_config(*FAST, "trainer.max_epochs=2", "trainer.limit_train_batches=60")
    value = train(cfg)
    out = Path(cfg.paths.output_dir)
    results = json.loads((out / "results.json").read_text())
    # 10 classes: chance is 0.1; 120 steps of a small MLP gets far beyond it.
    assert results["metrics"]["test/acc"] > 0.85
    assert value == results["metrics"]["val/acc"]  # the optimized_metric
    assert results["epochs"] == 2 and results["steps"] == 120
    assert results["best_epoch"] in (1, 2) and results["stop_reason"] == "max_epochs"
    assert results["wall_time_s"] > 0

    scalars = read_scalars(out / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/samples_per_s", "val/loss", "val/acc", "test/acc"):
        assert tag in scalars, tag
    assert "train/epoch_time_s" in scalars
    assert [step for step, _ in scalars["val/acc"]] == [60, 120]
    assert scalars["train/loss"][-1][1] < scalars["train/loss"][0][1]
    assert scalars["test/acc"][-1][1] == pytest.approx(results["metrics"]["test/acc"], abs=1e-6)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert "config/text_summary" in acc.Tags()["tensors"]
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and "_hparams_/session_start_info" in plugins

    last = load_checkpoint(out / "checkpoints" / "last.pt")
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "global_step",
        "rng",
        "config",
    ):
        assert key in last
    assert last["epoch"] == 2 and last["global_step"] == 120
    assert (out / "checkpoints" / "best.pt").is_file()


def test_resume_at_epoch_boundary_matches_straight_run(make_config, tmp_path: Path) -> None:
    common = [*FAST, "trainer.max_epochs=2", "trainer.limit_train_batches=30", "model.dropout=0.2"]
    straight = make_config(*common, output_dir=tmp_path / "straight")
    train(straight)
    # Stop after epoch 1 (stop_at is met at once), then resume from its last.pt.
    first = make_config(*common, "trainer.stop_at=0", output_dir=tmp_path / "first")
    train(first)
    ckpt = tmp_path / "first" / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["epoch"] == 1
    resumed = make_config(*common, f"ckpt_path={ckpt}", output_dir=tmp_path / "resumed")
    train(resumed)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["global_step"] == b["global_step"] == 60
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    ra = json.loads((tmp_path / "straight" / "results.json").read_text())
    rb = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert ra["metrics"] == rb["metrics"]


def test_gradient_accumulation_and_clipping(make_config) -> None:
    cfg = make_config(
        *FAST,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=40",
        "trainer.accumulate_grad_batches=4",
        "trainer.gradient_clip_val=0.5",
        "scheduler=cosine",
        "optimizer=sgd",
    )
    train(cfg)
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert results["steps"] == 10  # 40 micro-batches / 4
    assert results["metrics"]["val/acc"] > 0.5


def test_max_steps_stops_mid_epoch_and_checkpoints(make_config) -> None:
    cfg = make_config(*FAST, "trainer.max_epochs=null", "trainer.max_steps=25")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 25 and results["stop_reason"] == "max_steps"
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (last["epoch"], last["batch_in_epoch"], last["global_step"]) == (0, 25, 25)


def test_early_stopping_and_stop_at(make_config, tmp_path: Path) -> None:
    cfg = make_config(
        *FAST,
        "trainer.max_epochs=20",
        "trainer.limit_train_batches=20",
        "trainer.val_every_n_steps=5",
        "trainer.early_stopping.patience=2",
        "trainer.early_stopping.min_delta=0.5",
        output_dir=tmp_path / "es",
    )
    train(cfg)
    results = json.loads((tmp_path / "es" / "results.json").read_text())
    # min_delta=0.5 of accuracy is never met after the first validation: stop after 2 more.
    assert results["stop_reason"] == "early_stopping" and results["steps"] == 15

    cfg = make_config(
        *FAST,
        "trainer.max_epochs=20",
        "trainer.stop_at=0.9",
        output_dir=tmp_path / "stop_at",
    )
    train(cfg)
    results = json.loads((tmp_path / "stop_at" / "results.json").read_text())
    assert results["stop_reason"] == "stop_at" and results["last_val"]["val/acc"] >= 0.9
    assert results["epochs"] < 20


def test_bf16_autocast_and_dataloader_path(make_config) -> None:
    cfg = make_config(
        *FAST,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=30",
        "trainer.precision=bf16",
        "data.in_memory=false",
        "data.num_workers=1",
    )
    train(cfg)
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert results["metrics"]["test/acc"] > 0.7


@pytest.mark.slow
def test_compile_option_trains(make_config) -> None:
    cfg = make_config(
        *FAST, "trainer.max_epochs=1", "trainer.limit_train_batches=20", "trainer.compile=true"
    )
    train(cfg)
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert results["metrics"]["test/acc"] > 0.6
    state = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.pt")
    assert not any(k.startswith("_orig_mod.") for k in state["model"])


def test_deterministic_runs_are_identical(make_config, tmp_path: Path) -> None:
    common = [
        *FAST,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=15",
        "trainer.deterministic=true",
    ]
    train(make_config(*common, output_dir=tmp_path / "a"))
    train(make_config(*common, output_dir=tmp_path / "b"))
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
