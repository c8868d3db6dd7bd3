"""Config checks that run before any data is read or any step is taken.

`validate_train_config` and `validate_eval_config` raise a ConfigError (or a
CheckpointError) naming the key, its value and the fix; `check_model_fits_data`
runs one dry forward pass so a model/data mismatch fails at setup, naming both
shapes, instead of as a matmul error at step 1. The plain value checks come
first and need no torch import, so most mistakes are reported in under a second.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import tempfile
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from trainer.config.schema import (
    ACCELERATORS,
    NAN_POLICIES,
    PRECISIONS,
    STRATEGIES,
    CheckpointConfig,
    EvalConfig,
    PathsConfig,
    TrainConfig,
    TrainerConfig,
)
from trainer.error_messages import did_you_mean, dotted_keys
from trainer.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

# Spellings other frameworks use for the precisions this trainer has.
PRECISION_ALIASES = {
    "16": "fp16", "16-mixed": "fp16", "fp16-mixed": "fp16", "half": "fp16",
    "bf16-mixed": "bf16", "bfloat16": "bf16", "32-true": "32", "fp32": "32", "float32": "32",
}  # fmt: skip
# Keys a section's target gets from the code, not from the config.
SUPPLIED_ARGS = {"logger": {"log_dir"}, "task": {"loss"}}
IMAGE_DATA_TARGET = "trainer.data.datamodule.ImageClassificationData"


def validate_train_config(cfg: DictConfig) -> torch.device:
    """Check every value `train()` reads; returns the device to train on."""
    check_top_level_keys(cfg, TrainConfig)
    for section, schema in (
        ("trainer", TrainerConfig),
        ("checkpoint", CheckpointConfig),
        ("paths", PathsConfig),
    ):
        check_known_keys(cfg[section], schema, section)
    check_trainer_config(cfg.trainer)
    if is_image_data(cfg.data):
        check_data_config(cfg.data)
    check_optimizer_config(cfg.optimizer)
    check_checkpoint_config(cfg.checkpoint)
    check_writable_dir(cfg.paths.output_dir, "paths.output_dir")
    if cfg.ckpt_path:
        check_checkpoint_path(cfg.ckpt_path)
    # From here on targets are imported, and with them torch.
    for section in ("model", "data", "task", "loss", "optimizer", "scheduler", "logger"):
        check_target_arguments(cfg.get(section), section)
    check_metrics(cfg)
    if is_image_data(cfg.data):
        check_dataset_name(cfg.data)
    return check_device(cfg.trainer)


def validate_eval_config(cfg: DictConfig) -> torch.device:
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ConfigError("ckpt_path is required: python eval.py ckpt_path=<path to a .pt file>")
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split={cfg.split!r} must be test or val")
    check_top_level_keys(cfg, EvalConfig)
    check_known_keys(cfg.trainer, TrainerConfig, "trainer")
    check_writable_dir(cfg.paths.output_dir, "paths.output_dir")
    check_checkpoint_path(cfg.ckpt_path)
    return check_device(cfg.trainer)


def check_top_level_keys(cfg: DictConfig, schema: type) -> None:
    """A top-level key added with `+key=...` (`+max_epoch=3`) is read by nothing: refuse it
    with the hint a misspelled key gets. Hydra's own section is not part of `cfg`, so
    `+hydra.launcher.additional_parameters...` stays open, as do the free-form sections
    (model, loss, optimizer, ...), whose keys check_target_arguments checks."""
    fields = {f.name for f in dataclasses.fields(schema)}
    unknown = [str(k) for k in cfg if str(k) not in fields]
    if unknown:
        container = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
        hint = did_you_mean(unknown[0], dotted_keys(container))
        if not hint:
            hint = f"; the top level has: {', '.join(sorted(fields))}"
        raise ConfigError(f"unknown config key {unknown[0]}{hint}")


def check_known_keys(section_cfg: Any, schema: type, name: str) -> None:
    """Keys added with `+key=...` pass composition; the code would silently ignore them."""
    _check_keys(OmegaConf.to_container(section_cfg, resolve=False), schema, name)


def _check_keys(values: dict[str, Any], schema: type, name: str) -> None:
    fields = [f.name for f in dataclasses.fields(schema)]
    types = typing.get_type_hints(schema)
    for key, value in values.items():
        if key not in fields:
            known = [f"{name}.{k}" for k in fields]
            hint = did_you_mean(f"{name}.{key}", known) or f"; {name} has: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {name}.{key}{hint}")
        if isinstance(value, dict) and dataclasses.is_dataclass(types[key]):
            _check_keys(value, types[key], f"{name}.{key}")


def check_target_arguments(section_cfg: Any, name: str) -> None:
    """The section's `_target_` imports, and its keys are arguments the target takes."""
    from hydra.utils import get_object

    if not isinstance(section_cfg, DictConfig) or not section_cfg.get("_target_"):
        return
    target_name = section_cfg._target_
    try:
        target = get_object(target_name)
    except Exception as e:  # ImportError, AttributeError, ValueError: all mean "not there"
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{name}._target_={target_name} cannot be imported: {reason}") from None
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    keys = [str(k) for k in section_cfg if not str(k).startswith("_")]
    accepted = [
        p
        for p, spec in params.items()
        if spec.kind not in (spec.VAR_POSITIONAL, spec.POSITIONAL_ONLY)
    ]
    for key in keys:
        if key not in accepted:
            choices = [f"{name}.{p}" for p in accepted]
            raise ConfigError(
                f"{name}.{key} is not an argument of {target_name}"
                f"{did_you_mean(f'{name}.{key}', choices)}; it takes: {', '.join(accepted)}"
            )
    for key in keys:  # nested objects: a user's dataset inside data, a collate_fn, ...
        check_target_arguments(section_cfg.get(key), f"{name}.{key}")
    if section_cfg.get("_partial_"):
        return  # the code passes the rest (params, optimizer, ...) later
    supplied = set(keys) | SUPPLIED_ARGS.get(name, set())
    for param, spec in params.items():
        required = spec.default is inspect.Parameter.empty and spec.kind in (
            spec.POSITIONAL_OR_KEYWORD,
            spec.KEYWORD_ONLY,
        )
        if required and param not in supplied:
            raise ConfigError(
                f"{name}.{param} is required by {target_name}; add {name}.{param}=..."
            )


def check_trainer_config(trainer_cfg: Any) -> None:
    if not (trainer_cfg.max_epochs or trainer_cfg.max_steps):
        raise ConfigError("set trainer.max_epochs or trainer.max_steps (at least one, >= 1)")
    at_least_one = ("accumulate_grad_batches", "log_every_n_steps", "val_every_n_epochs", "devices")
    _check_min(trainer_cfg, "trainer", at_least_one, minimum=1, optional=False)
    optional = (
        "max_epochs", "max_steps", "limit_train_batches", "limit_val_batches", "limit_test_batches"
    )  # fmt: skip
    _check_min(trainer_cfg, "trainer", (*optional, "val_every_n_steps"), minimum=1, optional=True)
    clip = trainer_cfg.gradient_clip_val
    if clip is not None and not clip > 0:
        raise ConfigError(
            f"trainer.gradient_clip_val={clip} must be > 0 (or null to turn clipping off)"
        )
    if trainer_cfg.monitor_mode not in ("max", "min"):
        raise ConfigError(f"trainer.monitor_mode={trainer_cfg.monitor_mode!r} must be max or min")
    stopping = trainer_cfg.early_stopping
    _check_min(stopping, "trainer.early_stopping", ("patience",), minimum=1, optional=True)
    if stopping.min_delta < 0:
        raise ConfigError(f"trainer.early_stopping.min_delta={stopping.min_delta} must be >= 0")
    check_accelerator_name(trainer_cfg)
    for key, choices in (("strategy", STRATEGIES), ("nan_policy", NAN_POLICIES)):
        if trainer_cfg[key] not in choices:
            raise ConfigError(
                f"trainer.{key}={trainer_cfg[key]!r} must be one of {', '.join(choices)}"
                f"{did_you_mean(str(trainer_cfg[key]), choices)}"
            )
    if trainer_cfg.max_consecutive_nan < 1:
        raise ConfigError(
            f"trainer.max_consecutive_nan={trainer_cfg.max_consecutive_nan} must be >= 1"
        )
    precision = str(trainer_cfg.precision)
    if precision not in PRECISIONS:
        alias = PRECISION_ALIASES.get(precision.lower())
        hint = f"; did you mean trainer.precision={alias}?" if alias else ""
        raise ConfigError(
            f"trainer.precision={precision!r} must be one of {', '.join(PRECISIONS)}{hint}"
        )


def check_checkpoint_config(ckpt_cfg: Any) -> None:
    _check_min(
        ckpt_cfg, "checkpoint", ("every_n_epochs", "every_n_steps"), minimum=1, optional=True
    )
    if ckpt_cfg.every_n_minutes is not None and ckpt_cfg.every_n_minutes <= 0:
        raise ConfigError(f"checkpoint.every_n_minutes={ckpt_cfg.every_n_minutes} must be > 0")
    if ckpt_cfg.keep_last_k is not None and ckpt_cfg.keep_last_k < 0:
        raise ConfigError(
            f"checkpoint.keep_last_k={ckpt_cfg.keep_last_k} must be >= 0 (or null: keep all)"
        )


def check_dataset_name(data_cfg: Any) -> None:
    from trainer.data.datamodule import SPECS

    name = data_cfg.get("name")
    if name is not None and name not in SPECS:
        raise ConfigError(
            f"data.name={name!r} is unknown; choose one of {', '.join(sorted(SPECS))}"
            f"{did_you_mean(name, SPECS)}"
        )


def check_data_config(data_cfg: Any) -> None:
    _check_min(data_cfg, "data", ("batch_size", "eval_batch_size"), minimum=1, optional=False)
    _check_min(data_cfg, "data", ("val_size", "num_workers", "download_retries"), 0, False)
    shape = list(data_cfg.shape)
    if len(shape) != 3 or any(d < 1 for d in shape):
        raise ConfigError(f"data.shape={shape} must be [channels, height, width], each >= 1")
    if data_cfg.num_classes < 2:
        raise ConfigError(f"data.num_classes={data_cfg.num_classes} must be >= 2")
    if not data_cfg.std > 0:
        raise ConfigError(f"data.std={data_cfg.std} must be > 0")
    if not data_cfg.download_timeout > 0:
        raise ConfigError(f"data.download_timeout={data_cfg.download_timeout} must be > 0")


def task_metrics(task_cfg: Any, split: str) -> list[str]:
    """The metrics the task reports for `split`, read from its class (nothing is built)."""
    from hydra.utils import get_object

    names = getattr(get_object(task_cfg._target_), "metric_names", ("loss",))
    return [f"{split}/{name}" for name in names]


def check_metrics(cfg: DictConfig) -> None:
    """The monitored and the optimized metric are ones this run will produce."""
    has_val = bool(cfg.data.get("val_size", 1))
    val_metrics, test_metrics = task_metrics(cfg.task, "val"), task_metrics(cfg.task, "test")
    monitor = cfg.trainer.monitor
    if monitor not in val_metrics:
        raise ConfigError(
            f"trainer.monitor={monitor!r} is not a validation metric of the task; choose one of "
            f"{', '.join(val_metrics)}{did_you_mean(str(monitor), val_metrics, cutoff=0.6)}"
        )
    stopping = cfg.trainer.early_stopping.patience is not None or cfg.trainer.stop_at is not None
    if stopping and not has_val:
        raise ConfigError(
            "trainer.early_stopping.patience and trainer.stop_at need validation, but "
            "data.val_size=0; set data.val_size > 0"
        )
    name = cfg.get("optimized_metric")
    if not name:
        return
    produced = [
        *(val_metrics if has_val else ()),
        *(test_metrics if cfg.trainer.test_after_fit else ()),
    ]
    if name not in produced:
        why = ""
        if name in val_metrics:
            why = " (data.val_size=0: no validation)"
        elif name in test_metrics:
            why = " (trainer.test_after_fit=false: no test)"
        raise ConfigError(
            f"optimized_metric={name!r} is not a result of this run{why}; choose one of "
            f"{', '.join(produced) or 'none'} or set optimized_metric=null"
            f"{did_you_mean(str(name), produced, cutoff=0.6)}"
        )


def check_optimizer_config(optimizer_cfg: Any) -> None:
    lr = optimizer_cfg.get("lr")
    if lr is not None and not (isinstance(lr, int | float) and lr > 0):
        raise ConfigError(f"optimizer.lr={lr} must be > 0")
    decay = optimizer_cfg.get("weight_decay")
    if decay is not None and decay < 0:
        raise ConfigError(f"optimizer.weight_decay={decay} must be >= 0")


def check_accelerator_name(trainer_cfg: Any) -> None:
    accelerator = trainer_cfg.accelerator
    if accelerator not in ACCELERATORS:
        raise ConfigError(
            f"trainer.accelerator={accelerator!r} is not one of {', '.join(ACCELERATORS)}"
            f"{did_you_mean(str(accelerator), ACCELERATORS)}"
        )
    if trainer_cfg.devices < 1:
        raise ConfigError(f"trainer.devices={trainer_cfg.devices} must be >= 1")


def check_device(trainer_cfg: Any) -> torch.device:
    """The accelerator exists and has `trainer.devices` devices; fp16 only on CUDA."""
    import torch

    from trainer.runtime import check_precision, select_device

    check_accelerator_name(trainer_cfg)
    device = select_device(trainer_cfg.accelerator)
    devices = trainer_cfg.devices
    # CPU processes are limited only by memory: gloo runs N of them on any machine.
    available = {"cuda": torch.cuda.device_count(), "mps": 1}.get(device.type)
    if available is not None and devices > available:
        raise ConfigError(
            f"trainer.devices={devices} but only {available} {device.type} device"
            f"{'s are' if available != 1 else ' is'} visible; set trainer.devices<={available}"
        )
    check_precision(str(trainer_cfg.precision), device)
    return device


def check_writable_dir(path: str | os.PathLike[str], key: str) -> None:
    """Create `path` and a file in it, so a run fails now rather than at its first save."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"{key}={path} is not a writable folder ({e.strerror or e}); point it, or "
            "hydra.run.dir, at a folder you can write to"
        ) from None


def check_checkpoint_path(ckpt_path: str) -> None:
    path = Path(ckpt_path)
    if not path.exists():
        raise CheckpointError(f"ckpt_path={ckpt_path} does not exist; check the path")
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path} is not a file; give a .pt checkpoint file")


def check_model_fits_data(
    model: torch.nn.Module, loss_fn: torch.nn.Module, data_cfg: Any, device: torch.device
) -> None:
    """One dry forward pass (and loss) on zeros of the data's shape, weights untouched."""
    import torch

    shape = list(data_cfg.shape)
    model_shape = getattr(model, "in_shape", None)
    model_says = f" (model.in_shape={list(model_shape)})" if model_shape is not None else ""
    was_training = model.training
    model.eval()  # no batch-norm statistics or dropout RNG are touched
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, *shape, device=device))
            if logits.ndim != 2 or logits.shape[1] != data_cfg.num_classes:
                raise ConfigError(
                    f"the model outputs shape {list(logits.shape[1:])} per sample but "
                    f"data.num_classes={data_cfg.num_classes}; the model's num_classes must match"
                )
            loss_fn(logits, torch.zeros(1, dtype=torch.long, device=device))
    except (RuntimeError, ValueError, IndexError) as e:
        raise ConfigError(
            f"the model does not fit the data: one sample of data.shape={shape} fails in "
            f"{type(model).__name__}{model_says}: {_first_line(e)}"
        ) from None
    finally:
        model.train(was_training)


def check_context_fits(model: torch.nn.Module, data_cfg: Any) -> None:
    """Examples cut at data.dataset.max_length fit the model's context: past it, learned
    positions fail with an index error and rotary ones run on positions never trained."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    dataset = data_cfg.get("dataset")
    max_length = dataset.get("max_length") if isinstance(dataset, Mapping) else None
    if isinstance(context, int) and isinstance(max_length, int) and max_length > context:
        raise ConfigError(
            f"data.dataset.max_length={max_length} is longer than the model's context of "
            f"{context} tokens, so a long prompt would not fit; set data.dataset.max_length="
            f"{context} or less"
        )


def is_image_data(data_cfg: Any) -> bool:
    """The built-in image sets, whose shapes are known before any file is read."""
    return data_cfg.get("_target_") == IMAGE_DATA_TARGET


def check_task_fits(task: Any, model: torch.nn.Module, batches: Any, device: torch.device) -> None:
    """The first training batch is one the task can use, and the model runs on it.

    Weights, batch-norm statistics and the RNG are untouched: eval mode, no grad."""
    import torch

    try:
        batch = next(iter(batches.epoch(0)))
    except StopIteration:
        return
    task.check_batch(batch)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            task.eval_sums(model, batch)
    except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as e:
        raise ConfigError(
            f"{type(model).__name__} does not fit {type(task).__name__}: one batch of the data "
            f"fails in the dry forward: {_first_line(e)}"
        ) from None
    finally:
        model.train(was_training)


def _check_min(
    section_cfg: Any, name: str, keys: Iterable[str], minimum: int, optional: bool
) -> None:
    for key in keys:
        value = section_cfg[key]
        if value is None and optional:
            continue
        if value is None or value < minimum:
            tail = " (or null)" if optional else ""
            raise ConfigError(f"{name}.{key}={value} must be >= {minimum}{tail}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
