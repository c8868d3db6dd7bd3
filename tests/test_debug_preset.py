"""`trainer=debug` is a smoke test: it also tests on a few batches, not the whole test set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import compose_config, require_data
from trainer.evaluate import evaluate
from trainer.run import train


def test_debug_preset_limits_the_test_batches(tmp_path: Path) -> None:
    require_data()
    run = tmp_path / "run"
    cfg = compose_config(["trainer=debug", "logger=none", "trainer.progress_bar=false"], run)
    assert cfg.trainer.limit_test_batches == 2
    train(cfg)
    tested = json.loads((run / "results.json").read_text())["metrics"]
    ckpt = run / "checkpoints" / "best.pt"

    def score(limit: str) -> dict[str, float]:
        overrides = [f"ckpt_path={ckpt}", f"trainer.limit_test_batches={limit}"]
        return evaluate(compose_config(overrides, tmp_path / f"eval-{limit}", "eval"))

    # The run scored best.pt on the first 2 test batches: exactly what eval.py gets
    # with the same limit, and not what it gets on all 10,000 images.
    two = score("2")
    assert two["test/acc"] == pytest.approx(tested["test/acc"], abs=0)
    assert two["test/loss"] == pytest.approx(tested["test/loss"], rel=1e-6)
    assert score("null")["test/acc"] != tested["test/acc"]
