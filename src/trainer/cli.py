"""Console entry points: `trainer-train` / `python train.py`, `trainer-eval` / `python eval.py`
and `trainer-generate` / `python generate.py`.

User errors print one `error: ...` line to stderr and exit with code 2: bad
config values, Hydra's composition errors (unknown key, unknown group option,
bad override syntax), missing data, unusable checkpoints, unusable devices.
Bugs keep their traceback. `--verbose` or HYDRA_FULL_ERROR=1 shows the full
trace of a user error too. A preempted run (SIGTERM/SIGUSR1) saves a checkpoint
and exits with code 75 (EX_TEMPFAIL), the signal to requeue it with
resume=auto (docs/resume.md).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from trainer.config.schema import SCHEMA_GROUP, register_configs
from trainer.error_messages import describe_user_error
from trainer.errors import Preempted
from trainer.loop.preemption import EXIT_PREEMPTED

STARTED = time.time()
# An absolute folder, not pkg://trainer.configs: Hydra reads plain files faster than
# package resources, and both editable and wheel installs ship the YAML as files.
CONFIG_PATH = str(Path(importlib.util.find_spec("trainer.configs").origin).parent)
EXIT_USER_ERROR = 2
VERBOSE_FLAG = "--verbose"
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"

register_configs()

# The user's own HYDRA_FULL_ERROR, while the process runs with it forced on.
_user_full_error: str | None = None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    from trainer.run import train

    # Jobs of a sweep share the process: a job's wall time starts with the job.
    started = None if _in_multirun() else STARTED
    with _user_environment():
        return train(cfg, started=started)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _eval(cfg: DictConfig) -> dict[str, float]:
    from trainer.evaluate import evaluate

    with _user_environment():
        return evaluate(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
def _generate(cfg: DictConfig) -> None:
    from trainer.generation import run_generate

    with _user_environment():
        run_generate(cfg)


def train_main() -> None:
    _import_from_working_folder()
    _give_non_main_ranks_a_scratch_dir()
    _run_reporting_user_errors(_train)


def eval_main() -> None:
    _import_from_working_folder()
    _run_reporting_user_errors(_eval)


def generate_main() -> None:
    _run_reporting_user_errors(_generate)


def _import_from_working_folder() -> None:
    """`_target_: my_project.Model` finds the user's own file in the folder they run in,
    as `python -m` would; spawned ranks inherit it through PYTHONPATH."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if cwd not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, *paths) if p)


def _run_reporting_user_errors(hydra_main: Callable[[], Any]) -> None:
    """Run a Hydra main; turn any user error, Hydra's included, into one line and exit 2.

    Hydra prints its own multi-line report of composition errors unless
    HYDRA_FULL_ERROR=1, in which case it re-raises them. So it runs with that
    variable set and the errors are reported here; the task itself runs with
    the user's own value (see _user_environment).
    """
    global _user_full_error
    verbose = VERBOSE_FLAG in sys.argv[1:]
    if verbose:
        sys.argv = [sys.argv[0], *(a for a in sys.argv[1:] if a != VERBOSE_FLAG)]
        os.environ[FULL_ERROR_ENV] = "1"
    _user_full_error = os.environ.get(FULL_ERROR_ENV)
    show_traces = _user_full_error == "1"
    os.environ[FULL_ERROR_ENV] = "1"
    try:
        try:
            with _run_mode_assumed(), _schema_group_hidden():
                hydra_main()
        except AssertionError as e:
            if not _mode_assumption_failed(e):
                raise
            hydra_main()  # the config asks for a sweep: let Hydra compose it twice
    except Exception as e:
        preempted = _preempted_launcher_job(e)
        if preempted is not None and not show_traces:
            print(preempted, file=sys.stderr, flush=True)
            raise SystemExit(EXIT_PREEMPTED) from None
        message = None if show_traces else describe_user_error(e) or _output_dir_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        _restore_full_error_env()


@contextmanager
def _run_mode_assumed() -> Iterator[None]:
    """Spare Hydra's first composition, which it makes only to read `hydra.mode`.

    Hydra composes the whole config twice per run (~0.1 s each): once to learn
    whether the config itself asks for a sweep, once to run. Without -m and
    without a hydra.mode override, a plain run is assumed. A config that sets
    hydra.mode=MULTIRUN then fails Hydra's own check in Hydra.run, before the
    task starts, and the command is composed again the usual way.
    """
    # Hydra.get_mode is private: pyproject pins hydra-core to the range whose tests prove
    # this patch (a plain run composes once; a config asking for MULTIRUN still sweeps).
    from hydra._internal.hydra import Hydra
    from hydra.types import RunMode

    probe = Hydra.get_mode
    args = sys.argv[1:]
    sweep = any(a in ("-m", "--multirun") or a.lstrip("+~").startswith("hydra.mode") for a in args)

    if not sweep:
        Hydra.get_mode = lambda self, config_name, overrides: RunMode.RUN
    try:
        yield
    finally:
        Hydra.get_mode = probe


@contextmanager
def _schema_group_hidden() -> Iterator[None]:
    """Leave the typed schemas' group out of `--help`: the YAML files pull it in, and
    no user can choose from it (schema=... would replace the whole config)."""
    from hydra._internal.hydra import Hydra

    if "--help" not in sys.argv[1:] and "-h" not in sys.argv[1:]:
        yield
        return
    original = Hydra.format_config_groups

    def format_config_groups(self: Any, predicate: Callable[[str], bool], compact: bool = True):
        def shown(group: str) -> bool:
            return predicate(group) and group.split("/")[0] != SCHEMA_GROUP

        return original(self, shown, compact)

    Hydra.format_config_groups = format_config_groups
    try:
        yield
    finally:
        Hydra.format_config_groups = original


def _mode_assumption_failed(error: AssertionError) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code if tb is not None else None
    return (
        code is not None
        and code.co_name == "run"
        and code.co_filename.endswith(os.path.join("hydra", "_internal", "hydra.py"))
    )


@contextmanager
def _user_environment() -> Iterator[None]:
    """Run the task with the user's own HYDRA_FULL_ERROR, reporting user errors.

    A user error is reported here rather than let through, since Hydra would
    first print an "Error executing job" line of its own.
    """
    _restore_full_error_env()
    try:
        yield
    except Preempted as e:
        # Ends the process, which a multirun does not catch: a preempted sweep stops
        # at the job it was in, to be resumed as a whole.
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line: rank 0's
            print(f"preempted: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PREEMPTED) from None
    except Exception as e:
        message = None if _user_full_error == "1" else describe_user_error(e)
        if message is None or _in_multirun():
            # In a sweep, SystemExit would end every job: trainer.sweep.SweepCallback
            # records the failed job (one line for a user error) and the sweep goes on.
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        _write_to_run_log(f"error: {message}")
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        os.environ[FULL_ERROR_ENV] = "1"


def _write_to_run_log(line: str) -> None:
    """Put a user error's line into the run's log file too (Hydra's job logging writes
    <run>/<task_name>.log), so a folder left by a failed run says why it stopped. Only
    the file: the terminal got the line on stderr already."""
    import logging

    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
            handler.flush()


def _restore_full_error_env() -> None:
    if _user_full_error is None:
        os.environ.pop(FULL_ERROR_ENV, None)
    else:
        os.environ[FULL_ERROR_ENV] = _user_full_error


def _preempted_launcher_job(error: BaseException) -> str | None:
    """A job that a launcher ran in another process (submitit) and that was preempted
    without being requeued: its `preempted:` line, for the sweep to exit 75 with."""
    if type(error).__name__ != "UncompletedJobError":
        return None
    lines = [line for line in str(error).splitlines() if line.startswith("preempted: ")]
    return lines[-1] if lines else None


def _output_dir_error(error: BaseException) -> str | None:
    """Hydra creates the run folder and its log file before the task starts; failing
    that is a user error."""
    if not isinstance(error, OSError):
        return None
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "run_job" and frame.f_globals.get("__name__") == (
            "hydra.core.utils"
        ):
            break
        tb = tb.tb_next
    else:
        return None
    return (
        f"cannot write the run's output folder ({error.filename}: {error.strerror}); "
        "point hydra.run.dir=... (hydra.sweep.dir=... with -m) at a writable folder"
    )


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
