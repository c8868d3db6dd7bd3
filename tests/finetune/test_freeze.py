"""Freezing keeps params bit-identical; gradual unfreezing trains them later and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import REPO, compose_config, run_cli
from tests.finetune.conftest import TINY_CNN
from trainer.checkpoint.io import load_checkpoint
from trainer.run import train

TINY_MLP = [
    "model.hidden_sizes=[32]",
    "trainer.limit_val_batches=1",
    "trainer.test_after_fit=false",
    "trainer.progress_bar=false",
    "logger=none",
]


def test_frozen_backbone_stays_bit_identical(pretrained_ckpt: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        [
            *TINY_CNN,
            "data=fashion_mnist",
            "finetune=frozen_backbone",
            f"finetune.init_from={pretrained_ckpt}",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=15",
        ],
        tmp_path,
    )
    train(cfg)
    before = load_checkpoint(pretrained_ckpt)["model"]
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    after = state["model"]
    for key, value in before.items():
        if key.startswith("features."):
            # Batch-norm running statistics included: the backbone computes what it did.
            assert torch.equal(after[key], value), key
        else:
            assert not torch.equal(after[key], value), key
    head = [k for k in before if k.startswith("head.")]
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(head)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["trainable_params"] == sum(before[k].numel() for k in head)


def test_gradual_unfreezing_trains_after_the_epoch_and_resumes_exactly(tmp_path: Path) -> None:
    train(
        compose_config(
            [*TINY_MLP, "trainer.max_epochs=1", "trainer.limit_train_batches=5"],
            tmp_path / "pre",
        )
    )
    init = load_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")["model"]
    common = [
        *TINY_MLP,
        f"finetune.init_from={tmp_path / 'pre' / 'checkpoints' / 'last.pt'}",
        "finetune.freeze=[net.1]",
        "finetune.unfreeze_at_epoch=1",
        "finetune.param_groups=[{params:[net.1],lr_mult:0.5}]",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=10",
    ]
    train(compose_config(common, tmp_path / "straight"))
    # The same run stopped after epoch 1 (stop_at is met at once), then resumed.
    train(compose_config([*common, "trainer.stop_at=0"], tmp_path / "first"))
    first = load_checkpoint(tmp_path / "first" / "checkpoints" / "last.pt")
    assert first["epoch"] == 1
    for key in ("net.1.weight", "net.1.bias"):
        assert torch.equal(first["model"][key], init[key]), key  # frozen during epoch 0
    assert not torch.equal(first["model"]["net.4.weight"], init["net.4.weight"])
    resume = f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.pt'}"
    train(compose_config([*common, resume], tmp_path / "resumed"))

    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key in ("net.1.weight", "net.1.bias"):
        assert not torch.equal(straight["model"][key], init[key]), key  # trained in epoch 1
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    groups = straight["optimizer"]["param_groups"]
    names = [g["name"] for g in groups]
    assert names == [
        "default/decay",
        "default/no_decay",
        "group0/decay/unfrozen",
        "group0/no_decay/unfrozen",
    ]
    # The unfrozen groups follow the schedule at half the lr of the others.
    assert groups[2]["lr"] == groups[0]["lr"] * 0.5 and groups[2]["max_lr"] > 0
    assert groups[3]["weight_decay"] == 0.0
    assert straight["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()


def test_a_freeze_pattern_that_matches_nothing_is_one_clear_error(tmp_path: Path) -> None:
    done = run_cli(
        [
            str(REPO / "train.py"),
            "finetune.freeze=[features.*]",
            "trainer=debug",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: finetune.freeze pattern 'features.*' matches no parameter; the model's "
        "parameters are: net.1.weight, net.1.bias, net.4.weight, net.4.bias, net.7.weight, "
        "net.7.bias"
    ]
