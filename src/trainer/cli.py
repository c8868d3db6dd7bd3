"""Console entry points: `trainer-train` / `python train.py` and `trainer-eval` / `python eval.py`.

User errors (bad config, missing data, unusable checkpoint) print one
`error: ...` line to stderr and exit with code 2; bugs keep their traceback.
Set HYDRA_FULL_ERROR=1 to see the full trace of a user error too.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import hydra
from omegaconf import DictConfig

from trainer.config import register_configs
from trainer.errors import UserError

STARTED = time.time()
CONFIG_PATH = "pkg://trainer.configs"
EXIT_USER_ERROR = 2

register_configs()


def _report_user_errors(run):
    """Run `run()`; turn a UserError into one stderr line and exit code 2."""
    try:
        return run()
    except UserError as e:
        # In a sweep, SystemExit would end every job: trainer.sweep.SweepCallback
        # records the failed job instead, and the sweep goes on.
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or _in_multirun():
            raise
        logging.getLogger("trainer").debug("user error", exc_info=True)
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    from trainer.run import train

    # Jobs of a sweep share the process: a job's wall time starts with the job.
    started = None if _in_multirun() else STARTED
    return _report_user_errors(lambda: train(cfg, started=started))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _eval(cfg: DictConfig) -> dict[str, float]:
    from trainer.evaluate import evaluate

    return _report_user_errors(lambda: evaluate(cfg))


def train_main() -> None:
    _train()


def eval_main() -> None:
    _eval()
