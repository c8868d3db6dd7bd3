"""`train(cfg)`: build everything a config names, fit, test, write results.

This is the library function behind `python train.py`; tests call it directly
with a config composed through Hydra's compose API.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trainer.checkpoint.resume import (
    CheckpointFiles,
    check_run_dir_free,
    finished_results,
    resume_state,
)
from trainer.errors import ConfigError, Preempted, UserError
from trainer.run_files import log_run_files, log_run_folder
from trainer.sweep.pruning import PruningTarget, pruning_callback, pruning_target

log = logging.getLogger(__name__)

RUN_CONTROL_KEYS = ("resume", "run_id", "ckpt_path")


@dataclass(frozen=True)
class HydraJob:
    """What a run knows of its Hydra job; spawned ranks, outside Hydra, are handed it."""

    overrides: tuple[str, ...] = ()
    num: int | None = None  # the job number in a sweep (an Optuna sweep's trial number)
    pruning: PruningTarget | None = None
    # What the job runs: its sorted overrides (Hydra's override_dirname), which name its
    # folder in a sweep. Unlike `num`, the same whatever the order of a sweep's values.
    id: str | None = None

    @classmethod
    def current(cls, cfg: DictConfig) -> HydraJob:
        return cls(tuple(task_overrides()), job_num(), pruning_target(cfg), job_id())


def train(
    cfg: DictConfig, started: float | None = None, job: HydraJob | None = None
) -> float | None:
    """Run training as configured; returns `cfg.optimized_metric` for sweepers.

    `trainer.devices=N` outside torchrun spawns N workers that each call this
    function again as one rank of a process group, handed this `job`.
    """
    import torch

    from trainer.config.checks import validate_train_config
    from trainer.distributed.context import (
        SINGLE,
        destroy_process_group,
        init_process_group,
        launched_by_torchrun,
        lost_peer,
        peer_error_line,
    )
    from trainer.loop.preemption import PreemptionHandler, clear_preempted_mark, mark_preempted

    started = started or time.time()
    output_dir = Path(cfg.paths.output_dir)
    # Everything that can be checked without data is checked before data loads,
    # the plain values even before torch is imported.
    device = validate_train_config(cfg)
    finished = finished_results(cfg, output_dir)
    if finished is not None:
        log.info("resume=auto: %s already finished (results.json); nothing to do", output_dir)
        return optimized_value(cfg, finished["metrics"])
    # Before any file is written or removed: a refused run leaves the folder as it was.
    check_run_dir_free(cfg, output_dir)
    job = job or HydraJob.current(cfg)
    if cfg.trainer.devices > 1 and not launched_by_torchrun():
        return _spawn_workers(cfg, device, started, job)
    ctx = SINGLE
    if launched_by_torchrun():
        ctx = init_process_group(device.type, cfg.trainer.dist_timeout_s)
        if device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)
        if not ctx.is_main:  # one line per event: rank 0's (the others log only errors)
            logging.getLogger().setLevel(logging.ERROR)
    if ctx.is_main:
        clear_preempted_mark(output_dir)
    try:
        # Installed before the slow setup, so a signal at any point ends in a checkpoint.
        with PreemptionHandler() as preemption:
            return _train(cfg, ctx, device, started, job, preemption)
    except Preempted as e:
        if ctx.is_main:  # for requeue scripts where the exit code is not ours (torchrun)
            mark_preempted(output_dir, str(e))
        raise
    except RuntimeError as e:
        if not (ctx.enabled and lost_peer(e)):
            raise
        if launched_by_torchrun():
            # torchrun stops the surviving ranks with SIGTERM: the error line comes first.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise UserError(
            f"rank {ctx.rank} lost its process group (a peer died or stopped answering within "
            f"trainer.dist_timeout_s={cfg.trainer.dist_timeout_s}): {peer_error_line(e)}"
        ) from None
    finally:
        destroy_process_group()


def _train(
    cfg: DictConfig,
    ctx,
    device,
    started: float,
    job: HydraJob,
    preemption: Any,
) -> float | None:
    from trainer.checkpoint.fits import check_sizes_fit, check_vocabulary_fits
    from trainer.checkpoint.io import check_state_fits, unwrapped_state_dict
    from trainer.config.checks import (
        check_context_fits,
        check_model_fits_data,
        check_task_fits,
        is_image_data,
    )
    from trainer.distributed.context import broadcast_object
    from trainer.distributed.strategies import make_strategy
    from trainer.finetune import make_unfreezer, prepare_model
    from trainer.loop.trainer import Trainer
    from trainer.optim import build_optimizer
    from trainer.provenance import provenance
    from trainer.runtime import imported_in_background, seed_everything

    # Rank 0's Hydra folder is the run folder of every rank.
    output_dir = Path(broadcast_object(str(cfg.paths.output_dir), ctx))
    if ctx.is_main:
        log_run_folder(output_dir)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    # Before the data: a missing, damaged or unsafe checkpoint fails in a second.
    files = CheckpointFiles(
        output_dir / cfg.checkpoint.dirname, cfg.checkpoint.save_last, cfg.checkpoint.keep_last_k
    )
    resume_from = resume_state(cfg, files, device)
    model = instantiate(cfg.model, _convert_="all").to(device)
    # Fine-tuning changes the model (weights, adapters, frozen params) before anything sees it.
    prepared = prepare_model(model, cfg.finetune, resuming=resume_from is not None)
    loss_fn = instantiate(cfg.loss, _convert_="all") if cfg.get("loss") else None
    task = instantiate(cfg.task, loss=loss_fn, _convert_="all")
    if is_image_data(cfg.data):
        # Shapes are known before the data loads: a mismatch fails in a second.
        check_model_fits_data(model, task.loss, cfg.data, device)
    check_context_fits(model, cfg.data)
    if resume_from is not None:
        # A checkpoint of another model fails here, naming the keys, before data loads.
        state, source = resume_from
        check_sizes_fit(state, model, source)
        own = unwrapped_state_dict(model.state_dict())
        check_state_fits(own, unwrapped_state_dict(state["model"]), source)

    data = instantiate(cfg.data, _convert_="all")
    # Every torch optimizer imports torch._dynamo (about a second) on first use. That
    # import runs on a helper thread while this one reads and decodes the data.
    with imported_in_background("torch._dynamo"):
        data.setup(device)
    batches = split_batches(data, cfg.trainer, cfg.seed, ctx)
    train_batches = len(batches.train)
    if train_batches == 0:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the training set; lower it"
        )
    steps_per_epoch = math.ceil(train_batches / cfg.trainer.accumulate_grad_batches)
    max_steps = cfg.trainer.max_steps or math.inf
    if cfg.trainer.max_epochs:
        max_steps = min(max_steps, cfg.trainer.max_epochs * steps_per_epoch)
    tokenizer = getattr(data, "tokenizer", None)
    if resume_from is not None:
        check_vocabulary_fits(resume_from[0].get("tokenizer"), tokenizer, resume_from[1])
    elif cfg.finetune.init_from and not cfg.finetune.skip_mismatched:
        source = f"finetune.init_from={cfg.finetune.init_from}"
        check_vocabulary_fits(prepared.saved_tokenizer, tokenizer, source)
    task.setup(model, device, tokenizer)  # a preference task takes its reference model here
    # One real batch through the task: data the task cannot use, or a model that does
    # not fit it, fails now in one line rather than at step 1.
    check_task_fits(task, model, batches.train, device)
    strategy = make_strategy(cfg.trainer.strategy, ctx)
    strategy.attach(model)  # before the optimizer: FSDP swaps in sharded params
    if ctx.enabled:
        # Every rank built the same weights (FSDP shards them as they are); from here
        # on each rank draws its own dropout masks.
        seed_everything(cfg.seed + ctx.rank, cfg.trainer.deterministic)
    weight_decay, base_lr = cfg.optimizer.get("weight_decay", 0.0), cfg.optimizer.get("lr")
    group_rules = OmegaConf.to_container(cfg.finetune.param_groups, resolve=True)
    try:
        optimizer = build_optimizer(
            instantiate(cfg.optimizer, _convert_="all"), model, weight_decay, group_rules, base_lr
        )
    except ValueError as e:  # torch.optim's range checks: betas, eps, momentum, ...
        raise ConfigError(f"optimizer ({cfg.optimizer._target_}): {e}") from None
    scheduler = None
    if cfg.scheduler and cfg.scheduler.get("_target_"):
        make_scheduler = instantiate(cfg.scheduler, _convert_="all")
        try:
            scheduler = make_scheduler(
                optimizer, total_steps=int(max_steps), steps_per_epoch=steps_per_epoch
            )
        except ValueError as e:
            raise ConfigError(f"scheduler ({cfg.scheduler._target_}): {e}") from None
    # Counted before any gradual unfreezing: what the first epochs train.
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    unfreezer = make_unfreezer(
        model, prepared, cfg.finetune, optimizer, scheduler, weight_decay, base_lr
    )
    run_provenance = provenance(cfg, device, ctx.world_size)
    logger = None
    if cfg.logger.get("_target_") and ctx.is_main:
        logger = instantiate(cfg.logger, log_dir=str(output_dir), _convert_="all")
        if resume_from is None:
            logger.log_text("config", OmegaConf.to_yaml(cfg, resolve=True))
            logger.log_text("provenance", json.dumps(run_provenance, indent=2))

    extra_state: dict[str, Any] = {"config": OmegaConf.to_container(cfg, resolve=True)}
    if tokenizer is not None:
        extra_state["tokenizer"] = tokenizer.state_dict()
    trainer = Trainer(
        cfg.trainer,
        model,
        task,
        optimizer,
        scheduler,
        batches,
        device,
        max_steps=int(max_steps),
        strategy=strategy,
        files=CheckpointFiles.from_config(output_dir / cfg.checkpoint.dirname, cfg.checkpoint),
        checkpoint_cfg=cfg.checkpoint,
        logger=logger,
        preemption=preemption,
        unfreezer=unfreezer,
        callbacks=[c for c in (pruning_callback(job.pruning, job.num, job.overrides, ctx),) if c],
        extra_state=extra_state,
    )
    if resume_from is not None:
        state, source = resume_from
        trainer.load_state_dict(state, source)
        if cfg.ckpt_path and source == str(cfg.ckpt_path):
            # An explicit ckpt_path asks to train on from that state under this config's
            # limits, even if its run had stopped; resume=auto continues its own run as is.
            trainer.stop_reason = None
        log.info("resumed from %s at epoch %d step %d", source, trainer.epoch, trainer.global_step)
        if logger is not None:
            # Everything up to the checkpoint's step was logged (and flushed) before it
            # was written; TensorBoard hides the crashed run's points after it.
            logger.purge_step = state.get("logger", {}).get("global_step", trainer.global_step) + 1
    # A mixture of experts runs only some of its parameters per token: say how many.
    active = model.num_params(active=True) if hasattr(model, "num_params") else None
    log.info(
        "training %s on %s: %d parameters (%d trainable%s), %d steps/epoch, up to %s steps",
        type(model).__name__,
        device,
        sum(p.numel() for p in model.parameters()),
        trainable_params,
        f", {active} active per token" if active is not None else "",
        steps_per_epoch,
        int(max_steps),
    )
    # fit returns with its checkpoints on disk (async writes are waited for): files read
    # from here on, best.pt in test() first, are whole.
    fit = trainer.fit()
    test = trainer.test() if cfg.trainer.test_after_fit else {}
    results = {
        "status": "pruned" if fit["stop_reason"] == "pruned" else "completed",
        "metrics": {**trainer.best.metrics, **test},
        "last_val": trainer.last_val,
        "best_epoch": trainer.best.epoch,
        "best_step": trainer.best.step,
        "monitor": cfg.trainer.monitor,
        "epochs": trainer.epoch,
        "steps": trainer.global_step,
        "trainable_params": trainable_params,
        "stop_reason": fit["stop_reason"],
        "nan_skipped_steps": trainer.nan_guard.skipped,
        "resumed_from": resume_from[1] if resume_from else None,
        "fit_time_s": round(fit["fit_time_s"], 3),
        "wall_time_s": round(time.time() - started, 3),
        "overrides": list(job.overrides),
        "world_size": ctx.world_size,
        "job_num": job.num,
        "job_id": job.id,
        "provenance": run_provenance,
    }
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        # results.json marks a finished job for resume=auto: it appears whole or not at all.
        tmp = output_dir / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, output_dir / "results.json")
    if logger is not None:
        logger.log_hparams(hparams(cfg, list(job.overrides)), dict(results["metrics"]))
        logger.close()
    log.info("results: %s", json.dumps(results["metrics"]))
    if ctx.is_main:
        tensorboard_dir = getattr(logger, "log_dir", None)
        log_run_files(output_dir, output_dir / cfg.checkpoint.dirname, tensorboard_dir)
    return optimized_value(cfg, results["metrics"])


def split_batches(data: Any, trainer_cfg: DictConfig, seed: int, ctx: Any) -> Any:
    """This rank's batches of every split the data has."""
    from trainer.data.batches import SplitBatches

    shard = {"rank": ctx.rank, "world_size": ctx.world_size}
    train = data.batches("train", seed=seed, limit_batches=trainer_cfg.limit_train_batches, **shard)
    val = (
        data.batches("val", limit_batches=trainer_cfg.limit_val_batches, **shard)
        if data.val_size
        else None
    )
    test = (
        data.batches("test", limit_batches=trainer_cfg.limit_test_batches, **shard)
        if getattr(data, "has_test", True)
        else None
    )
    return SplitBatches(train, val, test, data.batch_size * ctx.world_size, seed)


def _spawn_workers(cfg: DictConfig, device, started: float, job: HydraJob) -> float | None:
    """Run this job as `trainer.devices` spawned ranks; rank 0 writes the results."""
    import torch

    from trainer.distributed.launch import spawn

    devices = cfg.trainer.devices
    if device.type == "cuda" and devices > torch.cuda.device_count():
        raise ConfigError(
            f"trainer.devices={devices} but only {torch.cuda.device_count()} GPU(s) are visible; "
            "lower trainer.devices"
        )
    if device.type == "mps":
        raise ConfigError("trainer.devices > 1 is not supported on mps; use trainer.devices=1")
    container = OmegaConf.to_container(cfg, resolve=True)
    output_dir = Path(container["paths"]["output_dir"])
    results_file = output_dir / "results.json"
    results_file.unlink(missing_ok=True)
    log.info("spawning %d workers (%s)", devices, "nccl" if device.type == "cuda" else "gloo")
    preempted = spawn(_worker, devices, args=(container, started, _job_log_file(), job))
    if preempted is not None:  # the workers saved; the launcher exits for requeue
        raise Preempted(preempted)
    return optimized_value(cfg, json.loads(results_file.read_text())["metrics"])


def _worker(container: dict, started: float, log_file: str | None, job: HydraJob) -> None:
    import os

    from trainer.distributed.launch import configure_worker_logging

    configure_worker_logging(log_file, is_main=os.environ.get("RANK") == "0")
    train(OmegaConf.create(container), started, job)


def _job_log_file() -> str | None:
    """The file Hydra's job logging writes to, for spawned rank 0 to append to."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


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


def job_id() -> str | None:
    """This job's identity: its sorted overrides (None outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().job.override_dirname) if HydraConfig.initialized() else None


def hparams(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """The overrides, flattened, plus the few settings every run should show."""
    values: dict[str, Any] = {
        "model": _short_target(cfg.model),
        "data": cfg.data.get("name")
        or cfg.data.get("corpus")
        or _short_target(cfg.data.get("dataset") or cfg.data),
        "task": _short_target(cfg.task),
        "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1],
        "optimizer.lr": cfg.optimizer.lr,
        "data.batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
    }
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in RUN_CONTROL_KEYS:
            continue  # how the run was started or resumed, not what it computes
        if not key.startswith("hydra.") and not key.startswith("paths."):
            values[key] = _parse_scalar(value)
    return values


def _short_target(section: Any) -> str:
    return str(section.get("_target_") or "?").rsplit(".", 1)[-1]


def _parse_scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
