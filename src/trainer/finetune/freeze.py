"""Freezing by name pattern and gradual unfreezing.

Frozen params get requires_grad=False, so they get no gradient and the
optimizer never sees them: they stay bit-identical. A norm layer whose params
are all frozen also stops updating its running statistics (it runs in eval
mode), otherwise the "frozen" backbone would still drift to the new data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from trainer.optim import param_groups
from trainer.patterns import check_all_match, matches_any

log = logging.getLogger(__name__)


def freeze(
    model: nn.Module, patterns: Sequence[str], keep: Sequence[nn.Parameter] = ()
) -> list[nn.Parameter]:
    """Freeze params whose names match; returns those it froze (not `keep`, not already frozen)."""
    names = [name for name, _ in model.named_parameters()]
    check_all_match(patterns, names, "parameter", "finetune.freeze")
    keep_ids = {id(p) for p in keep}
    frozen = []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in keep_ids and matches_any(name, patterns):
            param.requires_grad_(False)
            frozen.append(param)
    return frozen


def _keep_eval_mode(module: nn.Module, args: Any) -> None:
    # model.train() runs every epoch; this re-applies eval mode right before each call.
    module.training = False


def freeze_norm_stats(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Batch/instance norm layers with only frozen params keep their running stats."""
    handles = []
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, _NormBase) and params and not any(p.requires_grad for p in params):
            handles.append(module.register_forward_pre_hook(_keep_eval_mode))
    return handles


class Unfreezer:
    """From `at_epoch` on, the frozen params train, in new optimizer param groups.

    The Trainer calls it at every epoch boundary and before loading a
    checkpoint's optimizer state, so a resumed run has the same groups as the
    run that saved it. New groups follow the same rules as the first ones
    (lr multiplier, weight decay) and join the schedule at its current point.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter],
        at_epoch: int,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        weight_decay: float,
        rules: Sequence[Mapping[str, Any]] = (),
        base_lr: float | None = None,
        norm_hooks: Sequence[torch.utils.hooks.RemovableHandle] = (),
    ) -> None:
        self.model, self.params, self.at_epoch = model, list(params), at_epoch
        self.optimizer, self.scheduler = optimizer, scheduler
        self.weight_decay, self.rules, self.base_lr = weight_decay, rules, base_lr
        self.norm_hooks = list(norm_hooks)
        self.done = False

    def __call__(self, epoch: int) -> bool:
        """Unfreeze if `epoch` has been reached and not done yet; True if it did."""
        if self.done or epoch < self.at_epoch:
            return False
        self.done = True
        for param in self.params:
            param.requires_grad_(True)
        for handle in self.norm_hooks:
            handle.remove()
        groups = param_groups(
            self.model, self.weight_decay, self.rules, self.base_lr, only=self.params
        )
        for group in groups:
            group["name"] += "/unfrozen"
            self._add_group(group)
        log.info(
            "epoch %d: unfroze %d parameters (%d values) into %d new optimizer groups",
            epoch,
            len(self.params),
            sum(p.numel() for p in self.params),
            len(groups),
        )
        return True

    def _add_group(self, group: dict) -> None:
        # Schedules here scale every group's lr by the same factor, so a new group's
        # lr is the first group's current lr times the ratio of their multipliers.
        first = self.optimizer.param_groups[0]
        ratio = group["lr_mult"] / first.get("lr_mult", 1.0)
        group["lr"] = first["lr"] * ratio
        for key in ("initial_lr", "max_lr", "min_lr"):  # set by LRScheduler / OneCycleLR
            if key in first:
                group[key] = first[key] * ratio
        self.optimizer.add_param_group(group)
        scheduler = self.scheduler
        if scheduler is None:
            return
        scheduler.base_lrs.append(group["initial_lr"])
        if hasattr(scheduler, "lr_lambdas"):  # LambdaLR: one lambda per group
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr.append(group["lr"])
