"""What a browser shows of a run in a real TensorBoard: scalars, config text, HParams.

A `tensorboard --logdir ... --port <free> --host 127.0.0.1` server is started on a
real run's folder and on a real 2-job sweep's folder, and read through the same
HTTP data API its web page uses. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, require_data, run_cli
from tests.tensorboard_server import served

TINY = [
    "model.hidden_sizes=[32]",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=10",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=2",
    "trainer.progress_bar=false",
]


def metric_values(session_group: dict) -> dict[str, float]:
    return {m["name"]["tag"]: m["value"] for m in session_group["sessions"][0]["metricValues"]}


@pytest.mark.slow
def test_tensorboard_shows_a_run(tmp_path: Path) -> None:
    require_data()
    run = tmp_path / "run"
    done = run_cli([str(REPO / "train.py"), *TINY, f"hydra.run.dir={run}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((run / "results.json").read_text())
    with served(["--logdir", str(run)]) as tb:
        assert tb.wait_for(lambda: "val/acc" in tb.scalar_tags().get("tensorboard", []))
        assert tb.runs() == ["tensorboard"]
        loss = tb.scalars("tensorboard", "train/loss")
        assert [step for _, step, _ in loss] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
        assert loss[-1][2] < loss[0][2]  # it learned
        val = tb.scalars("tensorboard", "val/acc")
        assert [step for _, step, _ in val] == [10, 20]
        assert max(v for _, _, v in val) == pytest.approx(results["metrics"]["val/acc"])
        config = tb.text("tensorboard", "config/text_summary")
        assert "_target_: trainer.models.mlp.MLP" in config and "limit_train_batches: 10" in config
        (group,) = tb.hparams_sessions()
        assert group["hparams"]["model"] == "MLP" and group["hparams"]["data"] == "MNIST"
        assert group["hparams"]["trainer.limit_train_batches"] == 10  # an override
        shown = metric_values(group)
        for name in ("val/acc", "test/acc", "test/loss"):
            assert shown[name] == pytest.approx(results["metrics"][name]), name


@pytest.mark.slow
def test_tensorboard_shows_both_jobs_of_a_sweep(tmp_path: Path) -> None:
    require_data()
    sweep = tmp_path / "sweep"
    args = ["-m", "optimizer.lr=1e-3,3e-3", *TINY, f"hydra.sweep.dir={sweep}"]
    done = run_cli([str(REPO / "train.py"), *args], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    jobs = {p.name: json.loads((p / "results.json").read_text()) for p in sweep.glob("*/")}
    jobs.pop(".hydra", None)
    assert len(jobs) == 2
    runs = sorted(f"{name}/tensorboard" for name in jobs)
    with served(["--logdir", str(sweep)]) as tb:
        assert tb.wait_for(lambda: sorted(tb.scalar_tags()) == runs)
        for run in runs:
            assert tb.scalars(run, "val/acc") and tb.scalars(run, "train/loss")
        groups = tb.wait_for(lambda: len(tb.hparams_sessions()) == 2 and tb.hparams_sessions())
        assert sorted(g["hparams"]["optimizer.lr"] for g in groups) == [0.001, 0.003]
        for group in groups:
            name = group["sessions"][0]["name"].removesuffix("/tensorboard").strip("/.")
            assert metric_values(group)["test/acc"] == pytest.approx(
                jobs[name]["metrics"]["test/acc"]
            )
