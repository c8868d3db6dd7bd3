"""init_from: weights from a trainer checkpoint or a safetensors file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import save_file

from tests.conftest import compose_config
from tests.finetune.conftest import TINY_CNN
from trainer.checkpoint.io import load_checkpoint
from trainer.errors import CheckpointError, ConfigError
from trainer.finetune.pretrained import load_pretrained, parse_key_map, rename_keys


def tiny_cnn(tmp_path: Path, *overrides: str) -> torch.nn.Module:
    cfg = compose_config([*TINY_CNN, *overrides], tmp_path)
    torch.manual_seed(0)
    return instantiate(cfg.model, _convert_="all")


def test_new_class_count_reinitializes_the_head(pretrained_ckpt, tmp_path, caplog) -> None:
    pretrained = load_checkpoint(pretrained_ckpt)["model"]
    model = tiny_cnn(tmp_path, "data.num_classes=5")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(CheckpointError, match=r"head\.5\.weight.*skip_mismatched=true"):
        load_pretrained(model, pretrained_ckpt)
    with caplog.at_level(logging.WARNING, logger="trainer.finetune.pretrained"):
        report = load_pretrained(model, pretrained_ckpt, skip_mismatched=True)

    assert [m.split(" ")[0] for m in report.mismatched] == ["head.5.weight", "head.5.bias"]
    assert "re-initialized" in caplog.text and "head.5.weight (file [10, 32]" in caplog.text
    state = model.state_dict()
    for key, value in state.items():
        if key.startswith("head.5."):
            assert value.shape[0] == 5 and torch.equal(value, fresh[key]), key
        else:
            assert torch.equal(value, pretrained[key]), key


def test_exclude_keeps_fresh_weights_of_the_same_shape(pretrained_ckpt, tmp_path) -> None:
    pretrained = load_checkpoint(pretrained_ckpt)["model"]
    model = tiny_cnn(tmp_path)
    fresh = model.head[5].weight.detach().clone()
    report = load_pretrained(model, pretrained_ckpt, exclude=["head.5"])
    assert report.excluded == ["head.5.weight", "head.5.bias"]
    assert torch.equal(model.head[5].weight, fresh)
    assert torch.equal(model.head[2].weight, pretrained["head.2.weight"])


def test_safetensors_with_key_map_and_strict(pretrained_ckpt, tmp_path) -> None:
    pretrained = load_checkpoint(pretrained_ckpt)["model"]
    # A file from another framework: everything under `model.`, backbone named `backbone`.
    foreign = {
        "model." + k.replace("features.", "backbone.", 1): v.contiguous()
        for k, v in pretrained.items()
    }
    foreign["model.aux_head.weight"] = torch.zeros(3, 3)
    path = tmp_path / "foreign.safetensors"
    save_file(foreign, path)

    model = tiny_cnn(tmp_path)
    with pytest.raises(CheckpointError, match="missing: features.0.weight.*key_map"):
        load_pretrained(model, path)
    with pytest.raises(CheckpointError, match=r"unexpected: aux_head\.weight"):
        load_pretrained(model, path, key_map=["model:", "model.backbone:features"])
    report = load_pretrained(
        model, path, strict=False, key_map=["model:", "model.backbone:features"]
    )
    assert report.unexpected == ["aux_head.weight"] and not report.missing
    for key, value in model.state_dict().items():
        assert torch.equal(value, pretrained[key]), key


def test_key_map_parsing_and_bad_files(tmp_path) -> None:
    assert parse_key_map(["model:", ":backbone", "a.b.:c"]) == {
        "model": "",
        "": "backbone",
        "a.b": "c",
    }
    renamed = rename_keys({"x.w": 1, "a.b.w": 2}, {"": "backbone", "a.b": "c"})
    assert renamed == {"backbone.x.w": 1, "c.w": 2}  # the longest prefix wins
    with pytest.raises(ConfigError, match="old_prefix:new_prefix"):
        parse_key_map(["backbone"])

    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="does not exist; check finetune.init_from"):
        load_pretrained(model, tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(model, bad)
    with pytest.raises(CheckpointError, match="does not exist; check finetune.init_from"):
        load_pretrained(model, tmp_path / "nope.pt")
