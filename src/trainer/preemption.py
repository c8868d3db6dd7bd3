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
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure, retry later": requeue scripts test for it.
EXIT_PREEMPTED = 75
SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)


class PreemptionHandler:
    """While active, the first SIGTERM/SIGUSR1/SIGUSR2 sets `requested`; the second one kills."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        # Set once every process knows of the request: from then on, the run stops.
        self.agreed = False
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

                from trainer.distributed import all_reduce_sum

                flag = torch.tensor(float(self.requested), device=device)
                self.agreed = all_reduce_sum(flag, dist).item() > 0
        return self.agreed

    def __enter__(self) -> PreemptionHandler:
        # Signal handlers can only be set from the main thread (e.g. not in a
        # launcher's worker thread); there the default action stays.
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
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
        name = signal.Signals(signum).name
        if self.requested:
            # Second signal: no more waiting. Restore the default action and re-raise,
            # so the exit status says which signal ended the process.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested, self.signal_name, self._signum = True, name, signum
        log.warning(
            "%s received: finishing the current step, saving a checkpoint, then exiting "
            "with code %d (send it again to exit at once)",
            name,
            EXIT_PREEMPTED,
        )
