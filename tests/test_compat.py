"""The task-agnostic loop trains classification exactly as the image-only trainer did.

The hash below is of the final weights the trainer produced before tasks existed
(commit 64d3f00) for RECIPE; the fixture is that commit's mid-epoch checkpoint
(step 5) of the same run. Same seed and config must give the same bits, and an
old checkpoint must still resume to them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from trainer.checkpoint.io import load_checkpoint
from trainer.run import train

RECIPE = [
    "model.hidden_sizes=[8]",
    "trainer.deterministic=true",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=10",
    "trainer.limit_val_batches=2",
    "checkpoint.every_n_steps=5",
    "checkpoint.keep_last_k=null",
    "checkpoint.async_write=false",
]
WEIGHTS_BEFORE_TASKS = "bd3d06e75df6cdd13155512af75d5c9b095bb5c37239b7fece321f3016bf95d1"
OLD_CHECKPOINT = Path(__file__).parent / "fixtures" / "main_v1_mlp8_step5.pt"


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_classification_gives_the_weights_of_the_image_only_trainer(make_config) -> None:
    cfg = make_config(*RECIPE)
    assert cfg.task._target_.endswith("ClassificationTask")  # the default task
    train(cfg)
    last = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.pt")
    assert weights_hash(last["model"]) == WEIGHTS_BEFORE_TASKS


def test_a_checkpoint_of_the_image_only_trainer_resumes_to_the_same_weights(
    make_config,
) -> None:
    old = torch.load(OLD_CHECKPOINT, weights_only=True)
    assert "task" not in old["config"] and old["global_step"] == 5  # written before tasks
    cfg = make_config(*RECIPE, f"ckpt_path={OLD_CHECKPOINT}")
    train(cfg)
    last = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.pt")
    assert weights_hash(last["model"]) == WEIGHTS_BEFORE_TASKS
