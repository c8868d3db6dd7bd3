"""The training loop: fit() runs epochs; one batch goes forward, backward, step.

Follow a batch: `_train_epoch` takes it from the data iterator, runs the model
under autocast, scales and backpropagates the loss, and every
`accumulate_grad_batches` micro-batches `_optimizer_step` clips, steps the
optimizer and the scheduler. Metrics stay on the device and are read back only
when logging, at validation and at epoch ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from trainer.checkpoint import (
    capture_rng,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
    unwrapped_state_dict,
)
from trainer.errors import ConfigError

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    batches: Any,
    loss_fn: nn.Module,
    prefix: str,
    autocast: Any = contextlib.nullcontext,
) -> dict[str, float]:
    """Mean loss and accuracy over `batches`, summed on the device and read back once."""
    model.eval()
    loss_sum, correct, count = None, None, 0
    for x, y in batches.epoch(0):
        with autocast():
            logits = model(x)
            batch_loss = loss_fn(logits, y).float() * len(y)
        batch_correct = (logits.argmax(dim=1) == y).sum()
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
        count += len(y)
    if count == 0:
        return {f"{prefix}/loss": math.nan, f"{prefix}/acc": math.nan}
    loss_total, correct_total = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    return {f"{prefix}/loss": loss_total / count, f"{prefix}/acc": correct_total / count}


class Trainer:
    def __init__(
        self,
        cfg: Any,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        data: Any,
        device: torch.device,
        max_steps: int,
        logger: Any = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_cfg: Any = None,
        seed: int = 0,
        run_config: dict | None = None,
        callbacks: list[Any] | None = None,
    ) -> None:
        self.cfg, self.device, self.max_steps = cfg, device, max_steps
        self.model = model
        self.forward_model = torch.compile(model) if cfg.compile else model
        self.loss_fn, self.optimizer, self.scheduler = loss_fn, optimizer, scheduler
        self.logger, self.run_config = logger, run_config
        # Objects with on_validation_end(trainer, metrics); one may set trainer.stop_reason.
        self.callbacks = list(callbacks or [])
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_cfg = checkpoint_cfg
        self.train_batches = data.batches("train", seed=seed, limit_batches=cfg.limit_train_batches)
        self.val_batches = (
            data.batches("val", limit_batches=cfg.limit_val_batches) if data.val_size else None
        )
        self.test_batches = data.batches("test")
        dtype = AUTOCAST_DTYPES[str(cfg.precision)]
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        )
        # Loss scaling only matters for fp16; disabled, the scaler is a pass-through.
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        self.accumulate = cfg.accumulate_grad_batches
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.maximize = cfg.monitor_mode == "max"
        # Position and history: everything a checkpoint must carry to continue exactly.
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.best_value: float | None = None
        self.best_metrics: dict[str, float] = {}
        self.best_epoch, self.best_step, self.bad_validations = -1, -1, 0
        self.stop_reason: str | None = None
        self.last_val: dict[str, float] = {}
        self._validated_at_step = -1
        self._reset_train_meters()

    # ----------------------------------------------------------------- fit
    def fit(self) -> dict[str, Any]:
        started = time.perf_counter()
        max_epochs = self.cfg.max_epochs or math.inf
        while self.stop_reason is None:
            if self.epoch >= max_epochs:
                self.stop_reason = "max_epochs"
                break
            if self.global_step >= self.max_steps:
                self.stop_reason = "max_steps"
                break
            epoch_started = time.perf_counter()
            self._train_epoch()
            if self.batch_in_epoch >= len(self.train_batches):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._log({"train/epoch_time_s": time.perf_counter() - epoch_started})
                if self.epoch % self.cfg.val_every_n_epochs == 0:
                    self._validate()
                if self.checkpoint_cfg and self.epoch % self.checkpoint_cfg.every_n_epochs == 0:
                    self.save("last")
        if self.batch_in_epoch:  # stopped mid-epoch: keep the model we end with
            self._validate()
            self.save("last")
        return {"stop_reason": self.stop_reason, "fit_time_s": time.perf_counter() - started}

    def _train_epoch(self) -> None:
        self.model.train()
        batches = self.train_batches
        bar = tqdm(
            total=len(batches),
            initial=self.batch_in_epoch,
            desc=f"epoch {self.epoch}",
            disable=not (self.cfg.progress_bar and sys.stderr.isatty()),
            dynamic_ncols=True,
            leave=False,
        )
        for x, y in batches.epoch(self.epoch, self.batch_in_epoch):
            with self.autocast():
                logits = self.forward_model(x)
                loss = self.loss_fn(logits, y)
            self.scaler.scale(loss / self.accumulate).backward()
            self.batch_in_epoch += 1
            self._loss_sum += loss.detach()
            self._loss_batches += 1
            self._samples += len(y)
            bar.update(1)
            last_of_epoch = self.batch_in_epoch == len(batches)
            if self.batch_in_epoch % self.accumulate and not last_of_epoch:
                continue
            self._optimizer_step()
            if self.global_step % self.cfg.log_every_n_steps == 0:
                self._log_train(bar)
            every = self.cfg.val_every_n_steps
            if every and self.global_step % every == 0 and not last_of_epoch:
                self._validate()
                self.model.train()
            if self.stop_reason or self.global_step >= self.max_steps:
                break
        if self._loss_batches:
            self._log_train(bar)
        bar.close()

    def _optimizer_step(self) -> None:
        if self.cfg.gradient_clip_val:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.gradient_clip_val)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        if self.global_step == 1:
            log.info("first optimizer step done")

    # ------------------------------------------------------------- metrics
    def _reset_train_meters(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_batches, self._samples = 0, 0
        self._meter_started = time.perf_counter()

    def _log_train(self, bar: tqdm) -> None:
        """The one host sync of a logging interval."""
        loss = (self._loss_sum / self._loss_batches).item()
        rate = self._samples / max(time.perf_counter() - self._meter_started, 1e-9)
        lr = self._lr
        self._log({"train/loss": loss, "train/lr": lr, "train/samples_per_s": rate})
        if bar.disable:
            log.info(
                "epoch %d step %d (%d/%d): loss %.4f lr %.3g %.0f samples/s",
                self.epoch,
                self.global_step,
                self.batch_in_epoch,
                len(self.train_batches),
                loss,
                lr,
                rate,
            )
        else:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", sps=f"{rate:.0f}", refresh=False)
        self._reset_train_meters()

    def _log(self, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log_metrics(metrics, self.global_step)

    def evaluate(self, batches: Any, prefix: str) -> dict[str, float]:
        return evaluate_model(self.forward_model, batches, self.loss_fn, prefix, self.autocast)

    # ---------------------------------------------------------- validation
    def _validate(self) -> None:
        if self.val_batches is None or self._validated_at_step == self.global_step:
            return
        self._validated_at_step = self.global_step
        metrics = self.evaluate(self.val_batches, "val")
        self.last_val = metrics
        self._log(metrics)
        log.info(
            "epoch %d step %d: %s",
            self.epoch,
            self.global_step,
            " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
        )
        if self.cfg.monitor not in metrics:
            raise ConfigError(
                f"trainer.monitor={self.cfg.monitor!r} is not a logged metric; "
                f"choose one of {sorted(metrics)}"
            )
        value = metrics[self.cfg.monitor]
        delta = self.cfg.early_stopping.min_delta
        if self.best_value is None or (
            value > self.best_value + delta if self.maximize else value < self.best_value - delta
        ):
            self.best_value, self.best_epoch, self.best_step = value, self.epoch, self.global_step
            self.best_metrics = metrics
            self.bad_validations = 0
            if self.checkpoint_cfg and self.checkpoint_cfg.save_best:
                self.save("best")
        else:
            self.bad_validations += 1
        patience = self.cfg.early_stopping.patience
        if patience is not None and self.bad_validations >= patience:
            self.stop_reason = "early_stopping"
            log.info(
                "early stopping: %s did not improve for %d validations", self.cfg.monitor, patience
            )
        target = self.cfg.stop_at
        if target is not None and (value >= target if self.maximize else value <= target):
            self.stop_reason = "stop_at"
            log.info("stop_at reached: %s=%.4f (target %s)", self.cfg.monitor, value, target)
        for callback in self.callbacks:
            callback.on_validation_end(self, metrics)

    def test(self) -> dict[str, float]:
        """Test the best checkpoint's weights (the current weights if there is none)."""
        best = self.checkpoint_dir / "best.pt" if self.checkpoint_dir else None
        if best is not None and best.is_file():
            load_model_state(self.model, load_checkpoint(best, self.device)["model"], str(best))
        metrics = self.evaluate(self.test_batches, "test")
        self._log(metrics)
        log.info("test: %s", " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    # --------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrapped_state_dict(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "rng": capture_rng(),
            "trainer": {
                "best_value": self.best_value,
                "best_metrics": self.best_metrics,
                "best_epoch": self.best_epoch,
                "best_step": self.best_step,
                "bad_validations": self.bad_validations,
                "last_val": self.last_val,
            },
            "config": self.run_config,
        }

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        load_model_state(self.model, state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step = state["global_step"]
        restore_rng(state["rng"])
        history = state["trainer"]
        self.best_value, self.best_epoch = history["best_value"], history["best_epoch"]
        self.best_step, self.bad_validations = history["best_step"], history["bad_validations"]
        self.best_metrics = dict(history["best_metrics"])
        self.last_val = dict(history["last_val"])

    def resume(self, ckpt_path: str | Path) -> None:
        self.load_state_dict(load_checkpoint(ckpt_path, self.device), str(ckpt_path))
        log.info("resumed from %s at epoch %d step %d", ckpt_path, self.epoch, self.global_step)

    def save(self, name: str) -> None:
        if self.checkpoint_dir is None:
            return
        if name == "last" and not self.checkpoint_cfg.save_last:
            return
        save_checkpoint(self.state_dict(), self.checkpoint_dir / f"{name}.pt")
