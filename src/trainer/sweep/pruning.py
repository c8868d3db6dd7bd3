"""Optuna pruning from inside a sweep job.

The Optuna sweeper runs each trial as a Hydra job and never hands the job its
`optuna.Trial`. The trainer's sweeper (hydra_plugins.trainer_optuna_sweeper)
launches trial N as job N, so a job opens the study from the sweeper's storage
and study name (both in its own `hydra.sweeper` config), takes trial
`hydra.job.num`, checks that the trial's parameters are this job's overrides,
and then reports the optimized metric after every epoch and asks the pruner
whether to stop. A pruned job marks its trial (user attribute `pruned_at_epoch`)
and stops training; the sweeper then records the trial as PRUNED.

A trial trained by several processes (`trainer.devices=N`, torchrun) talks to
the study from rank 0 only, and rank 0's decision is broadcast, so every rank
stops after the same epoch. The job process finds its trial (`pruning_target`,
plain data) and hands it to the ranks it spawns.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from trainer.distributed.context import SINGLE, DistContext, broadcast_object
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


@dataclass(frozen=True)
class PruningTarget:
    """The Optuna trial a job reports to, as plain data that spawned ranks receive too."""

    storage: str
    study_name: str
    pruner: dict
    metric: str


class OptunaPruning:
    """Trainer callback: report `metric` at each epoch end; stop if the pruner says so.

    Only rank 0 holds the trial (`trial` is None on the others); every rank calls
    this at the same validations and takes rank 0's decision.
    """

    def __init__(self, trial: Any, metric: str, dist: DistContext = SINGLE) -> None:
        self.trial, self.metric, self.dist = trial, metric, dist

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if trainer.batch_in_epoch:  # a mid-epoch validation: Optuna steps are epochs
            return
        if self.metric not in metrics:
            raise ConfigError(
                f"optimized_metric={self.metric!r} is not a validation metric, so Optuna "
                f"pruning cannot follow it; choose one of {sorted(metrics)} or set "
                "hydra.sweeper.pruner=null"
            )
        prune = False
        if self.trial is not None:
            self.trial.report(metrics[self.metric], trainer.epoch)
            prune = self.trial.should_prune()
        if not broadcast_object(prune, self.dist):
            return
        if self.trial is not None:
            log.info(
                "optuna trial %d pruned after epoch %d (%s=%.4f)",
                self.trial.number,
                trainer.epoch,
                self.metric,
                metrics[self.metric],
            )
            self.trial.set_user_attr(PRUNED_ATTR, trainer.epoch)
        trainer.stop_reason = "pruned"


def pruning_target(cfg: DictConfig) -> PruningTarget | None:
    """The trial of this job, if it is a job of a sweep with a pruner (else None).

    Read from the Hydra job's own config, so it is None in a spawned rank: that
    one is handed its job's target instead.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

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
    storage = absolute_storage(sweeper.storage, hydra_cfg.runtime.cwd)
    if not storage:
        raise ConfigError(
            "Optuna pruning needs a study that jobs can open: set hydra.sweeper.storage "
            "(e.g. sqlite:///${hydra.sweep.dir}/optuna.db) or hydra.sweeper.pruner=null"
        )
    return PruningTarget(
        storage=storage,
        study_name=sweeper.study_name,
        pruner=OmegaConf.to_container(sweeper.pruner, resolve=True),
        metric=cfg.optimized_metric,
    )


def pruning_callback(
    target: PruningTarget | None,
    number: int | None,
    overrides: tuple[str, ...],
    dist: DistContext = SINGLE,
) -> OptunaPruning | None:
    """The callback of sweep job `number` with a trial; rank 0 opens the trial in the study."""
    if target is None:
        return None
    trial = _open_trial(target, number, overrides) if dist.is_main else None
    return OptunaPruning(trial, target.metric, dist)


def _open_trial(target: PruningTarget, number: int | None, overrides: tuple[str, ...]) -> Any:
    """Trial `number` (the trial number is the job number), checked against the job."""
    import optuna
    from hydra.utils import instantiate

    study = optuna.load_study(
        study_name=target.study_name, storage=target.storage, pruner=instantiate(target.pruner)
    )
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    mismatch = trial is None or any(
        f"{name}={value}" not in overrides for name, value in trial.params.items()
    )
    if mismatch or trial.state != optuna.trial.TrialState.RUNNING:
        raise ConfigError(
            f"job {number} is not the running Optuna trial {number} of study "
            f"{target.study_name!r} in {target.storage}; pruning works with the trainer's "
            "Optuna sweeper only (hparams_search configs)"
        )
    return optuna.trial.Trial(study, trial._trial_id)
