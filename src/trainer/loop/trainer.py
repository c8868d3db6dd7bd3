"""The training loop: fit() runs epochs; one batch goes forward, backward, step.

Follow a batch: `_train_epoch` takes it from the data iterator, the task turns it
into a loss under autocast (`tasks/`: classification, language modeling, ...; the
loop knows nothing of images or tokens), `NanGuard` checks the loss, it is scaled
and backpropagated, and
every `accumulate_grad_batches` micro-batches `_optimizer_step` clips, steps the
optimizer and the scheduler. Metrics stay on the device and are read back only
when logging, at validation and at epoch ends.

Checkpoints are taken only at optimizer-step boundaries, and hold everything
that decides what comes next (see `state_dict`), so a resumed run continues
bit for bit as if it had never stopped.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from trainer.checkpoint.io import load_checkpoint
from trainer.checkpoint.resume import CheckpointFiles
from trainer.config.schema import plain_config
from trainer.data.batches import SplitBatches
from trainer.distributed.context import all_reduce_sum, barrier
from trainer.distributed.strategies import SingleProcess
from trainer.errors import Preempted
from trainer.loop.best import BestSoFar
from trainer.loop.evaluation import evaluate_model
from trainer.loop.loss_weights import StepLossWeights
from trainer.loop.nan_guard import NanGuard
from trainer.loop.preemption import PreemptionHandler
from trainer.loop.state import TrainMeters, load_training_state, state_key, training_state
from trainer.runtime import AUTOCAST_DTYPES, autocast_context, resolve_precision
from trainer.tasks.base import Task

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        cfg: Any,
        model: nn.Module,
        task: Task,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        batches: SplitBatches,
        device: torch.device,
        max_steps: int,
        strategy: SingleProcess | None = None,
        files: CheckpointFiles | None = None,
        checkpoint_cfg: Any = None,
        logger: Any = None,
        preemption: PreemptionHandler | None = None,
        unfreezer: Callable[[int], bool] | None = None,
        callbacks: list[Any] | None = None,
        extra_state: dict[str, Any] | None = None,
    ) -> None:
        # Plain objects, not DictConfigs: their attribute reads cost microseconds per step.
        cfg, checkpoint_cfg = plain_config(cfg), plain_config(checkpoint_cfg)
        self.cfg, self.device, self.max_steps = cfg, device, max_steps
        # `model` is the plain module (its names are checkpoint keys); the strategy owns
        # what it made of it (DDP / FSDP), and compile goes around that.
        self.model, self.task = model, task
        self.strategy = strategy or SingleProcess()
        self.dist = self.strategy.ctx
        self.wrapped_model = self.strategy.wrapped or model
        self.forward_model = (
            torch.compile(self.wrapped_model) if cfg.compile else self.wrapped_model
        )
        self.optimizer, self.scheduler = optimizer, scheduler
        self.logger = logger
        # Plain data saved with every checkpoint as is: the run's config, the tokenizer.
        self.extra_state = dict(extra_state or {})
        # Objects with on_validation_end(trainer, metrics); one may set trainer.stop_reason.
        self.callbacks = list(callbacks or [])
        self.files, self.checkpoint_cfg = files, checkpoint_cfg
        self.checkpoint_dir = files.folder if files is not None else None
        self.preemption = preemption or PreemptionHandler()
        self.nan_guard = NanGuard(cfg.nan_policy, cfg.max_consecutive_nan, device, self.dist)
        self.seed = batches.seed
        self.train_batches, self.val_batches = batches.train, batches.val
        self.test_batches, self.global_batch = batches.test, batches.global_batch
        self.autocast = autocast_context(str(cfg.precision), device)
        dtype = AUTOCAST_DTYPES[resolve_precision(str(cfg.precision), device)]
        # Loss scaling only matters for fp16; disabled, the scaler is a pass-through.
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        self.accumulate = cfg.accumulate_grad_batches
        self.loss_weights = StepLossWeights(task, self.dist, self.accumulate)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Gradual unfreezing (finetune.unfreeze_at_epoch): called with each new epoch.
        self.unfreezer = unfreezer
        # Position and history: everything a checkpoint must carry to continue exactly.
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.best = BestSoFar.from_config(cfg)
        self.stop_reason: str | None = None
        self.last_val: dict[str, float] = {}
        self.validated_at_step = -1
        self.meters = TrainMeters(device, optimizer.param_groups[0]["lr"])
        self._saved_key: tuple | None = None
        self._best_key: tuple | None = None
        self._saved_path: Path | None = None
        self._save_pending, self._last_save_time = False, time.monotonic()

    # ----------------------------------------------------------------- fit
    def fit(self) -> dict[str, Any]:
        started = time.perf_counter()
        max_epochs = self.cfg.max_epochs or math.inf
        self._stop_at_limits(max_epochs)
        if self.cfg.val_at_start and self.global_step == 0:
            self._validate(track_best=False)
        try:
            while self.stop_reason is None:
                epoch_started = time.perf_counter()
                self._train_epoch()
                if self.batch_in_epoch >= len(self.train_batches):
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    self.unfreeze(self.epoch)
                    self._log({"train/epoch_time_s": time.perf_counter() - epoch_started})
                    if self.epoch % self.cfg.val_every_n_epochs == 0:
                        self._validate()
                    # Known before the save, so the final state is written once, not twice.
                    self._stop_at_limits(max_epochs)
                    every = self.checkpoint_cfg.every_n_epochs if self.checkpoint_cfg else 0
                    if self._save_pending or (every and self.epoch % every == 0):
                        self.save_last()
                if self._preempted(at_boundary=True):
                    path = self.save_last(wait=True)  # the process exits right after
                    raise Preempted(
                        f"{self.preemption.signal_name}: saved step {self.global_step} to "
                        f"{path}; run the same command with resume=auto to continue"
                    )
                self._stop_at_limits(max_epochs)
            if self.batch_in_epoch:  # stopped mid-epoch: keep the model we end with
                self._validate()
            self.save_last()
        finally:
            # fit returns with every checkpoint on disk. Leaving by an error, that error
            # is the news: a failed write is then only logged.
            if self.files is not None:
                self.files.close(raise_error=sys.exc_info()[1] is None)
        return {"stop_reason": self.stop_reason, "fit_time_s": time.perf_counter() - started}

    def _stop_at_limits(self, max_epochs: float) -> None:
        if self.stop_reason is None and self.epoch >= max_epochs:
            self.stop_reason = "max_epochs"
        elif self.stop_reason is None and self.global_step >= self.max_steps:
            self.stop_reason = "max_steps"

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
        # The micro-batches of one optimizer step: their loss joins the meters only
        # once the step is taken, so a skipped or failed step leaves no trace.
        window_loss, window_batches, window_units, bad_at = None, 0, 0, None
        for batch in batches.epoch(self.epoch, self.batch_in_epoch):
            # Under DDP/FSDP only the micro-batch that steps all-reduces its gradients.
            stepping = (self.batch_in_epoch + 1) % self.accumulate == 0 or (
                self.batch_in_epoch + 1 == len(batches)
            )
            with self.strategy.grad_sync(self.wrapped_model, stepping):
                with self.autocast():
                    loss = self.task.training_loss(self.forward_model, batch)
                if bad_at is None and self.nan_guard.observe(loss, self.global_step + 1):
                    bad_at = (
                        f"step {self.global_step + 1} "
                        f"(epoch {self.epoch}, batch {self.batch_in_epoch})"
                    )
                    if self.nan_guard.policy == "error":
                        # Back to the step's start: save the state after the last good step.
                        self.batch_in_epoch -= window_batches
                        saved = self.save_last(wait=True)
                        raise self.nan_guard.error(bad_at, self.global_step, saved)
                if bad_at is None:
                    self.scaler.scale(self.loss_weights.to_backward(loss, batch)).backward()
            if bad_at is None:
                window_loss = loss.detach() if window_loss is None else window_loss + loss.detach()
                window_batches += 1
                window_units += self.task.batch_units(batch)
            self.batch_in_epoch += 1
            bar.update(1)
            last_of_epoch = self.batch_in_epoch == len(batches)
            if self.batch_in_epoch % self.accumulate and not last_of_epoch:
                continue
            if bad_at is not None:
                self.optimizer.zero_grad(set_to_none=True)
                self.loss_weights.reset()
                if self.nan_guard.count_skip(bad_at):
                    saved = self.save_last(wait=True)
                    raise self.nan_guard.error(None, self.global_step, saved)
            else:
                self.meters.add(window_loss, window_batches, window_units)
                self._optimizer_step()
                self._after_step(bar, last_of_epoch)
            window_loss, window_batches, window_units, bad_at = None, 0, 0, None
            preempted = self._preempted()
            if preempted and not last_of_epoch:
                self.save_last()
            if preempted or self.stop_reason or self.global_step >= self.max_steps:
                break
        # A preempted run saved mid-interval meters: the resumed run logs this point.
        if self.meters.batches and not self.preemption.agreed:
            self._log_train(bar)
        bar.close()

    def _preempted(self, at_boundary: bool = False) -> bool:
        exchange = at_boundary or self.global_step % self.cfg.log_every_n_steps == 0
        return self.preemption.agree(self.dist, self.device, exchange)

    def unfreeze(self, epoch: int) -> None:
        # Before any checkpoint of `epoch`, so saved optimizer states include the new groups.
        if self.unfreezer is not None and self.unfreezer(epoch):
            self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _optimizer_step(self) -> None:
        self.loss_weights.normalize(self.params)
        if self.cfg.gradient_clip_val:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.gradient_clip_val)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.nan_guard.consecutive = 0
        self.meters.lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        if self.global_step == 1:
            log.info("first optimizer step done")

    def _after_step(self, bar: tqdm, last_of_epoch: bool) -> None:
        """Logging, validation and the checkpoint cadence, in that order, after a step."""
        if self.global_step % self.cfg.log_every_n_steps == 0:
            self._log_train(bar)
        every = self.cfg.val_every_n_steps
        if every and self.global_step % every == 0 and not last_of_epoch:
            self._validate()
            self.model.train()
        ckpt = self.checkpoint_cfg
        if ckpt is None:
            return
        due = bool(ckpt.every_n_steps) and self.global_step % ckpt.every_n_steps == 0
        minutes = ckpt.every_n_minutes
        due = due or bool(minutes) and time.monotonic() - self._last_save_time >= minutes * 60
        if due and last_of_epoch:
            self._save_pending = True  # saved after the epoch-end validation, in fit()
        elif due:
            self.save_last()

    def _check_recorded_nonfinite(self) -> None:
        """On accelerators: fail at the first non-finite loss the device recorded."""
        error = self.nan_guard.recorded_error(self._saved_path)
        if error is not None:
            self.wait_for_checkpoints()  # the error names the newest one: on disk first
            raise error

    # ------------------------------------------------------------- metrics
    def _log_train(self, bar: tqdm) -> None:
        """The one host sync of a logging interval."""
        self._check_recorded_nonfinite()
        meters = self.meters
        mean_loss = all_reduce_sum(meters.loss_sum / max(meters.batches, 1), self.dist)
        loss = mean_loss.item() / self.dist.world_size
        elapsed = max(time.perf_counter() - meters.started, 1e-9)
        rate = meters.units * self.dist.world_size / elapsed
        unit, lr = self.task.unit, meters.lr
        metrics = {"train/loss": loss, "train/lr": lr, f"train/{unit}_per_s": rate}
        if self.nan_guard.policy == "skip":
            metrics["train/nan_skipped"] = self.nan_guard.skipped
        for name, value in self.task.train_metrics().items():
            metrics[f"train/{name}"] = float(value)
        self._log(metrics)
        shown_rate = f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"  # a DPO run: ~0.3 pairs/s
        if bar.disable:
            where = f"epoch {self.epoch} step {self.global_step} "
            where += f"({self.batch_in_epoch}/{len(self.train_batches)})"
            log.info("%s: loss %.4f lr %.3g %s %s/s", where, loss, lr, shown_rate, unit)
        else:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", rate=shown_rate, refresh=False)
        meters.reset()

    def _log(self, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log_metrics(metrics, self.global_step)

    def evaluate(self, batches: Any, prefix: str) -> dict[str, float]:
        return evaluate_model(
            self.forward_model, batches, self.task, prefix, self.autocast, self.dist
        )

    # ---------------------------------------------------------- validation
    def _validate(self, track_best: bool = True) -> None:
        if self.val_batches is None or self.validated_at_step == self.global_step:
            return
        self.validated_at_step = self.global_step
        self._check_recorded_nonfinite()
        metrics = self.evaluate(self.val_batches, "val")
        self.last_val = metrics
        self._log(metrics)
        self._log_samples()
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        log.info("epoch %d step %d: %s", self.epoch, self.global_step, shown)
        if not track_best:
            self.best.check_logged(metrics)
            return
        improved, stop = self.best.update(metrics, self.epoch, self.global_step)
        if improved and self.files is not None and self.checkpoint_cfg.save_best:
            self._check_recorded_nonfinite()
            state = self.state_dict()  # collective under torch.distributed
            if self.dist.is_main:
                self.files.save_best(state)
            barrier(self.dist)  # no rank runs ahead of a save (readers wait: see test())
            self._best_key = state_key(self)
        self.stop_reason = stop or self.stop_reason
        for callback in self.callbacks:
            callback.on_validation_end(self, metrics)

    def _log_samples(self) -> None:
        """What the model writes now (a language model's sample), for TensorBoard's Text tab.

        Rank 0 alone runs the plain module, so no collective is involved; a sharded
        (FSDP) model has no whole copy on one rank and shows none."""
        if self.logger is None or not self.dist.is_main or self.strategy.name == "fsdp":
            return
        for tag, text in self.task.samples(self.model).items():
            self.logger.log_text(tag, text, self.global_step)

    def test(self) -> dict[str, float]:
        """Test the best checkpoint's weights (the current weights if there is none)."""
        if self.test_batches is None:
            return {}
        self.wait_for_checkpoints()
        barrier(self.dist)  # rank 0 wrote best.pt; every rank reads it
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
        return training_state(self)

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        load_training_state(self, state, source)

    def save_last(self, wait: bool = False) -> Path | None:
        """Checkpoint the current state (once per distinct state); returns its file.

        `wait`: return once it is on disk (checkpoint.async_write), as it is named next."""
        if self.files is None:
            return None
        key = state_key(self)
        if key != self._saved_key:
            self._check_recorded_nonfinite()  # never write weights trained on a NaN loss
            if self.logger is not None:
                # Points up to this step reach the disk before a checkpoint says they exist;
                # a resumed run purges the later ones (see run.py).
                self.logger.flush()
            # Every rank knows the file rank 0 writes: any rank's error may name it.
            path = self.files.path_for(self.global_step)
            if key == self._best_key:  # best.pt holds this very state: link it, no second write
                if self.dist.is_main:
                    self.files.save(None, self.global_step, self.files.best)
            else:
                state = self.state_dict()  # collective under torch.distributed
                if self.dist.is_main:
                    self.files.save(state, self.global_step)
            barrier(self.dist)
            self._saved_key, self._saved_path = key, path or self._saved_path
            self._save_pending, self._last_save_time = False, time.monotonic()
        if wait:
            self.files.wait()
        return self._saved_path

    def wait_for_checkpoints(self) -> None:
        """Block until rank 0's checkpoint writes are on disk; a failed one's error is raised."""
        if self.files is not None:
            self.files.wait()
