"""Preemption: SIGTERM/SIGUSR1/SIGUSR2 ask the trainer to save and exit for requeue.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM, or SIGUSR1 with
`sbatch --signal=USR1@<seconds>`, some time before they kill a job; submitit
(the SLURM launcher) asks for SIGUSR2 `signal_delay_s` before the time limit.
The first signal only raises a flag: the trainer checks it once per optimizer
step, saves a checkpoint at that step boundary and exits with EXIT_PREEMPTED.
A second signal means "now": the default action runs and the process dies.

A handler that was installed before ours (submitit's, which requeues the job on
SIGUSR2) is called once the checkpoint is saved, so the job is requeued with
its newest state on disk (docs/slurm.md).

Spawned ranks (`trainer.devices=N`) hear of a signal to their launcher as
FORWARDED_SIGNAL (a real-time signal, see trainer.distributed.spawn): it
requests a stop like the first signal but never counts as the second, so a
signal sent to the whole process group, which reaches a rank both directly and
forwarded, is still one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure, retry later": requeue scripts test for it.
EXIT_PREEMPTED = 75
SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)
# How a launcher passes a preemption signal on to the ranks it spawned: a real-time signal
# that nothing else sends (SIGUSR2 is submitit's time-limit warning, a signal of its own).
FORWARDED_SIGNAL = signal.SIGRTMIN + 1 if hasattr(signal, "SIGRTMIN") else None
# Written in the run folder by rank 0 of a preempted run, removed when a run starts there:
# a requeue script tests for it where the launcher's exit code cannot say 75 (torchrun).
PREEMPTED_MARKER = "PREEMPTED"

# In a spawned rank: the launcher's shared value holding the number of the signal it
# forwarded, and whether one came before a PreemptionHandler was active.
_launcher_signal: Any = None
_forwarded_early = False


def mark_preempted(run_dir: Path, message: str) -> None:
    """Rank 0 of a preempted run: say so in the run folder (PREEMPTED_MARKER)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PREEMPTED_MARKER).write_text(message + "\n")


def clear_preempted_mark(run_dir: Path) -> None:
    """A run starts in `run_dir`: an earlier attempt's preemption is no longer news."""
    (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)


def follow_launcher(shared_signal: Any) -> None:
    """In a spawned rank, at once: take FORWARDED_SIGNAL as the launcher's preemption
    request (named by `shared_signal.value`), also before training starts."""
    global _launcher_signal
    _launcher_signal = shared_signal
    if FORWARDED_SIGNAL is not None and threading.current_thread() is threading.main_thread():
        signal.signal(FORWARDED_SIGNAL, _note_early_forward)


def _note_early_forward(signum: int, frame: FrameType | None) -> None:
    global _forwarded_early
    _forwarded_early = True


def _forwarded_name() -> str:
    number = getattr(_launcher_signal, "value", 0)
    return signal.Signals(number).name if number else "SIGTERM"


class PreemptionHandler:
    """While active, the first SIGTERM/SIGUSR1/SIGUSR2 sets `requested`; the second one kills."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        # Set once every process knows of the request: from then on, the run stops.
        self.agreed = False
        self._signalled = False  # a signal came to this process itself (not forwarded)
        self._previous: dict[int, Any] = {}
        self._signum: int | None = None

    def agree(self, dist: Any, device: Any, exchange: bool) -> bool:
        """Whether to stop now. All ranks of a torch.distributed run must stop at the same
        step, so there the flag is all-reduced, only when `exchange` (log steps, epoch ends)."""
        if not self.agreed:
            if not dist.enabled:
                self.agreed = self.requested
            elif exchange:
                import torch

                from trainer.distributed.context import all_reduce_sum

                flag = torch.tensor(float(self.requested), device=device)
                self.agreed = all_reduce_sum(flag, dist).item() > 0
        return self.agreed

    def __enter__(self) -> PreemptionHandler:
        # Signal handlers can only be set from the main thread (e.g. not in a
        # launcher's worker thread); there the default action stays.
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
            if _launcher_signal is not None and FORWARDED_SIGNAL is not None:
                self._previous[FORWARDED_SIGNAL] = signal.signal(
                    FORWARDED_SIGNAL, self._handle_forwarded
                )
                if _forwarded_early:
                    self._request(_forwarded_name(), None)
        return self

    def __exit__(self, *exc: object) -> None:
        previous_handlers = dict(self._previous)
        for signum, previous in previous_handlers.items():
            signal.signal(signum, previous)
        self._previous.clear()
        chained = previous_handlers.get(self._signum) if self.agreed else None
        if callable(chained):
            # The run stopped for this signal with its checkpoint saved: now the handler
            # we replaced may act (submitit's requeues the job, then exits). A requeue makes
            # SLURM send SIGTERM to every process of the job, the `scontrol requeue` it runs
            # too: ignored meanwhile (child processes inherit that), so the request completes.
            term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                chained(self._signum, None)
            except SystemExit:
                pass  # the run's own exit (EXIT_PREEMPTED) follows
            finally:
                signal.signal(signal.SIGTERM, term)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._signalled:
            # Second signal: no more waiting. Restore the default action and re-raise,
            # so the exit status says which signal ended the process.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._signalled = True
        self._request(signal.Signals(signum).name, signum)

    def _handle_forwarded(self, signum: int, frame: FrameType | None) -> None:
        self._request(_forwarded_name(), None)

    def _request(self, name: str, signum: int | None) -> None:
        if self.requested:
            return
        self.requested, self.signal_name, self._signum = True, name, signum
        log.warning(
            "%s received: finishing the current step, saving a checkpoint, then exiting "
            "with code %d (send it again to exit at once)",
            name,
            EXIT_PREEMPTED,
        )
