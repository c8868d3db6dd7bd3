"""Scoring a model on a split with the task's metrics, reduced on the device.

Shared by the Trainer (validation, test) and `eval.py`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from trainer.distributed.context import SINGLE, DistContext, all_reduce_sum
from trainer.tasks.base import Task


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    batches: Any,
    task: Task,
    prefix: str,
    autocast: Any = contextlib.nullcontext,
    dist: DistContext = SINGLE,
) -> dict[str, float]:
    """The task's metrics over `batches`, summed on the device and read back once.

    Under torch.distributed each rank scores its shard and the sums are
    all-reduced, so the result equals a single-process evaluation.
    """
    model.eval()
    totals: torch.Tensor | None = None
    for batch in batches.epoch(0):
        with autocast():
            sums = task.eval_sums(model, batch)
        totals = sums if totals is None else totals + sums
    if totals is None:  # an empty shard still joins the all-reduce, with zeros
        device = next(model.parameters()).device
        totals = torch.zeros(len(task.sum_names), dtype=torch.float64, device=device)
    values = task.eval_metrics(all_reduce_sum(totals, dist).tolist())
    return {f"{prefix}/{name}": value for name, value in values.items()}
