"""What a checkpoint holds: the full training state of a `Trainer`, and how it is restored.

The model, optimizer, scheduler and scaler states; the position in the epoch
and the data-order state; every RNG; early-stopping and best-metric history;
the metric meters of the current logging interval; NaN-skip counters; and the
logger's step. Restored, a run continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sized
from typing import Any, Protocol

import torch
from torch import nn

from trainer.checkpoint.io import capture_rng, restore_rng
from trainer.distributed.context import DistContext, gather_rng_states
from trainer.distributed.strategies import SingleProcess
from trainer.errors import CheckpointError
from trainer.loop.best import BestSoFar
from trainer.loop.nan_guard import NanGuard

log = logging.getLogger(__name__)

# Reached limits are not saved: a resumed run derives them again from its config.
LIMIT_STOPS = ("max_epochs", "max_steps")


class CheckpointedLoop(Protocol):
    """What a checkpoint reads and restores of the loop (trainer.loop.trainer.Trainer):
    its parts, its position and its best-so-far history."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LR scheduler or None
    scaler: torch.amp.GradScaler
    strategy: SingleProcess
    dist: DistContext
    nan_guard: NanGuard
    meters: TrainMeters
    train_batches: Sized
    seed: int
    global_batch: int
    max_steps: float
    epoch: int
    batch_in_epoch: int
    global_step: int
    best: BestSoFar
    last_val: dict[str, float]
    stop_reason: str | None
    validated_at_step: int

    extra_state: dict[str, Any]

    def unfreeze(self, epoch: int) -> None: ...


def training_state(trainer: CheckpointedLoop) -> dict[str, Any]:
    """Everything that decides what a resumed run does next."""
    return {
        "model": trainer.strategy.model_state(trainer.model),
        "optimizer": trainer.strategy.optimizer_state(trainer.model, trainer.optimizer),
        "strategy": trainer.strategy.name,
        "world_size": trainer.dist.world_size,
        "global_batch": trainer.global_batch,
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None,
        "scaler": trainer.scaler.state_dict(),
        "epoch": trainer.epoch,
        "batch_in_epoch": trainer.batch_in_epoch,
        "global_step": trainer.global_step,
        # The order of an epoch is a function of (seed, epoch): this and the
        # position above are the whole data-order state.
        "data_order": {"seed": trainer.seed, "batches_per_epoch": len(trainer.train_batches)},
        # Every rank's RNG (dropout masks differ per rank), gathered for exact resume.
        "rng": gather_rng_states(capture_rng(), trainer.dist),
        "trainer": {
            **trainer.best.state_dict(),
            "last_val": trainer.last_val,
            "stop_reason": saved_stop_reason(trainer),
            "validated_at_step": trainer.validated_at_step,
            "nan_guard": trainer.nan_guard.state_dict(),
            "max_steps": trainer.max_steps,
        },
        # The running sums of the current logging interval, so its point matches.
        "meters": trainer.meters.state_dict(),
        "logger": {"global_step": trainer.global_step},
        # The run's config, the tokenizer: plain data that travels with the weights.
        **trainer.extra_state,
    }


class TrainMeters:
    """The running sums of the current logging interval, kept on the device."""

    def __init__(self, device: torch.device, lr: float) -> None:
        self.device, self.lr = device, lr  # lr: the one the last step used
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.batches, self.units = 0, 0
        self.started = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, batches: int, units: int) -> None:
        self.loss_sum += loss_sum
        self.batches += batches
        self.units += units

    def state_dict(self) -> dict[str, Any]:
        # "samples" is the key checkpoints of the image-only trainer used for units.
        return {"loss_sum": self.loss_sum, "loss_batches": self.batches, "samples": self.units,
                "lr": self.lr}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum = state["loss_sum"].to(self.device)
        self.batches, self.units, self.lr = state["loss_batches"], state["samples"], state["lr"]


def saved_stop_reason(trainer: CheckpointedLoop) -> str | None:
    """The stop decision a checkpoint keeps (early stopping, stop_at, pruning)."""
    return None if trainer.stop_reason in LIMIT_STOPS else trainer.stop_reason


def state_key(trainer: CheckpointedLoop) -> tuple:
    """What tells two checkpointable states apart (nothing else changes between them).

    So the last epoch's best.pt, saved before the limit is noted, is linked as the
    final checkpoint instead of being written a second time."""
    return (
        trainer.global_step,
        trainer.epoch,
        trainer.batch_in_epoch,
        trainer.validated_at_step,
        saved_stop_reason(trainer),
    )


def load_training_state(trainer: CheckpointedLoop, state: dict[str, Any], source: str) -> None:
    # First: another global batch also changes the step count, and is the cause to name.
    _check_same_layout(trainer, state, source)
    planned = state["trainer"].get("max_steps")
    if trainer.scheduler is not None and planned is not None and planned != trainer.max_steps:
        raise CheckpointError(
            f"{source} comes from a run of {planned} optimizer steps and this config runs "
            f"{trainer.max_steps}: its learning-rate schedule cannot be stretched. Keep "
            "trainer.max_epochs/max_steps, data.batch_size, trainer.limit_train_batches and "
            "trainer.accumulate_grad_batches as in that run, or use scheduler=none"
        )
    trainer.strategy.load_model(trainer.model, state["model"], source)
    trainer.unfreeze(state["epoch"])  # the saved optimizer has the unfrozen groups too
    trainer.strategy.load_optimizer(trainer.model, trainer.optimizer, state["optimizer"])
    if trainer.scheduler is not None and state.get("scheduler"):
        trainer.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.epoch, trainer.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
    trainer.global_step = state["global_step"]
    rng = state["rng"]
    restore_rng(rng[trainer.dist.rank] if isinstance(rng, list) else rng)
    history = state["trainer"]
    trainer.best.load_state_dict(history)
    trainer.last_val = dict(history["last_val"])
    # Format 1 checkpoints were written at epoch ends only: no meters or counters.
    trainer.stop_reason = history.get("stop_reason")
    trainer.validated_at_step = history.get("validated_at_step", -1)
    if "nan_guard" in history:
        trainer.nan_guard.load_state_dict(history["nan_guard"])
    if "meters" in state:
        trainer.meters.load_state_dict(state["meters"])
    order = state.get("data_order", {})
    if order and (order["seed"], order["batches_per_epoch"]) != (
        trainer.seed,
        len(trainer.train_batches),
    ):
        log.warning(
            "%s was trained with seed %s and %s batches per epoch, this run has %s and %s: "
            "the data order after resuming differs from the original run's",
            source,
            order["seed"],
            order["batches_per_epoch"],
            trainer.seed,
            len(trainer.train_batches),
        )


def _check_same_layout(trainer: CheckpointedLoop, state: dict[str, Any], source: str) -> None:
    """Exact resume needs the same global batch; FSDP optimizer state needs FSDP."""
    saved_batch = state.get("global_batch", trainer.global_batch)
    if saved_batch != trainer.global_batch:
        per_rank = trainer.global_batch // trainer.dist.world_size
        raise CheckpointError(
            f"{source} was trained with a global batch of {saved_batch} "
            f"({state.get('world_size', 1)} process(es)); this run has {trainer.global_batch} "
            f"({trainer.dist.world_size} x data.batch_size={per_rank}). Set data.batch_size "
            "so that world size x batch size matches to resume exactly"
        )
    saved_fsdp, now_fsdp = state.get("strategy") == "fsdp", trainer.strategy.name == "fsdp"
    if saved_fsdp != now_fsdp:
        raise CheckpointError(
            f"{source} holds {'FSDP' if saved_fsdp else 'non-FSDP'} optimizer state; resume "
            f"it with trainer.strategy={'fsdp' if saved_fsdp else 'ddp'} (the weights alone "
            "load anywhere, e.g. with eval.py)"
        )
