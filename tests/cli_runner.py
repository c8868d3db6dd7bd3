"""`python <script> args...` as a fresh process that skips the interpreter's start-up.

Most of a CLI test's time was Python importing torch, Hydra and this package (3-8 s on
2 cores, for a run that then trains for one second). Here a fork server imports them
once per test session, and each command runs in a new process forked from it: its own
pid, working directory, environment, stdout/stderr and exit status, the script run as
`__main__`, and on exit threading's and the atexit hooks (logging's flush, a process
pool's shutdown) run as in `python script.py`. The server imports modules only and runs
no torch op, so no thread pool is copied into a fork.

What differs from a cold start is when the preloaded modules read the environment: at
the server's start. So commands whose environment sets what torch reads at import
(anything but OMP_NUM_THREADS, which is applied below) and tests of start-up itself use
`subprocess` (`fresh=True` in `run_cli`); TRAINER_TEST_FRESH_PROCESSES=1 makes every
command a cold start, to compare.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

# What a command imports before its first line runs; a missing optional one is skipped.
PRELOAD = [
    "torch",
    "hydra",
    "omegaconf",
    "tensorboard",
    "trainer.cli",
    "trainer.run",
    "transformers",
    "transformers.models.llama.modeling_llama",  # the tiny llama's and SmolLM2's class
    "transformers.tokenization_utils_fast",
    "peft",
]
FRESH_PROCESSES = os.environ.get("TRAINER_TEST_FRESH_PROCESSES") == "1"

_context = None


def _fork_server() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _exit_code(code: object) -> int:
    """What `python script.py` exits with after `sys.exit(code)`."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_as_main(script: str, args: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In the forked process: become `python script args...` and exit as it would."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    import torch

    # What a cold start's OpenMP would read from this environment, not the server's.
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0))))
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).parent)
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        # As the interpreter ends: threading's exit hooks first (a joblib/loky pool stops its
        # workers there; skipped, the atexit join waits out their 300 s idle timeout), then
        # the non-daemon threads are joined, then the atexit functions run.
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_python(
    script: Path | str, args: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """`python script args...` in `cwd` with exactly `env`; returns what subprocess.run would."""
    command = [sys.executable, str(script), *args]
    script = Path(cwd, script)  # a relative path names a file in cwd, as for python
    if FRESH_PROCESSES:
        return subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        process = _fork_server().Process(
            target=_run_as_main, args=(str(script), args, str(cwd), env, out, err)
        )
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout)
        return subprocess.CompletedProcess(
            command,
            process.exitcode,
            Path(out).read_text(errors="replace"),
            Path(err).read_text(errors="replace"),
        )
