"""A tiny CNN pre-trained on MNIST, shared by the fine-tuning tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import compose_config, require_data

# Small enough for a 2-core CPU: a few seconds per run.
TINY_CNN = [
    "model=cnn",
    "model.channels=[8,16]",
    "model.hidden_size=32",
    "data.batch_size=64",
    "trainer.limit_val_batches=1",
    "trainer.test_after_fit=false",
    "trainer.progress_bar=false",
    "logger=none",
]


@pytest.fixture(scope="session")
def pretrained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a short MNIST run of the tiny CNN."""
    from trainer.run import train

    require_data()
    out = tmp_path_factory.mktemp("pretrain")
    cfg = compose_config([*TINY_CNN, "trainer.max_epochs=1", "trainer.limit_train_batches=30"], out)
    train(cfg)
    return out / "checkpoints" / "best.pt"
