"""`trainer.nan_policy`: what a NaN or Inf training loss does, at no cost per step.

Reading a value from an accelerator makes the host wait for the device, which
stalls the launch queue; a check per step would cost throughput on every step
of every run. So the guard reads back only where that is free:

- On the CPU, ops finish before they return, so reading the loss costs nothing:
  every micro-batch is checked before its backward pass, the bad step is known
  exactly, and the weights in memory are still the last good ones.
- On an accelerator with `error`, each micro-batch updates a device-side record
  of the first non-finite (step, loss) with `torch.where`: no sync. The record
  is read back where the trainer syncs anyway (log intervals, validation) and
  before every checkpoint write, so no checkpoint ever holds weights trained on
  a non-finite loss; the error still names the exact step and value.
- `skip` must decide before the optimizer step whether to take it, so it reads
  each loss back on any device: a sync the user opts into with this policy.

Under torch.distributed every rank must take the same decision at the same
step, or the others wait forever in the next collective: `skip`, and `error` on
the CPU, all-reduce each micro-batch's verdict (so all ranks stop before the bad
step and save the last good state, as one process does); `error` on an
accelerator uses the device record, all-reduced where it is read, so all ranks
stop at the same check with the first bad step of any rank.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from trainer.distributed.context import SINGLE, DistContext, all_reduce_min, all_reduce_sum
from trainer.errors import NonFiniteLossError

log = logging.getLogger(__name__)

_FIX = "Lower optimizer.lr, set trainer.gradient_clip_val, or set trainer.nan_policy=skip"


class NanGuard:
    def __init__(
        self, policy: str, max_consecutive: int, device: torch.device, dist: DistContext = SINGLE
    ) -> None:
        # policy and max_consecutive were checked with the config (validation.py).
        self.policy, self.max_consecutive, self.dist = policy, max_consecutive, dist
        # On the CPU ranks also check every micro-batch (one tiny all-reduce each, next to
        # the gradients' own): so they save the last good state as one process does.
        self.check_every_batch = policy == "skip" or self.reads_back_free(device)
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._first_bad_loss = torch.zeros((), device=device)
        self.bad_value = 0.0
        self.skipped, self.consecutive = 0, 0

    @staticmethod
    def reads_back_free(device: torch.device) -> bool:
        return device.type == "cpu"

    def observe(self, loss: torch.Tensor, step: int) -> bool:
        """Record the loss of a micro-batch of `step`; True if it is known non-finite now."""
        loss = loss.detach()
        if self.check_every_batch:
            value = float(loss)  # free on the CPU; the chosen price of `skip` elsewhere
            self.bad_value = value
            bad = not math.isfinite(value)
            if not self.dist.enabled:
                return bad
            # Any rank's bad loss is every rank's: (count, value) summed in one exchange.
            shared = torch.tensor([float(bad), value if bad else 0.0], device=loss.device)
            count, self.bad_value = all_reduce_sum(shared, self.dist).tolist()
            return count > 0
        newly_bad = (self._first_bad_step < 0) & ~torch.isfinite(loss)
        self._first_bad_step = torch.where(newly_bad, step, self._first_bad_step)
        self._first_bad_loss = torch.where(newly_bad, loss.float(), self._first_bad_loss)
        return False

    def recorded(self) -> tuple[int, float] | None:
        """The first non-finite (step, loss) recorded on the device, if any (one sync)."""
        if self.check_every_batch:
            return None
        if not self.dist.enabled:
            step = int(self._first_bad_step.item())
            return (step, float(self._first_bad_loss.item())) if step >= 0 else None
        # The first bad step of any rank, and its loss from the rank(s) that saw it.
        never = torch.iinfo(torch.long).max
        mine = torch.where(self._first_bad_step >= 0, self._first_bad_step, never)
        first = all_reduce_min(mine.clone(), self.dist)
        if int(first) == never:
            return None
        value = torch.where(mine == first, self._first_bad_loss, 0.0)
        return int(first), float(all_reduce_sum(value, self.dist))

    def count_skip(self, where: str) -> bool:
        """Count a skipped step; True when `max_consecutive` skips in a row are reached."""
        self.skipped += 1
        self.consecutive += 1
        log.warning(
            "loss is %s at %s: optimizer step skipped (%d so far, %d in a row)",
            self.bad_value,
            where,
            self.skipped,
            self.consecutive,
        )
        return self.consecutive >= self.max_consecutive

    def error(self, where: str | None, good_step: int, saved: Path | None) -> NonFiniteLossError:
        """The error that stops training; `where` is None when skips ran out."""
        if where is None:
            what = (
                f"{self.consecutive} steps in a row had a non-finite loss, the limit set by "
                f"trainer.max_consecutive_nan={self.max_consecutive}"
            )
        else:
            what = f"loss is {self.bad_value} at {where}"
        return NonFiniteLossError(
            f"{what}; the last good state (step {good_step}) is saved in {saved}. {_FIX}"
        )

    def recorded_error(self, newest_checkpoint: Path | None) -> NonFiniteLossError | None:
        """The error for the first non-finite loss recorded on the device, if any (one sync)."""
        recorded = self.recorded()
        if recorded is None:
            return None
        step, value = recorded
        return NonFiniteLossError(
            f"loss is {value} at step {step}; the weights after it are not saved, the "
            f"newest checkpoint is {newest_checkpoint or 'none yet'}. {_FIX}"
        )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = state["skipped"], state["consecutive"]
