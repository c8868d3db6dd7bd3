"""Typed schemas for the config sections that the framework itself reads.

Each schema is stored in Hydra's ConfigStore under `schema/<section>` and pulled
into the section's YAML files through their defaults list, so a misspelled key in
a YAML file or an override fails when the config is composed, not mid-run.
Model, loss, optimizer and scheduler stay free-form: their keys are whatever
their `_target_` accepts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# A file name stays well under the 255-byte limit of common filesystems.
_MAX_DIRNAME = 200

ACCELERATORS = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("32", "bf16", "fp16", "auto")
STRATEGIES = ("ddp", "fsdp")
NAN_POLICIES = ("error", "skip")


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None  # None disables early stopping
    min_delta: float = 0.0


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | cuda | mps
    # Processes on this node: > 1 spawns them unless launched by torchrun.
    devices: int = 1
    # A collective waiting longer than this (a dead peer) fails instead of hanging.
    dist_timeout_s: float = 300.0
    strategy: str = "ddp"  # ddp | fsdp, when there is more than one process
    precision: str = "32"  # 32 | bf16 | fp16 (CUDA only) | auto (bf16 where native, else 32)
    max_epochs: int | None = 5
    max_steps: int | None = None
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    limit_test_batches: int | None = None
    val_every_n_epochs: int = 1
    val_every_n_steps: int | None = None
    # Validate the starting weights before the first step (a fresh run only): the "before"
    # figure of a fine-tuning run, logged at step 0; it never counts as the best.
    val_at_start: bool = False
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    compile: bool = False
    deterministic: bool = False
    log_every_n_steps: int = 50
    progress_bar: bool = True
    monitor: str = "${task.monitor}"
    monitor_mode: str = "${task.monitor_mode}"  # max | min
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # Stop once the monitored metric reaches this value (>= for max, <= for min).
    stop_at: float | None = None
    test_after_fit: bool = True
    # What a non-finite (NaN/Inf) training loss does: error | skip (see trainer/loop/nan_guard.py).
    nan_policy: str = "error"
    # With nan_policy=skip: stop with an error after this many skipped steps in a row.
    max_consecutive_nan: int = 10


@dataclass
class CheckpointConfig:
    dirname: str = "checkpoints"
    save_last: bool = True
    save_best: bool = True
    every_n_epochs: int = 1
    # Mid-epoch checkpoints, for resuming close to where a run died (null: off).
    every_n_steps: int | None = None
    every_n_minutes: float | None = None
    # How many step_*.pt files to keep, newest first (null: all); last.pt and best.pt stay.
    keep_last_k: int | None = 2
    # Write checkpoints on a background thread while training goes on: the state is
    # copied at the save, then written the same atomic way (a crash during the write
    # leaves the previous checkpoint). false writes on the training thread, blocking it.
    async_write: bool = True


@dataclass
class DataConfig:
    _target_: str = "trainer.data.datamodule.ImageClassificationData"
    name: str = MISSING  # torchvision folder name: MNIST, FashionMNIST
    data_dir: str = "${paths.data_dir}"
    shape: list[int] = field(default_factory=lambda: [1, 28, 28])
    num_classes: int = 10
    val_size: int = 5000
    split_seed: int = 0
    batch_size: int = 256
    eval_batch_size: int = 1000
    mean: float = 0.0
    std: float = 1.0
    in_memory: bool = True
    num_workers: int = 0
    download: bool = True
    mirrors: list[str] = field(default_factory=list)
    download_timeout: float = 10.0
    download_retries: int = 2


@dataclass
class PathsConfig:
    data_dir: str = "${oc.env:TRAINER_DATA_DIR,./data}"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class LoggerConfig:
    _target_: str | None = None
    subdir: str = "tensorboard"


@dataclass
class LoraConfig:
    # Glob patterns over module names; matching Linear and Conv2d layers get adapters.
    targets: list[str] = field(default_factory=list)  # [] turns LoRA off
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only


@dataclass
class ParamGroupConfig:
    params: list[str] = MISSING  # glob patterns over parameter names
    lr_mult: float = 1.0  # times optimizer.lr
    weight_decay: float | None = None  # None: optimizer.weight_decay (biases and norms get none)


@dataclass
class FinetuneConfig:
    # A checkpoint (.pt) of this trainer or a .safetensors file: weights only.
    init_from: str | None = None
    strict: bool = True  # fail on keys missing from the file or left over in it
    # "old:new" renames a dotted key prefix of the file before loading:
    # [backbone:features] maps backbone.0.weight to features.0.weight, [model:] strips model.
    key_map: list[str] = field(default_factory=list)
    # Keys whose shape differs (a new head) keep the model's fresh init instead of failing.
    skip_mismatched: bool = False
    exclude: list[str] = field(default_factory=list)  # keys never loaded from the file
    freeze: list[str] = field(default_factory=list)  # glob patterns over parameter names
    # Frozen params join training from this (0-based) epoch on; None keeps them frozen.
    unfreeze_at_epoch: int | None = None
    # Norm layers whose params are all frozen also keep their running statistics.
    freeze_norm_stats: bool = True
    # First matching entry wins; unmatched params train at optimizer.lr.
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TrainConfig:
    """The root of `train.yaml`; groups are composed into the `Any` slots."""

    model: Any = MISSING
    data: Any = MISSING  # image sets are typed by their own schema (DataConfig)
    task: Any = MISSING
    loss: Any = None
    optimizer: Any = MISSING
    scheduler: Any = None
    trainer: TrainerConfig = MISSING
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    task_name: str = "train"
    seed: int = 42
    ckpt_path: str | None = None
    # auto: continue from the newest valid checkpoint in this run's output dir (see docs/resume.md).
    resume: str | None = None
    # Names the output dir (outputs/<run_id>, multirun/<run_id>) so a rerun finds it again.
    run_id: str | None = None
    optimized_metric: str | None = "${trainer.monitor}"
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    ckpt_path: str = MISSING
    paths: PathsConfig = MISSING
    trainer: TrainerConfig = MISSING
    task_name: str = "eval"
    # Names the output dir like a training run's (configs/hydra/default.yaml reads it).
    run_id: str | None = None
    split: str = "test"  # test | val
    data: Any = None  # None: the data config stored in the checkpoint


def run_name(run_id: str | None, timestamp: str) -> str:
    """The run folder name: the run_id when given, else the launch time."""
    return str(run_id) if run_id not in (None, "") else timestamp


def job_dirname(override_dirname: str) -> str:
    """A sweep job's folder, named by its sorted overrides so reruns find it by identity.

    Slashes in values (paths) would nest folders and long override lists would
    exceed file name limits: both get a readable prefix plus a hash of the whole.
    """
    if not override_dirname:
        return "default"
    name = re.sub(r"[^\w.,=+\-\[\]]", "_", override_dirname)
    if name != override_dirname or len(name) > _MAX_DIRNAME:
        digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_DIRNAME - 11]}-{digest}"
    return name


# The ConfigStore group of the typed schemas: pulled in by the YAML files' defaults
# lists, never chosen on the command line, so `--help` leaves it out (cli.py).
SCHEMA_GROUP = "schema"


def register_configs() -> None:
    OmegaConf.register_new_resolver("trainer.run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("trainer.job_dirname", job_dirname, replace=True)
    from hydra_plugins.trainer_optuna_sweeper.optuna_sweeper import register as register_sweeper
    from trainer.sweep.callback import register_resolvers

    register_resolvers()
    register_sweeper()
    cs = ConfigStore.instance()
    cs.store(group=SCHEMA_GROUP, name="train", node=TrainConfig)
    cs.store(group=SCHEMA_GROUP, name="eval", node=EvalConfig)
    cs.store(group=SCHEMA_GROUP, name="trainer", node=TrainerConfig)
    cs.store(group=SCHEMA_GROUP, name="data", node=DataConfig)
    cs.store(group=SCHEMA_GROUP, name="paths", node=PathsConfig)
    cs.store(group=SCHEMA_GROUP, name="logger", node=LoggerConfig)
    cs.store(group=SCHEMA_GROUP, name="finetune", node=FinetuneConfig)


def plain_config(cfg: Any) -> Any:
    """A DictConfig as its schema's dataclass (or a namespace); anything else as is."""
    if not isinstance(cfg, DictConfig):
        return cfg
    obj = OmegaConf.to_object(cfg)
    return _namespace(obj) if isinstance(obj, dict) else obj


def _namespace(value: Any) -> Any:
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return value
