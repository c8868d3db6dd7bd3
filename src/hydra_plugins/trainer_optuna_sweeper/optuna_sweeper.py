"""`hydra/sweeper=trainer_optuna`: the Optuna sweeper, able to prune trials.

hydra-optuna-sweeper asks Optuna for trials and launches each as a Hydra job,
but a job cannot see its trial, so it cannot report intermediate values, and a
stopped trial could only be recorded as COMPLETE. This sweeper keeps the
plugin's search space syntax and options, and adds:

- `pruner`: an Optuna pruner (`_target_: optuna.pruners.MedianPruner`, ...), or null;
- trial N runs as job N (folder `N_<overrides>`), so a job finds its trial in
  the study (trainer.sweep.pruning) and a continued study never reuses a folder;
- a job that its pruner stopped is told to the study as PRUNED, a job that
  failed (recorded by trainer.sweep.SweepCallback) as FAIL, and the search goes
  on while the failures of a batch stay within `max_failure_rate`;
- continuing a study: trials a killed sweep left RUNNING (no heartbeat for
  2 x `heartbeat_interval` s) become FAIL, and a fixed sampler seed is advanced
  by the number of trials so far, so new points are proposed.

It lives in the hydra_plugins namespace because Hydra only instantiates
sweepers from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

try:  # light: no optuna import until a sweep starts
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
except ImportError:  # the `sweep` extra is not installed
    OptunaSweeperConf = None

TARGET = "hydra_plugins.trainer_optuna_sweeper.optuna_sweeper.TrainerOptunaSweeper"


class TrainerOptunaSweeper(Sweeper):
    def __init__(self, pruner: Any = None, heartbeat_interval: int = 60, **kwargs: Any) -> None:
        from hydra_plugins.trainer_optuna_sweeper._impl import PruningOptunaSweeperImpl

        self.sweeper = PruningOptunaSweeperImpl(
            pruner=pruner, heartbeat_interval=heartbeat_interval, **kwargs
        )

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)


if OptunaSweeperConf is not None:

    @dataclass
    class TrainerOptunaSweeperConf(OptunaSweeperConf):
        _target_: str = TARGET
        # An Optuna pruner config, e.g. {_target_: optuna.pruners.MedianPruner}; null: none.
        pruner: Any = None
        # Fraction of a batch of trials that may fail before the search stops.
        max_failure_rate: float = 1.0
        # Seconds between a running trial's heartbeats in the study storage; a trial
        # silent for twice as long (its sweep was killed) is marked FAIL when the
        # study is continued.
        heartbeat_interval: int = 60

    ConfigStore.instance().store(
        group="hydra/sweeper",
        name="trainer_optuna",
        node=TrainerOptunaSweeperConf,
        provider="trainer",
    )


def register() -> None:
    """Make the sweeper known where Hydra's plugin scan misses it (editable installs)."""
    if OptunaSweeperConf is not None:
        from hydra.core.plugins import Plugins

        Plugins.instance().register(TrainerOptunaSweeper)
