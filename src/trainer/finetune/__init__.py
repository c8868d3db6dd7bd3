"""The `finetune` config group: start from pre-trained weights, freeze, LoRA.

`prepare_model` runs after the model is built and before the optimizer:
init_from (weights only), then LoRA adapters, then freezing. Adapters are never
frozen by `finetune.freeze`: they are what trains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from trainer.errors import ConfigError
from trainer.finetune.freeze import Unfreezer, freeze, freeze_norm_stats
from trainer.finetune.lora import apply_lora, lora_parameters
from trainer.finetune.pretrained import load_pretrained

log = logging.getLogger(__name__)


@dataclass
class PreparedModel:
    frozen: list[nn.Parameter] = field(default_factory=list)  # by finetune.freeze
    lora_layers: list[str] = field(default_factory=list)
    norm_hooks: list[Any] = field(default_factory=list)
    # The tokenizer state of the init_from checkpoint: its ids are what the weights learned.
    saved_tokenizer: dict | None = None


def prepare_model(model: nn.Module, cfg: Any, resuming: bool = False) -> PreparedModel:
    """Apply `cfg` (the finetune section) to a freshly built model, in place."""
    check_finetune_config(cfg)
    prepared = PreparedModel()
    if cfg.init_from and resuming:
        log.info("finetune.init_from skipped: the weights come from ckpt_path")
    elif cfg.init_from:
        prepared.saved_tokenizer = load_pretrained(
            model,
            cfg.init_from,
            strict=cfg.strict,
            key_map=list(cfg.key_map),
            skip_mismatched=cfg.skip_mismatched,
            exclude=list(cfg.exclude),
        ).tokenizer
    if cfg.lora.targets:
        lora = cfg.lora
        prepared.lora_layers = apply_lora(
            model, list(lora.targets), lora.rank, lora.alpha, lora.dropout
        )
    if cfg.freeze:
        prepared.frozen = freeze(model, list(cfg.freeze), keep=lora_parameters(model))
    if cfg.freeze_norm_stats and (cfg.freeze or cfg.lora.targets):
        prepared.norm_hooks = freeze_norm_stats(model)
    if cfg.lora.targets or cfg.freeze:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info(
            "finetune: %d of %d parameters train (%.1f%%)%s",
            trainable,
            total,
            100.0 * trainable / max(total, 1),
            f"; LoRA rank {cfg.lora.rank} on {', '.join(prepared.lora_layers)}"
            if prepared.lora_layers
            else "",
        )
    return prepared


def make_unfreezer(
    model: nn.Module,
    prepared: PreparedModel,
    cfg: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    weight_decay: float,
    base_lr: float | None,
) -> Unfreezer | None:
    if cfg.unfreeze_at_epoch is None:
        return None
    return Unfreezer(
        model,
        prepared.frozen,
        cfg.unfreeze_at_epoch,
        optimizer,
        scheduler,
        weight_decay,
        rules=OmegaConf.to_container(cfg.param_groups, resolve=True),
        base_lr=base_lr,
        norm_hooks=prepared.norm_hooks,
    )


def check_finetune_config(cfg: Any) -> None:
    if cfg.unfreeze_at_epoch is not None:
        if not cfg.freeze:
            raise ConfigError(
                "finetune.unfreeze_at_epoch needs params to unfreeze; set finetune.freeze"
            )
        if cfg.unfreeze_at_epoch < 1:
            raise ConfigError(
                f"finetune.unfreeze_at_epoch={cfg.unfreeze_at_epoch} must be >= 1 "
                "(or null); to train everything from the start, drop finetune.freeze"
            )
