"""Builds the optimizer of the `optimizer` config group with decay/no-decay groups."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and conv kernels only.

    Decaying biases and norm scales only pulls them towards zero, which hurts;
    1-d parameters are exactly those.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    make_optimizer: Callable[..., torch.optim.Optimizer], model: nn.Module, weight_decay: float
) -> torch.optim.Optimizer:
    """`make_optimizer` is the instantiated partial from the optimizer config."""
    return make_optimizer(param_groups(model, weight_decay))
