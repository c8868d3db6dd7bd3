"""Spawning the processes of `trainer.devices=N` without torchrun, and what each worker
does first: follow its launcher (signals forwarded, death with the parent) and log.

The Hydra job spawns N workers with torch.multiprocessing and waits for them, so it
also works inside `python train.py -m ...`, each sweep job with its own workers and port.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from trainer.errors import UserError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[..., None], nprocs: int, args: tuple) -> str | None:
    """Run `worker(*args)` in `nprocs` fresh processes joined as one group.

    Each call gets its own port, so consecutive sweep jobs never collide; the
    call returns only after every worker has exited, and if one fails the
    others are terminated and the failure is raised here: a worker's UserError
    comes back as the same one-line UserError.

    While it waits, SIGTERM/SIGUSR1 to this launcher are forwarded to the
    workers (trainer.loop.preemption.FORWARDED_SIGNAL): they agree on a step, save
    and return, and rank 0's `preempted` message is returned here. A second
    signal ends the launcher at once. Workers die with their launcher, even a
    SIGKILLed one (PR_SET_PDEATHSIG on Linux).
    """
    import torch.multiprocessing as mp

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    _start_resource_tracker()
    mp_context = mp.get_context("spawn")
    errors = mp_context.SimpleQueue()
    forwarded = mp_context.Value("i", 0, lock=False)  # the signal the launcher passed on
    entry_args = (worker, nprocs, env, errors, forwarded, os.getpid(), args)
    try:
        with _Forwarder(forwarded) as forwarder:
            processes = mp.start_processes(
                _worker_entry, args=entry_args, nprocs=nprocs, join=False, start_method="spawn"
            )
            forwarder.attach(processes.pids())
            while not processes.join():
                pass
    except mp.ProcessExitedException as e:
        signal_name = getattr(e, "signal_name", None)
        reports = _drain(errors)
        # A killed rank is the news; the survivors' "peer is gone" errors are consequences.
        failures = [text for kind, _, text in reports if kind == "error"]
        if not signal_name and failures:
            raise UserError(failures[0]) from None
        how = f"was killed by {signal_name}" if signal_name else f"exited with code {e.exit_code}"
        raise UserError(
            f"distributed worker rank {e.error_index} {how}; the other workers were stopped"
        ) from None
    except mp.ProcessRaisedException as e:
        raise RuntimeError(f"a distributed worker failed:\n{e}") from None
    else:
        reports = sorted((rank, text) for kind, rank, text in _drain(errors) if kind == "preempted")
        return reports[0][1] if reports else None  # rank 0's message
    finally:
        errors.close()


def _drain(queue: Any) -> list[tuple[str, int, str]]:
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def _start_resource_tracker() -> None:
    """Python's resource tracker, a child in this process group, ignores SIGTERM but not
    SIGUSR1: started with both ignored, it outlives a preemption signal to the group."""
    from multiprocessing import resource_tracker

    from trainer.loop.preemption import SIGNALS

    if threading.current_thread() is not threading.main_thread():
        resource_tracker.ensure_running()
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in SIGNALS}
    try:
        resource_tracker.ensure_running()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Forwarder:
    """The launcher's SIGTERM/SIGUSR1 handlers while its workers run: the first signal
    goes on to the workers; a second one ends the launcher (and so the workers)."""

    def __init__(self, shared_signal: Any) -> None:
        from trainer.loop.preemption import SIGNALS

        self.shared_signal, self.signals = shared_signal, SIGNALS
        self.pids: list[int] = []
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Forwarder:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def attach(self, pids: list[int]) -> None:
        self.pids = list(pids)
        if self.received is not None:  # a signal came while the workers started
            self._forward()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        self.shared_signal.value = int(signum)
        self._forward()

    def _forward(self) -> None:
        from trainer.loop.preemption import FORWARDED_SIGNAL

        for pid in self.pids:
            try:
                os.kill(pid, FORWARDED_SIGNAL)
            except ProcessLookupError:
                pass


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its launcher dies, however it dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def threads_per_worker(nprocs: int) -> int:
    """This process' cores shared out among `nprocs` workers (at least one each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // nprocs)


def _worker_entry(
    rank: int,
    worker: Callable,
    nprocs: int,
    env: dict,
    errors: Any,
    forwarded: Any,
    parent: int,
    args: tuple,
) -> None:
    from trainer.errors import Preempted
    from trainer.loop.preemption import follow_launcher

    _die_with_parent(parent)
    follow_launcher(forwarded)
    if "OMP_NUM_THREADS" not in os.environ:
        # N workers with a thread per core each oversubscribe the cores, and their
        # spinning threads slow each other down many times over (torchrun sets 1).
        import torch

        torch.set_num_threads(threads_per_worker(nprocs))
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs)})
    try:
        worker(*args)
    except Preempted as e:
        # Saved: every rank returns normally, so none is stopped while rank 0 writes.
        errors.put(("preempted", rank, str(e)))
    except UserError as e:
        errors.put(("error", rank, str(e)))
        sys.exit(2)


def configure_worker_logging(log_file: str | None, is_main: bool) -> None:
    """Spawned workers start without Hydra's logging: rank 0 logs like the job did."""
    root = logging.getLogger()
    root.handlers.clear()
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if is_main and log_file:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    # One line per event: the other ranks see the same warnings; only errors are their own.
    root.setLevel(logging.INFO if is_main else logging.ERROR)
