"""The data and task configs instantiate what they name, with their interpolations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import REPO
from trainer.data.chat import ChatDataset, PreferenceDataset
from trainer.tasks.dpo import DPOTask


def data_config(name: str, tiny_llama_dir: Path, data_dir: Path, **data: Any) -> Any:
    root = OmegaConf.create(
        {
            "model": {"name_or_path": str(tiny_llama_dir)},
            "paths": {"data_dir": str(data_dir)},
            "data": OmegaConf.load(REPO / "configs" / "data" / f"{name}.yaml"),
        }
    )
    root.data = OmegaConf.merge(root.data, data)
    return root


@pytest.mark.parametrize(("name", "kind"), [("sft", ChatDataset), ("dpo", PreferenceDataset)])
def test_chatterbot_configs(
    tiny_llama_dir: Path, chatterbot_dir: Path, tmp_path: Path, name: str, kind: type
) -> None:
    (tmp_path / "chatterbot_corpus").symlink_to(chatterbot_dir)
    cfg = data_config(f"chatterbot_{name}", tiny_llama_dir, tmp_path, val_size=0.02)
    assert cfg.data._target_ == "trainer.data.DatasetData"
    val = instantiate(cfg.data.val_dataset)
    # The training node names the same data; only its split differs (checked on val's size).
    train_as_val = instantiate(cfg.data.dataset, split="val")
    assert isinstance(val, kind) and len(val) == len(train_as_val) > 0
    batch = instantiate(cfg.data.collate_fn)([val[0], val[1]])
    assert all(v.shape[1] % 8 == 0 for v in batch.values())


@pytest.mark.parametrize(
    ("name", "row"),
    [
        ("jsonl_sft", {"prompt": "What is AI?", "completion": "Artificial intelligence."}),
        ("jsonl_dpo", {"prompt": "What is AI?", "chosen": "Intelligence.", "rejected": "Yes."}),
    ],
)
def test_jsonl_configs(tiny_llama_dir: Path, tmp_path: Path, name: str, row: dict) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    cfg = data_config(name, tiny_llama_dir, tmp_path)
    assert OmegaConf.is_missing(cfg.data.dataset, "path")  # the user must name the file
    cfg.data.dataset.path = str(path)
    dataset = instantiate(cfg.data.dataset)
    assert len(dataset) == 1
    batch = instantiate(cfg.data.collate_fn)([dataset[0]])
    assert all(isinstance(v, torch.Tensor) for v in batch.values())


def test_dpo_task_config() -> None:
    task = instantiate(OmegaConf.load(REPO / "configs" / "task" / "dpo.yaml"))
    assert isinstance(task, DPOTask)
    assert (task.monitor, task.monitor_mode, task.beta) == ("val/reward_acc", "max", 0.1)
