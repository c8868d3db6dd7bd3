"""Scoring a model on a split: loss and accuracy, reduced on the device.

Shared by the Trainer (validation, test) and `eval.py`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from trainer.distributed import SINGLE, DistContext, all_reduce_sum

AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    batches: Any,
    loss_fn: nn.Module,
    prefix: str,
    autocast: Any = contextlib.nullcontext,
    dist: DistContext = SINGLE,
) -> dict[str, float]:
    """Mean loss and accuracy over `batches`, summed on the device and read back once.

    Under torch.distributed each rank scores its shard and the sums are
    all-reduced, so the result equals a single-process evaluation.
    """
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in batches.epoch(0):
        with autocast():
            logits = model(x)
            batch_loss = loss_fn(logits, y).float() * len(y)
        totals[0] += batch_loss
        totals[1] += (logits.argmax(dim=1) == y).sum()
        totals[2] += len(y)
    loss_total, correct_total, count = all_reduce_sum(totals, dist).tolist()
    if count == 0:
        return {f"{prefix}/loss": math.nan, f"{prefix}/acc": math.nan}
    return {f"{prefix}/loss": loss_total / count, f"{prefix}/acc": correct_total / count}
