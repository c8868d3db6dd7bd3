"""Optuna pruning from inside a sweep job.

The Optuna sweeper runs each trial as a Hydra job and never hands the job its
`optuna.Trial`. The trainer's sweeper (hydra_plugins.trainer_optuna_sweeper)
launches trial N as job N, so a job opens the study from the sweeper's storage
and study name (both in its own `hydra.sweeper` config), takes trial
`hydra.job.num`, checks that the trial's parameters are this job's overrides,
and then reports the optimized metric after every epoch and asks the pruner
whether to stop. A pruned job marks its trial (user attribute `pruned_at_epoch`)
and stops training; the sweeper then records the trial as PRUNED.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

SWEEPER_TARGET = "hydra_plugins.trainer_optuna_sweeper.optuna_sweeper.TrainerOptunaSweeper"
PRUNED_ATTR = "pruned_at_epoch"


def absolute_storage(url: str | None, cwd: str) -> str | None:
    """A relative SQLite path resolved against the directory the sweep started in.

    Jobs may run elsewhere (submitit workers, `hydra.job.chdir=true`); every
    process must open the same database file.
    """
    prefix = "sqlite:///"
    if not url or not url.startswith(prefix) or url[len(prefix) :].startswith("/"):
        return url
    return prefix + os.path.abspath(os.path.join(cwd, url[len(prefix) :]))


class OptunaPruning:
    """Trainer callback: report `metric` at each epoch end; stop if the pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if trainer.batch_in_epoch:  # a mid-epoch validation: Optuna steps are epochs
            return
        if self.metric not in metrics:
            raise ConfigError(
                f"optimized_metric={self.metric!r} is not a validation metric, so Optuna "
                f"pruning cannot follow it; choose one of {sorted(metrics)} or set "
                "hydra.sweeper.pruner=null"
            )
        self.trial.report(metrics[self.metric], trainer.epoch)
        if self.trial.should_prune():
            log.info(
                "optuna trial %d pruned after epoch %d (%s=%.4f)",
                self.trial.number,
                trainer.epoch,
                self.metric,
                metrics[self.metric],
            )
            self.trial.set_user_attr(PRUNED_ATTR, trainer.epoch)
            trainer.stop_reason = "pruned"


def pruning_callback(cfg: DictConfig) -> OptunaPruning | None:
    """The pruning callback of this job, if it is a trial of a sweep with a pruner."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    sweeper = hydra_cfg.sweeper
    if hydra_cfg.mode != RunMode.MULTIRUN or sweeper.get("_target_") != SWEEPER_TARGET:
        return None
    if not sweeper.get("pruner"):
        return None
    if not cfg.get("optimized_metric"):
        raise ConfigError("Optuna pruning needs optimized_metric (e.g. val/acc)")
    trial = _open_trial(sweeper, hydra_cfg)
    return OptunaPruning(trial, cfg.optimized_metric)


def _open_trial(sweeper: Any, hydra_cfg: Any) -> Any:
    import optuna
    from hydra.utils import instantiate

    storage = absolute_storage(sweeper.storage, hydra_cfg.runtime.cwd)
    if not storage:
        raise ConfigError(
            "Optuna pruning needs a study that jobs can open: set hydra.sweeper.storage "
            "(e.g. sqlite:///${hydra.sweep.dir}/optuna.db) or hydra.sweeper.pruner=null"
        )
    study = optuna.load_study(
        study_name=sweeper.study_name, storage=storage, pruner=instantiate(sweeper.pruner)
    )
    number = hydra_cfg.job.num
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    overrides = set(hydra_cfg.overrides.task)
    mismatch = trial is None or any(
        f"{name}={value}" not in overrides for name, value in trial.params.items()
    )
    if mismatch or trial.state != optuna.trial.TrialState.RUNNING:
        raise ConfigError(
            f"job {number} is not the running Optuna trial {number} of study "
            f"{sweeper.study_name!r} in {storage}; pruning works with the trainer's "
            "Optuna sweeper only (hparams_search configs)"
        )
    return optuna.trial.Trial(study, trial._trial_id)
