"""The sweep loop of `hydra/sweeper=trainer_optuna` (imports optuna: loaded only to sweep)."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
    def __init__(self, pruner: Any = None, heartbeat_interval: int = 60, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pruner = pruner
        self.heartbeat_interval = heartbeat_interval

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        from trainer.sweep.pruning import PRUNED_ATTR, absolute_storage

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
        study_storage: Any = storage
        if storage:
            # Trials report a heartbeat while they run: a trial whose sweep was killed stops
            # beating, and a continued sweep marks it FAIL instead of RUNNING forever.
            study_storage = optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=self.heartbeat_interval,
                grace_period=2 * self.heartbeat_interval,
            )
        study = optuna.create_study(
            study_name=self.study_name,
            storage=study_storage,
            sampler=self.sampler,
            pruner=self.pruner,
            directions=directions,
            load_if_exists=True,
        )
        if storage:
            self._fail_stale_trials(study, storage)
        self._reseed_continued(study)
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
                with _heartbeats(study_storage, trials, self.heartbeat_interval):
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

    def _fail_stale_trials(self, study: Any, url: str) -> None:
        """Trials left RUNNING by a killed sweep: FAIL in the study, and `failed` in their
        folders' results.json, so the report says what happened to them."""
        import optuna

        from trainer.sweep.job_files import RESULTS_FILE, record_failure

        running = {t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))}
        if not running:
            return
        optuna.storages.fail_stale_trials(study)
        # Read back through a new connection: the study's storage caches trial states.
        fresh = optuna.load_study(study_name=study.study_name, storage=url)
        failed = fresh.get_trials(states=(optuna.trial.TrialState.FAIL,))
        sweep_dir = Path(self.config.hydra.sweep.dir)
        for trial in (t for t in failed if t.number in running):
            log.warning("trial %d was left running by a stopped sweep: marked FAIL", trial.number)
            for folder in sweep_dir.glob(f"{trial.number}_*"):
                if not (folder / RESULTS_FILE).is_file():
                    error = RuntimeError(
                        "the sweep running this trial was stopped (no heartbeat for "
                        f"{2 * self.heartbeat_interval} s); the continued study marked it FAIL"
                    )
                    record_failure(folder, error, {"job_num": trial.number}, error_file=False)

    def _reseed_continued(self, study: Any) -> None:
        """A continued study with a fixed sampler seed would propose its first trials again:
        the sampler is made anew with the seed advanced by the trials already in the study,
        so the search stays repeatable and goes on to new points."""
        sampler_cfg = OmegaConf.select(self.config, "hydra.sweeper.sampler")
        seed = OmegaConf.select(self.config, "hydra.sweeper.sampler.seed", default=None)
        done = len(study.trials)
        if seed is None or not done or isinstance(self.sampler, functools.partial):
            return
        from hydra.utils import instantiate

        study.sampler = self.sampler = instantiate(sampler_cfg, seed=int(seed) + done)
        log.info("continued study: %d trials so far, sampler seed %d", done, int(seed) + done)

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


@contextmanager
def _heartbeats(storage: Any, trials: list[Any], interval: int) -> Iterator[None]:
    """Record the trials' heartbeats in the study storage while their jobs run."""
    if not storage or not storage.is_heartbeat_enabled():
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial in trials:
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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
