"""The monitored metric's best value so far, and the stop rules that read it.

`trainer.monitor` / `monitor_mode` name the metric; early stopping counts validations
without an improvement of at least `min_delta`, and `stop_at` ends a run once the
metric reaches a target. A checkpoint keeps this history, so a resumed run keeps
counting where the interrupted one was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from trainer.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class BestSoFar:
    monitor: str
    maximize: bool
    min_delta: float = 0.0
    patience: int | None = None
    stop_at: float | None = None
    # The history: what a checkpoint carries.
    value: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    epoch: int = -1
    step: int = -1
    bad_validations: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> BestSoFar:
        """From the trainer config's monitor, monitor_mode, early_stopping and stop_at."""
        return cls(
            monitor=cfg.monitor,
            maximize=cfg.monitor_mode == "max",
            min_delta=cfg.early_stopping.min_delta,
            patience=cfg.early_stopping.patience,
            stop_at=cfg.stop_at,
        )

    def check_logged(self, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise ConfigError(
                f"trainer.monitor={self.monitor!r} is not a logged metric; "
                f"choose one of {sorted(metrics)}"
            )

    def update(self, metrics: dict[str, float], epoch: int, step: int) -> tuple[bool, str | None]:
        """Record one validation: (whether it is the new best, why to stop now or None)."""
        self.check_logged(metrics)
        value = metrics[self.monitor]
        delta = self.min_delta
        improved = self.value is None or (
            value > self.value + delta if self.maximize else value < self.value - delta
        )
        if improved:
            self.value, self.metrics, self.epoch, self.step = value, metrics, epoch, step
            self.bad_validations = 0
        else:
            self.bad_validations += 1
        stop = None
        if self.patience is not None and self.bad_validations >= self.patience:
            stop = "early_stopping"
            log.info(
                "early stopping: %s did not improve for %d validations",
                self.monitor,
                self.patience,
            )
        target = self.stop_at
        if target is not None and (value >= target if self.maximize else value <= target):
            stop = "stop_at"
            log.info("stop_at reached: %s=%.4f (target %s)", self.monitor, value, target)
        return improved, stop

    def state_dict(self) -> dict[str, Any]:
        # The keys checkpoints have always used, inside their "trainer" entry.
        return {
            "best_value": self.value,
            "best_metrics": self.metrics,
            "best_epoch": self.epoch,
            "best_step": self.step,
            "bad_validations": self.bad_validations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.metrics = state["best_value"], dict(state["best_metrics"])
        self.epoch, self.step = state["best_epoch"], state["best_step"]
        self.bad_validations = state["bad_validations"]
