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
    link_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from trainer.distributed import SINGLE, DistContext, all_reduce_sum, barrier, gather_rng_states
from trainer.errors import CheckpointError, ConfigError
from trainer.strategies import SingleProcess

log = logging.getLogger(__name__)

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
        dist: DistContext = SINGLE,
        strategy: SingleProcess | None = None,
        wrapped_model: nn.Module | None = None,
    ) -> None:
        self.cfg, self.device, self.max_steps, self.dist = cfg, device, max_steps, dist
        # `model` is the plain module (its names are checkpoint keys); `wrapped_model` is
        # what the strategy made of it (DDP / FSDP), and compile goes around that.
        self.model, self.strategy = model, strategy or SingleProcess(dist)
        self.wrapped_model = wrapped_model or model
        self.forward_model = (
            torch.compile(self.wrapped_model) if cfg.compile else self.wrapped_model
        )
        self.loss_fn, self.optimizer, self.scheduler = loss_fn, optimizer, scheduler
        self.logger, self.run_config = logger, run_config
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_cfg = checkpoint_cfg
        shard = {"rank": dist.rank, "world_size": dist.world_size}
        self.train_batches = data.batches(
            "train", seed=seed, limit_batches=cfg.limit_train_batches, **shard
        )
        self.val_batches = (
            data.batches("val", limit_batches=cfg.limit_val_batches, **shard)
            if data.val_size
            else None
        )
        self.test_batches = data.batches("test", **shard)
        self.global_batch = data.batch_size * dist.world_size
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
        self._validated_at_step = self._best_saved_at = -1
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
            disable=not (self.cfg.progress_bar and self.dist.is_main and sys.stderr.isatty()),
            dynamic_ncols=True,
            leave=False,
        )
        for x, y in batches.epoch(self.epoch, self.batch_in_epoch):
            self.batch_in_epoch += 1
            last_of_epoch = self.batch_in_epoch == len(batches)
            stepping = self.batch_in_epoch % self.accumulate == 0 or last_of_epoch
            with self.strategy.grad_sync(self.wrapped_model, stepping):
                with self.autocast():
                    logits = self.forward_model(x)
                    loss = self.loss_fn(logits, y)
                self.scaler.scale(
                    loss / self.accumulate if self.accumulate > 1 else loss
                ).backward()
            self._loss_sum += loss.detach()
            self._loss_batches += 1
            self._samples += len(y)
            bar.update(1)
            if not stepping:
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
        mean_loss = all_reduce_sum(self._loss_sum / self._loss_batches, self.dist)
        loss = mean_loss.item() / self.dist.world_size
        elapsed = max(time.perf_counter() - self._meter_started, 1e-9)
        rate = self._samples * self.dist.world_size / elapsed
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
        return evaluate_model(
            self.forward_model, batches, self.loss_fn, prefix, self.autocast, self.dist
        )

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

    def test(self) -> dict[str, float]:
        """Test the best checkpoint's weights (the current weights if there is none)."""
        best = self.checkpoint_dir / "best.pt" if self.checkpoint_dir else None
        if best is not None and best.is_file():
            state = load_checkpoint(best, self.device)["model"]
            self.strategy.load_model(self.model, state, str(best))
        metrics = self.evaluate(self.test_batches, "test")
        self._log(metrics)
        log.info("test: %s", " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    # --------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.strategy.model_state(self.model),
            "optimizer": self.strategy.optimizer_state(self.model, self.optimizer),
            "strategy": self.strategy.name,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            # Every rank's RNG (dropout masks differ per rank), gathered for exact resume.
            "rng": gather_rng_states(capture_rng(), self.dist),
            "world_size": self.dist.world_size,
            "global_batch": self.global_batch,
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
        saved_batch = state.get("global_batch", self.global_batch)
        if saved_batch != self.global_batch:
            per_rank = self.global_batch // self.dist.world_size
            raise CheckpointError(
                f"{source} was trained with a global batch of {saved_batch} "
                f"({state.get('world_size', 1)} process(es)); this run has {self.global_batch} "
                f"({self.dist.world_size} x data.batch_size={per_rank}). Set data.batch_size "
                "so that world size x batch size matches to resume exactly"
            )
        saved_fsdp, now_fsdp = state.get("strategy") == "fsdp", self.strategy.name == "fsdp"
        if saved_fsdp != now_fsdp:
            raise CheckpointError(
                f"{source} holds {'FSDP' if saved_fsdp else 'non-FSDP'} optimizer state; resume "
                f"it with trainer.strategy={'fsdp' if saved_fsdp else 'ddp'} (weights alone load "
                "anywhere: use it with eval.py)"
            )
        self.strategy.load_model(self.model, state["model"], source)
        self.strategy.load_optimizer(self.model, self.optimizer, state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step = state["global_step"]
        rng = state["rng"]
        restore_rng(rng[self.dist.rank] if isinstance(rng, list) else rng)
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
        path = self.checkpoint_dir / f"{name}.pt"
        if name == "last" and self._best_saved_at == self.global_step:
            # best.pt already holds this exact state: share the file instead of writing it twice.
            if self.dist.is_main:
                link_checkpoint(self.checkpoint_dir / "best.pt", path)
        else:
            state = self.state_dict()
            if self.dist.is_main:
                save_checkpoint(state, path)
        if name == "best":
            self._best_saved_at = self.global_step
        barrier(self.dist)  # nobody runs ahead of (or reads) a checkpoint being written
