"""Fault injection for the crash-safety tests: kills, signals and NaN losses on cue.

Nothing here runs unless a test asks for it: `FaultInjectingLoss` is chosen by
config (`loss._target_=trainer.testing.FaultInjectingLoss`), and `fault_point`
only acts when its environment variable is set.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Sequence

import torch
from torch import nn

from trainer.checkpoint.writer import settle

# SIGKILL this process while it writes the checkpoint of this file name (e.g.
# step_00000016.pt): after its bytes are written, before the rename.
KILL_IN_SAVE_ENV = "TRAINER_TEST_KILL_IN_SAVE"


def fault_point(name: str, file_name: str) -> None:
    """A place where a test may kill the process, e.g. halfway through a save."""
    if name == "save" and os.environ.get(KILL_IN_SAVE_ENV) == file_name:
        os.kill(os.getpid(), signal.SIGKILL)


class FaultInjectingLoss(nn.Module):
    """Cross-entropy that misbehaves at chosen training batches of this process.

    Batches count from 1 over the training calls this process makes (evaluation
    runs without gradients and is not counted). With one micro-batch per step and
    a fresh run, batch n is optimizer step n.
    """

    def __init__(
        self,
        nan_at_batches: Sequence[int] = (),
        nonfinite_value: float = math.nan,
        kill_at_batch: int | None = None,
        signal_at_batch: int | None = None,
        signal_count: int = 1,
        signal_name: str = "SIGTERM",
        sleep_s: float = 0.0,
        sleep_in_first_run_only: bool = False,
        label_smoothing: float = 0.0,
        nan_on_ranks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # Under torch.distributed, only these ranks (RANK) get the non-finite losses.
        rank = int(os.environ.get("RANK", "0"))
        self.nan_at_batches = (
            set(nan_at_batches) if nan_on_ranks is None or rank in nan_on_ranks else set()
        )
        self.nonfinite_value = nonfinite_value
        self.kill_at_batch, self.signal_at_batch = kill_at_batch, signal_at_batch
        self.signal_count, self.sleep_s = signal_count, sleep_s
        # A SLURM job that outlasts its time limit once, then finishes when requeued
        # (SLURM_RESTART_COUNT counts the requeues).
        if sleep_in_first_run_only and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
            self.sleep_s = 0.0
        self.signal = signal.Signals[signal_name]
        self.batches = 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.cross_entropy(logits, target)
        if not torch.is_grad_enabled():
            return loss
        self.batches += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.batch_fault(self.kill_at_batch):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.batch_fault(self.signal_at_batch):
            for _ in range(self.signal_count):
                os.kill(os.getpid(), self.signal)
        if self.batches in self.nan_at_batches:
            loss = loss * self.nonfinite_value
        return loss

    def batch_fault(self, at_batch: int | None) -> bool:
        """Is this the batch of a kill or signal? If so, let background checkpoint
        writes finish first: the fault lands between writes, as it does with
        synchronous ones (a kill inside a write is `fault_point`'s job)."""
        if self.batches != at_batch:
            return False
        settle()
        return True
