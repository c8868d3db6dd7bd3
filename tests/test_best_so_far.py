"""trainer.loop.best: the best value so far, early stopping and stop_at, and their checkpoint."""

from __future__ import annotations

import pytest

from trainer.errors import ConfigError
from trainer.loop.best import BestSoFar


def test_min_mode_counts_validations_without_an_improvement_of_min_delta() -> None:
    best = BestSoFar("val/loss", maximize=False, min_delta=0.1, patience=2)
    assert best.update({"val/loss": 1.0, "val/acc": 0.5}, epoch=0, step=10) == (True, None)
    # 0.95 is lower, but not by min_delta: not an improvement.
    assert best.update({"val/loss": 0.95}, epoch=1, step=20) == (False, None)
    assert best.update({"val/loss": 0.85}, epoch=2, step=30) == (True, None)
    assert (best.value, best.epoch, best.step) == (0.85, 2, 30)
    assert best.update({"val/loss": 0.9}, epoch=3, step=40) == (False, None)
    assert best.update({"val/loss": 0.9}, epoch=4, step=50) == (False, "early_stopping")
    assert best.metrics == {"val/loss": 0.85}


def test_max_mode_and_stop_at() -> None:
    best = BestSoFar("val/acc", maximize=True, stop_at=0.9)
    assert best.update({"val/acc": 0.5}, epoch=0, step=1) == (True, None)
    assert best.update({"val/acc": 0.4}, epoch=1, step=2) == (False, None)
    assert best.bad_validations == 1
    assert best.update({"val/acc": 0.9}, epoch=2, step=3) == (True, "stop_at")


def test_state_round_trip_continues_the_patience_count() -> None:
    best = BestSoFar("val/loss", maximize=False, patience=2)
    best.update({"val/loss": 1.0}, epoch=0, step=5)
    best.update({"val/loss": 2.0}, epoch=1, step=10)
    state = best.state_dict()
    assert set(state) == {"best_value", "best_metrics", "best_epoch", "best_step",
                          "bad_validations"}  # fmt: skip
    resumed = BestSoFar("val/loss", maximize=False, patience=2)
    resumed.load_state_dict(state)
    assert resumed == best
    assert resumed.update({"val/loss": 3.0}, epoch=2, step=15) == (False, "early_stopping")


def test_a_monitor_that_is_not_logged_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"trainer.monitor='val/f1'.*\['val/loss'\]"):
        BestSoFar("val/f1", maximize=True).update({"val/loss": 1.0}, epoch=0, step=1)
