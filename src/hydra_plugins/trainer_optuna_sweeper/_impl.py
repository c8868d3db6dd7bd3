"""The sweep loop of `hydra/sweeper=trainer_optuna` (imports optuna: loaded only to sweep)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"


class PruningOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(self, pruner: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pruner = pruner

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        from trainer.pruning import PRUNED_ATTR, absolute_storage

        self._process_searchspace_config()
        params = self._parse_sweeper_params_config() + list(arguments)
        distributions, fixed_params = create_params_from_overrides(params)
        if self.search_space_distributions:
            distributions = {**self.search_space_distributions, **distributions}
        for name in fixed_params:
            distributions.pop(name, None)
        if isinstance(self.sampler, functools.partial):  # GridSampler needs the space
            grid = {n: self._to_grid_sampler_choices(d) for n, d in distributions.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, _grid_size(grid))
        directions = self._get_directions()
        storage = absolute_storage(self.storage, self.config.hydra.runtime.cwd)
        if storage and storage.startswith(SQLITE):  # the sweep folder may not exist yet
            Path(storage[len(SQLITE) :]).parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            sampler=self.sampler,
            pruner=self.pruner,
            directions=directions,
            load_if_exists=True,
        )
        log.info(
            "study %r in %s, directions %s, pruner %s",
            study.study_name,
            storage,
            directions,
            type(self.pruner).__name__ if self.pruner else None,
        )
        jobs_view = optuna.storages.RDBStorage(storage) if storage else None
        to_go = self.n_trials
        while to_go > 0:
            trials = [study.ask() for _ in range(min(to_go, self.n_jobs))]
            overrides = self._configure_trials(trials, distributions, fixed_params)
            try:
                returns = self._launch(trials, overrides)
            except BaseException:
                for trial in trials:  # don't leave them RUNNING in the study forever
                    _tell(study, trial, state=optuna.trial.TrialState.FAIL)
                raise
            failed = 0
            for trial, ret in zip(trials, returns, strict=True):
                if ret.status != JobStatus.COMPLETED:
                    _tell(study, trial, state=optuna.trial.TrialState.FAIL)
                    ret.return_value  # noqa: B018 - re-raises the job's error
                # The study caches its trials: read what the job wrote from the database.
                stored = jobs_view.get_trial(trial._trial_id) if jobs_view else trial
                for step, value in stored.intermediate_values.items():
                    trial.report(value, step)  # into the cached copy the sampler reads
                if PRUNED_ATTR in stored.user_attrs:
                    _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
                elif ret.return_value is None:  # failed; recorded in its folder
                    _tell(study, trial, state=optuna.trial.TrialState.FAIL)
                    failed += 1
                else:
                    values = ret.return_value
                    values = list(values) if len(directions) > 1 else [float(values)]
                    _tell(study, trial, values=values)
            to_go -= len(trials)
            if failed / len(trials) > self.max_failure_rate:
                log.error(
                    "%d of %d trials failed (max_failure_rate=%s): stopping the search",
                    failed,
                    len(trials),
                    self.max_failure_rate,
                )
                break
        self._save_results(study, directions)

    def _launch(self, trials: list[Any], overrides: list[Any]) -> list[Any]:
        """Launch trial N as job N (trials of a batch are numbered in a row)."""
        returns: list[Any] = []
        start = 0
        for end in range(1, len(trials) + 1):
            if end == len(trials) or trials[end].number != trials[end - 1].number + 1:
                returns += self.launcher.launch(
                    overrides[start:end], initial_job_idx=trials[start].number
                )
                start = end
        return returns

    def _save_results(self, study: Any, directions: list[str]) -> None:
        import optuna

        done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if not done:
            log.error("no trial completed")
            return
        if len(directions) > 1:
            results = {
                "name": "optuna",
                "solutions": [{"params": t.params, "values": t.values} for t in study.best_trials],
            }
        else:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info("best trial %d: %s = %s", best.number, best.params, best.value)
        path = f"{self.config.hydra.sweep.dir}/optimization_results.yaml"
        OmegaConf.save(OmegaConf.create(results), path)


def _grid_size(grid: dict[str, list[Any]]) -> int:
    size = 1
    for choices in grid.values():
        size *= len(choices)
    return size


def _tell(study: Any, trial: Any, **kwargs: Any) -> None:
    try:
        study.tell(trial, **kwargs)
    except RuntimeError as e:
        # GridSampler calls study.stop() once the grid is done, which Optuna only
        # allows inside study.optimize; the trial is recorded before that raises.
        if "Study.stop" not in str(e):
            raise
