"""`train(cfg)`: build everything a config names, fit, test, write results.

This is the library function behind `python train.py`; tests call it directly
with a config composed through Hydra's compose API.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trainer.errors import ConfigError

log = logging.getLogger(__name__)


def train(cfg: DictConfig, started: float | None = None) -> float | None:
    """Run training as configured; returns `cfg.optimized_metric` for sweepers."""

    from trainer.optim import build_optimizer
    from trainer.pruning import pruning_callback
    from trainer.runtime import check_precision, seed_everything, select_device
    from trainer.trainer import Trainer

    started = started or time.time()
    output_dir = Path(cfg.paths.output_dir)
    check_trainer_config(cfg.trainer)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    device = select_device(cfg.trainer.accelerator)
    check_precision(str(cfg.trainer.precision), device)

    data = instantiate(cfg.data, _convert_="all")
    data.setup(device)
    model = instantiate(cfg.model, _convert_="all").to(device)
    loss_fn = instantiate(cfg.loss, _convert_="all")
    train_batches = len(data.batches("train", limit_batches=cfg.trainer.limit_train_batches))
    if train_batches == 0:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the training set; lower it"
        )
    steps_per_epoch = math.ceil(train_batches / cfg.trainer.accumulate_grad_batches)
    max_steps = cfg.trainer.max_steps or math.inf
    if cfg.trainer.max_epochs:
        max_steps = min(max_steps, cfg.trainer.max_epochs * steps_per_epoch)
    optimizer = build_optimizer(
        instantiate(cfg.optimizer, _convert_="all"), model, cfg.optimizer.get("weight_decay", 0.0)
    )
    scheduler = None
    if cfg.scheduler and cfg.scheduler.get("_target_"):
        make_scheduler = instantiate(cfg.scheduler, _convert_="all")
        scheduler = make_scheduler(
            optimizer, total_steps=int(max_steps), steps_per_epoch=steps_per_epoch
        )
    logger = None
    if cfg.logger.get("_target_"):
        logger = instantiate(cfg.logger, log_dir=str(output_dir), _convert_="all")
        logger.log_text("config", OmegaConf.to_yaml(cfg, resolve=True))

    trainer = Trainer(
        cfg.trainer,
        model,
        loss_fn,
        optimizer,
        scheduler,
        data,
        device,
        max_steps=int(max_steps),
        logger=logger,
        checkpoint_dir=output_dir / cfg.checkpoint.dirname,
        checkpoint_cfg=cfg.checkpoint,
        seed=cfg.seed,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        callbacks=[c for c in (pruning_callback(cfg),) if c is not None],
    )
    if cfg.ckpt_path:
        trainer.resume(cfg.ckpt_path)
        if logger is not None:
            # Points logged after the checkpoint by the crashed run are dropped.
            logger.purge_step = trainer.global_step
    log.info(
        "training %s on %s: %d parameters, %d steps/epoch, up to %s steps",
        type(model).__name__,
        device,
        sum(p.numel() for p in model.parameters()),
        steps_per_epoch,
        int(max_steps),
    )
    fit = trainer.fit()
    test = trainer.test() if cfg.trainer.test_after_fit else {}
    results = {
        "status": "pruned" if fit["stop_reason"] == "pruned" else "completed",
        "metrics": {**trainer.best_metrics, **test},
        "last_val": trainer.last_val,
        "best_epoch": trainer.best_epoch,
        "best_step": trainer.best_step,
        "monitor": cfg.trainer.monitor,
        "epochs": trainer.epoch,
        "steps": trainer.global_step,
        "stop_reason": fit["stop_reason"],
        "fit_time_s": round(fit["fit_time_s"], 3),
        "wall_time_s": round(time.time() - started, 3),
        "overrides": task_overrides(),
        "job_num": job_num(),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if logger is not None:
        logger.log_hparams(hparams(cfg), {k: v for k, v in results["metrics"].items()})
        logger.close()
    log.info("results: %s", json.dumps(results["metrics"]))
    return optimized_value(cfg, results["metrics"])


def check_trainer_config(trainer_cfg: Any) -> None:
    if not (trainer_cfg.max_epochs or trainer_cfg.max_steps):
        raise ConfigError("set trainer.max_epochs or trainer.max_steps (at least one, >= 1)")
    for key in ("max_epochs", "max_steps"):
        value = trainer_cfg[key]
        if value is not None and value < 1:
            raise ConfigError(f"trainer.{key}={value} must be >= 1 (or null)")
    if trainer_cfg.accumulate_grad_batches < 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={trainer_cfg.accumulate_grad_batches} must be >= 1"
        )
    if trainer_cfg.monitor_mode not in ("max", "min"):
        raise ConfigError(f"trainer.monitor_mode={trainer_cfg.monitor_mode!r} must be max or min")


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name!r} is not a result; choose one of {sorted(metrics)}"
        )
    return metrics[name]


def task_overrides() -> list[str]:
    """The command-line overrides of this job ([] outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def job_num() -> int | None:
    """This job's number in a sweep (None outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.get("num") if HydraConfig.initialized() else None


def hparams(cfg: DictConfig) -> dict[str, Any]:
    """The overrides, flattened, plus the few settings every run should show."""
    values: dict[str, Any] = {
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "data": cfg.data.name,
        "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1],
        "optimizer.lr": cfg.optimizer.lr,
        "data.batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
    }
    for override in task_overrides():
        key, _, value = override.lstrip("+~").partition("=")
        if not key.startswith("hydra.") and not key.startswith("paths."):
            values[key] = _parse_scalar(value)
    return values


def _parse_scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
