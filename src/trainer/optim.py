"""Builds the optimizer of the `optimizer` config group from parameter groups.

Groups come from `finetune.param_groups` rules (a learning-rate multiplier and
weight decay per name pattern; the first matching rule wins, unmatched params
use the optimizer's own settings), each split into decay and no-decay params.
Frozen params (requires_grad=False) are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.patterns import check_all_match, matches_any


def param_groups(
    model: nn.Module,
    weight_decay: float,
    rules: Sequence[Mapping[str, Any]] = (),
    base_lr: float | None = None,
    only: Collection[nn.Parameter] | None = None,
) -> list[dict]:
    """Weight decay on weight matrices and conv kernels only (nanoGPT's rule).

    Decaying biases and norm scales only pulls them towards zero, which hurts;
    1-d parameters are exactly those, and the stacked biases of several experts
    are named `*bias`. Embedding tables are lookups, not maps:
    decay would shrink the vectors of rare tokens each step they go unseen, so
    they get none either (a table tied to an output layer is still an
    embedding's parameter). Each group records its `lr_mult`, so
    schedulers and gradual unfreezing keep the ratio between groups. `only`
    restricts the groups to those params (used when unfreezing).
    """
    only_ids = None if only is None else {id(p) for p in only}
    named = [(n, p) for n, p in model.named_parameters() if only_ids is None or id(p) in only_ids]
    for index, rule in enumerate(rules):
        check_rule(rule, index, base_lr)
        if only is None:
            check_all_match(
                rule["params"], [n for n, _ in named], "parameter", "finetune.param_groups"
            )
    settings = [
        (f"group{i}", float(r.get("lr_mult", 1.0)), r.get("weight_decay"))
        for i, r in enumerate(rules)
    ] + [("default", 1.0, None)]
    embeddings = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        rule_index = next(
            (i for i, r in enumerate(rules) if matches_any(name, r["params"])), len(rules)
        )
        decays = param.ndim >= 2 and id(param) not in embeddings and not name.endswith("bias")
        buckets.setdefault((rule_index, decays), []).append(param)
    groups = []
    # Unmatched params first, so param_groups[0] (the logged train/lr) runs at optimizer.lr;
    # per rule, the decay group first (as before rules existed).
    order = sorted(buckets, key=lambda key: (key[0] != len(rules), key[0], not key[1]))
    for rule_index, decays in order:
        params = buckets[(rule_index, decays)]
        label, lr_mult, rule_decay = settings[rule_index]
        decay = weight_decay if rule_decay is None else rule_decay
        group = {
            "params": params,
            "weight_decay": decay if decays else 0.0,
            "lr_mult": lr_mult,
            "name": f"{label}/{'decay' if decays else 'no_decay'}",
        }
        if base_lr is not None:
            group["lr"] = base_lr * lr_mult
        groups.append(group)
    return groups


def check_rule(rule: Mapping[str, Any], index: int, base_lr: float | None) -> None:
    key = f"finetune.param_groups[{index}]"
    if not rule.get("params"):
        raise ConfigError(f"{key}.params must list at least one name pattern")
    lr_mult = rule.get("lr_mult", 1.0)
    if lr_mult <= 0:
        raise ConfigError(
            f"{key}.lr_mult={lr_mult} must be > 0; to stop params training, use finetune.freeze"
        )
    if lr_mult != 1.0 and base_lr is None:
        raise ConfigError(f"{key}.lr_mult needs optimizer.lr to be set")


def build_optimizer(
    make_optimizer: Callable[..., torch.optim.Optimizer],
    model: nn.Module,
    weight_decay: float,
    rules: Sequence[Mapping[str, Any]] = (),
    base_lr: float | None = None,
) -> torch.optim.Optimizer:
    """`make_optimizer` is the instantiated partial from the optimizer config."""
    groups = param_groups(model, weight_decay, rules, base_lr)
    if not groups:
        raise ConfigError(
            "no parameter is left to train: finetune.freeze froze them all; "
            "freeze fewer patterns or add finetune.lora.targets"
        )
    return make_optimizer(groups)
