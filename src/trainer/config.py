"""Typed schemas for the config sections that the framework itself reads.

Each schema is stored in Hydra's ConfigStore under `schema/<section>` and pulled
into the section's YAML files through their defaults list, so a misspelled key in
a YAML file or an override fails when the config is composed, not mid-run.
Model, loss, optimizer and scheduler stay free-form: their keys are whatever
their `_target_` accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None  # None disables early stopping
    min_delta: float = 0.0


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | cuda | mps
    devices: int = 1
    precision: str = "32"  # 32 | bf16 | fp16 (fp16 needs CUDA)
    max_epochs: int | None = 10
    max_steps: int | None = None
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    val_every_n_epochs: int = 1
    val_every_n_steps: int | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    compile: bool = False
    deterministic: bool = False
    log_every_n_steps: int = 50
    progress_bar: bool = True
    monitor: str = "val/acc"
    monitor_mode: str = "max"  # max | min
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # Stop once the monitored metric reaches this value (>= for max, <= for min).
    stop_at: float | None = None
    test_after_fit: bool = True


@dataclass
class CheckpointConfig:
    dirname: str = "checkpoints"
    save_last: bool = True
    save_best: bool = True
    every_n_epochs: int = 1


@dataclass
class DataConfig:
    _target_: str = "trainer.data.datamodule.ImageClassificationData"
    name: str = MISSING  # torchvision folder name: MNIST, FashionMNIST
    data_dir: str = "${paths.data_dir}"
    shape: list[int] = field(default_factory=lambda: [1, 28, 28])
    num_classes: int = 10
    val_size: int = 5000
    split_seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 1024
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
class TrainConfig:
    """The root of `train.yaml`; groups are composed into the `Any` slots."""

    model: Any = MISSING
    data: DataConfig = MISSING
    loss: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    trainer: TrainerConfig = MISSING
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    task_name: str = "train"
    seed: int = 42
    ckpt_path: str | None = None
    optimized_metric: str | None = "val/acc"
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    ckpt_path: str = MISSING
    paths: PathsConfig = MISSING
    trainer: TrainerConfig = MISSING
    task_name: str = "eval"
    split: str = "test"  # test | val
    data: Any = None  # None: the data config stored in the checkpoint


def register_configs() -> None:
    from hydra_plugins.trainer_optuna_sweeper.optuna_sweeper import register as register_sweeper
    from trainer.sweep import register_resolvers

    register_resolvers()
    register_sweeper()
    cs = ConfigStore.instance()
    cs.store(group="schema", name="train", node=TrainConfig)
    cs.store(group="schema", name="eval", node=EvalConfig)
    cs.store(group="schema", name="trainer", node=TrainerConfig)
    cs.store(group="schema", name="data", node=DataConfig)
    cs.store(group="schema", name="paths", node=PathsConfig)
    cs.store(group="schema", name="logger", node=LoggerConfig)
