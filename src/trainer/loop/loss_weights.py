"""Per-token losses weighted exactly across micro-batches and ranks.

A language model's loss is a mean over a batch's unmasked tokens, and padded
batches hold different numbers of them. Averaging those means over the
micro-batches of a step (accumulation) or over ranks (DDP and FSDP average
gradients) would weigh a token of a short batch more than one of a long batch:
2 ranks would not equal one process, nor accumulation a bigger batch. So when
the task says how many terms its loss averages (`Task.loss_count`), each
micro-batch backpropagates its sum (mean x count) and the step divides the
gradients by the step's count over all micro-batches and ranks: every token
weighs the same, as in one big batch. One micro-batch on one process already is
that mean, and is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from trainer.distributed.context import DistContext, all_reduce_sum
from trainer.tasks.base import Task


class StepLossWeights:
    def __init__(self, task: Task, dist: DistContext, accumulate: int) -> None:
        self.task, self.dist, self.accumulate = task, dist, accumulate
        self.plain_mean = dist.world_size == 1 and accumulate == 1
        self.count: torch.Tensor | None = None  # this rank's count since the last step

    def to_backward(self, loss: torch.Tensor, batch: object) -> torch.Tensor:
        """The loss to backpropagate for this micro-batch."""
        count = None if self.plain_mean else self.task.loss_count(batch)
        if count is None:
            return loss / self.accumulate if self.accumulate > 1 else loss
        self.count = count if self.count is None else self.count + count
        return loss * count

    def normalize(self, params: Iterable[nn.Parameter]) -> None:
        """Divide the step's summed gradients by its global count (before clipping).

        One all-reduce of a scalar on the device; no host sync."""
        if self.count is None:
            return
        total = all_reduce_sum(self.count.to(torch.float32), self.dist)
        # DDP and FSDP average gradients over ranks: undo that, then divide by the total.
        factor = self.dist.world_size / total
        with torch.no_grad():
            grads = [_local(p.grad) for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, factor)
        self.count = None

    def reset(self) -> None:
        """A skipped step: its gradients are dropped, and so is its count."""
        self.count = None


def _local(grad: torch.Tensor) -> torch.Tensor:
    # An FSDP shard's gradient is a DTensor: scale the local shard it holds, in place.
    return grad.to_local() if hasattr(grad, "to_local") else grad
