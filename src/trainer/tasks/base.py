"""What a task is: the part of training that differs between kinds of work.

The loop (trainer/loop/trainer.py), checkpoints, logging and distribution know
nothing of images or tokens. A task turns one batch into a loss, counts the
units a batch holds (images, tokens), and scores batches for validation as
additive sums on the device, so a distributed evaluation all-reduces them and
equals a single-process one.

A batch is whatever the data yields: a tensor, a tuple, a dict of tensors.
Language-model batches are dicts: `input_ids` (B, T), `labels` (B, T) where
`labels[:, t]` is the target of position t (already shifted; IGNORE_INDEX masks
a position out), and optionally `attention_mask` (B, T). Preference batches
carry the same keys twice, prefixed `chosen_` and `rejected_`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


class Task:
    """The interface the Trainer uses; subclasses fill in the four methods.

    `monitor` / `monitor_mode` are the task's default monitored metric, read by
    the configs (`trainer.monitor: ${task.monitor}`): one source for the default.
    `unit` names what throughput counts (`train/<unit>_per_s`).
    """

    unit: str = "samples"
    # What eval_metrics returns, known before anything is built (config checks read it).
    metric_names: tuple[str, ...] = ("loss",)
    # What eval_sums returns, in order (an empty shard contributes zeros of this length).
    sum_names: tuple[str, ...] = ("loss_sum", "count")

    def __init__(
        self, monitor: str = "val/loss", monitor_mode: str = "min", loss: nn.Module | None = None
    ) -> None:
        self.monitor, self.monitor_mode = monitor, monitor_mode
        # The `loss` config group, for tasks where one applies.
        self.loss = loss

    def setup(self, model: nn.Module, device: torch.device, tokenizer: Any = None) -> None:
        """Called once the model is built and on its device, before training.

        A preference task takes its frozen reference model here; `tokenizer` is
        the data's (None for data without one)."""

    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss to backpropagate (a device tensor: no host sync)."""
        raise NotImplementedError

    def batch_units(self, batch: Any) -> int:
        """How many `unit`s the batch holds, from shapes alone (no host sync)."""
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """A 1-D float64 device tensor of additive sums for this batch."""
        raise NotImplementedError

    def eval_metrics(self, sums: list[float]) -> dict[str, float]:
        """Metric values (names without the split prefix) from the summed totals."""
        raise NotImplementedError

    def loss_count(self, batch: Any) -> torch.Tensor | None:
        """How many terms `training_loss` averages over, when that varies between
        batches of one size (unmasked tokens), as a device tensor; None: the loss
        weighs every sample the same. Steps then weigh each term the same over
        micro-batches and ranks (loop/loss_weights.py)."""
        return None

    def check_batch(self, batch: Any) -> None:
        """Raise a DataError naming what the batch is and what this task expects."""

    def train_metrics(self) -> dict[str, torch.Tensor]:
        """Extra training scalars accumulated since the last call (e.g. an MoE
        auxiliary loss), logged as `train/<name>`; read only when logging."""
        return {}

    def samples(self, model: nn.Module) -> dict[str, str]:
        """Text to show in TensorBoard at each validation (tag -> text); rank 0 only."""
        return {}
