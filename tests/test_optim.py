"""Parameter groups: lr multipliers and weight decay per pattern, through the schedulers."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_config
from trainer.errors import ConfigError
from trainer.finetune import prepare_model
from trainer.finetune.freeze import Unfreezer
from trainer.models.cnn import CNN
from trainer.optim import build_optimizer


def build(tmp_path, *overrides: str):
    cfg = compose_config(["model=cnn", *overrides], tmp_path)
    model = instantiate(cfg.model, _convert_="all")
    prepared = prepare_model(model, cfg.finetune)
    rules = [dict(r) for r in cfg.finetune.param_groups]
    optimizer = build_optimizer(
        instantiate(cfg.optimizer, _convert_="all"),
        model,
        cfg.optimizer.weight_decay,
        rules,
        cfg.optimizer.lr,
    )
    scheduler = None
    if cfg.scheduler.get("_target_"):
        scheduler = instantiate(cfg.scheduler, _convert_="all")(
            optimizer, total_steps=100, steps_per_epoch=10
        )
    return cfg, model, prepared, optimizer, scheduler


def by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine", "none"])
def test_backbone_at_a_tenth_of_the_lr_through_the_schedule(tmp_path, scheduler: str) -> None:
    cfg, model, _, optimizer, sched = build(tmp_path, "finetune=full", f"scheduler={scheduler}")
    groups = by_name(optimizer)
    assert set(groups) == {"group0/decay", "group0/no_decay", "default/decay", "default/no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    for name, group in groups.items():
        params = [names[id(p)] for p in group["params"]]
        assert all(n.startswith("features." if "group0" in name else "head.") for n in params)
        # Biases and norm weights get no decay, as without rules.
        assert group["weight_decay"] == (cfg.optimizer.weight_decay if "/decay" in name else 0.0)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    for _ in range(30):
        optimizer.step()
        if sched is not None:
            sched.step()
        lr_backbone, lr_head = groups["group0/decay"]["lr"], groups["default/decay"]["lr"]
        assert lr_backbone == pytest.approx(0.1 * lr_head, rel=1e-9)
        assert groups["group0/no_decay"]["lr"] == lr_backbone
    if scheduler == "none":
        assert lr_head == cfg.optimizer.lr


def test_weight_decay_per_pattern_and_first_rule_wins(tmp_path) -> None:
    _, _, _, optimizer, _ = build(
        tmp_path,
        "finetune.param_groups=[{params:[head.5],weight_decay:0.5,lr_mult:2},"
        "{params:[head.*],lr_mult:0.5}]",
    )
    groups = by_name(optimizer)
    assert len(groups["group0/decay"]["params"]) == 1  # head.5.weight only
    assert groups["group0/decay"]["weight_decay"] == 0.5
    assert groups["group0/no_decay"]["weight_decay"] == 0.0  # head.5.bias
    default_lr = groups["default/decay"]["lr"]
    assert groups["group0/decay"]["lr"] == pytest.approx(default_lr * 2)
    assert groups["group1/decay"]["lr"] == pytest.approx(default_lr * 0.5)


def test_bad_rules_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'backbone.*' matches no parameter"):
        build(tmp_path, "finetune.param_groups=[{params:[backbone.*]}]")
    with pytest.raises(ConfigError, match=r"lr_mult=0.0 must be > 0.*finetune.freeze"):
        build(tmp_path, "finetune.param_groups=[{params:[head.*],lr_mult:0}]")
    with pytest.raises(ConfigError, match="no parameter is left to train"):
        build(tmp_path, "finetune.freeze=[*]")
    with pytest.raises(ConfigError, match="unfreeze_at_epoch needs params"):
        build(tmp_path, "finetune.unfreeze_at_epoch=2")


def test_unfrozen_groups_join_a_running_schedule_and_round_trip(tmp_path) -> None:
    overrides = ["finetune=frozen_backbone", "scheduler=cosine", "scheduler.warmup_ratio=0"]
    _, model, prepared, optimizer, scheduler = build(tmp_path, *overrides)
    assert len(optimizer.param_groups) == 2  # the head only

    def make_unfreezer(model, prepared, optimizer, scheduler) -> Unfreezer:
        return Unfreezer(
            model,
            prepared.frozen,
            3,
            optimizer,
            scheduler,
            1e-2,
            [{"params": ["features.*"], "lr_mult": 0.1}],
            base_lr=3e-3,
            norm_hooks=prepared.norm_hooks,
        )

    unfreezer = make_unfreezer(model, prepared, optimizer, scheduler)
    for _ in range(40):
        optimizer.step()
        scheduler.step()
    assert not unfreezer(2) and len(optimizer.param_groups) == 2
    assert unfreezer(3) and not unfreezer(4)
    assert all(p.requires_grad for p in model.parameters())
    groups = by_name(optimizer)
    assert groups["group0/decay/unfrozen"]["lr"] == pytest.approx(
        0.1 * groups["default/decay"]["lr"]
    )
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    head_lr, backbone_lr = groups["default/decay"]["lr"], groups["group0/decay/unfrozen"]["lr"]
    assert backbone_lr == pytest.approx(0.1 * head_lr) and head_lr < 3e-3 * 0.7

    # A fresh run restores this state once its Unfreezer has run for the saved epoch.
    _, model2, prepared2, optimizer2, scheduler2 = build(tmp_path, *overrides)
    make_unfreezer(model2, prepared2, optimizer2, scheduler2)(3)
    optimizer2.load_state_dict(optimizer.state_dict())
    scheduler2.load_state_dict(scheduler.state_dict())
    optimizer.step(), scheduler.step(), optimizer2.step(), scheduler2.step()
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_no_weight_decay_on_biases_and_norm_weights() -> None:
    model = CNN(in_shape=(1, 28, 28), num_classes=10)
    optimizer = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3), model, 0.05)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    norm_and_bias = {
        id(p) for n, p in model.named_parameters() if n.endswith("bias") or p.ndim == 1
    }
    assert {id(p) for p in no_decay["params"]} == norm_and_bias
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
