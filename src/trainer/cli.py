"""Console entry points: `trainer-train` / `python train.py` and `trainer-eval` / `python eval.py`.

User errors (bad config, missing data, unusable checkpoint, NaN loss) print one
`error: ...` line to stderr and exit with code 2; bugs keep their traceback.
Set HYDRA_FULL_ERROR=1 to see the full trace of a user error too. A preempted
run (SIGTERM/SIGUSR1) saves a checkpoint and exits with code 75 (EX_TEMPFAIL),
the signal to requeue it with resume=auto (docs/resume.md).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from trainer.config import register_configs
from trainer.errors import Preempted, UserError
from trainer.preemption import EXIT_PREEMPTED

STARTED = time.time()
# An absolute folder, not pkg://trainer.configs: Hydra reads plain files faster than
# package resources, and both editable and wheel installs ship the YAML as files.
CONFIG_PATH = str(Path(importlib.util.find_spec("trainer.configs").origin).parent)
EXIT_USER_ERROR = 2

register_configs()


def _report_user_errors(run):
    """Run `run()`; turn a UserError into one stderr line and exit code 2.

    Both end the process with SystemExit, which a multirun does not catch: a
    preempted sweep stops at the job it was in, to be resumed as a whole.
    """
    try:
        return run()
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PREEMPTED) from None
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        logging.getLogger("trainer").debug("user error", exc_info=True)
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    from trainer.run import train

    return _report_user_errors(lambda: train(cfg, started=STARTED))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _eval(cfg: DictConfig) -> dict[str, float]:
    from trainer.evaluate import evaluate

    return _report_user_errors(lambda: evaluate(cfg))


def train_main() -> None:
    _give_non_main_ranks_a_scratch_dir()
    _train()


def _give_non_main_ranks_a_scratch_dir() -> None:
    """Under torchrun every rank runs this script; only rank 0 may own the run folder.

    Each rank's Hydra would otherwise make its own `outputs/<date>/<time>` (the
    seconds can differ); the others get a scratch folder and learn rank 0's
    folder after joining the process group.
    """
    import atexit
    import shutil
    import tempfile

    if os.environ.get("RANK", "0") == "0" or "LOCAL_RANK" not in os.environ:
        return
    scratch = tempfile.mkdtemp(prefix=f"trainer-rank{os.environ['RANK']}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


def eval_main() -> None:
    _eval()
