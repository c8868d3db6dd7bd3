"""Classification: (inputs, class indices) -> the configured loss; loss and accuracy."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainer.errors import DataError
from trainer.tasks.base import Task


class ClassificationTask(Task):
    sum_names = ("loss_sum", "correct", "count")
    metric_names = ("loss", "acc")

    def __init__(
        self, monitor: str = "val/acc", monitor_mode: str = "max", loss: nn.Module | None = None
    ) -> None:
        super().__init__(monitor, monitor_mode, loss or nn.CrossEntropyLoss())

    def check_batch(self, batch: Any) -> None:
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            got = type(batch).__name__
            if isinstance(batch, dict):
                got += f" with keys {sorted(batch)}"
            raise DataError(
                f"task=classification expects batches of (inputs, class indices); the data "
                f"gives a {got}. Return (x, y) from the dataset, or choose another task"
            )

    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return self.loss(model(x), y)

    def batch_units(self, batch: Any) -> int:
        return len(batch[1])

    def eval_sums(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return torch.stack(
            [
                (self.loss(logits, y).float() * len(y)).double(),
                (logits.argmax(dim=1) == y).sum().double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=logits.device),
            ]
        )

    def eval_metrics(self, sums: list[float]) -> dict[str, float]:
        loss, correct, count = sums
        if count == 0:
            return {"loss": math.nan, "acc": math.nan}
        return {"loss": loss / count, "acc": correct / count}
