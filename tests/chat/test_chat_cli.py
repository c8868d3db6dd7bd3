"""`python train.py task=dpo data=chatterbot_dpo` and SFT through the one loop, as users do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.chat.runs import tiny_config, tiny_run
from tests.conftest import REPO, run_cli


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", [0, 4])
def test_dpo_through_the_cli(
    tiny_llama_dir: Path, chatterbot_dir: Path, tmp_path: Path, lora_r: int
) -> None:
    args = tiny_run(
        tiny_llama_dir, chatterbot_dir, tmp_path, "task=dpo", "data=chatterbot_dpo",
        "task.beta=0.5", f"+model.lora_r={lora_r}",
    )  # fmt: skip
    proc = run_cli(args, REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["monitor"] == "val/reward_acc"
    metrics = results["metrics"]
    for name in ("loss", "reward_acc", "reward_margin", "chosen_reward", "rejected_reward", "kl"):
        assert f"val/{name}" in metrics
    # Six steps moved the policy away from its frozen reference (learning itself is
    # tested in test_dpo.py; six steps of a random model do not generalize).
    assert metrics["val/kl"] > 0 and 0 <= metrics["val/reward_acc"] <= 1
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_sft_and_a_dpo_mismatch_through_the_cli(
    tiny_llama_dir: Path, chatterbot_dir: Path, tmp_path: Path
) -> None:
    sft = tiny_run(
        tiny_llama_dir, chatterbot_dir, tmp_path / "sft", "task=language_modeling",
        "data=chatterbot_sft",
    )  # fmt: skip
    proc = run_cli(sft, REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "sft" / "results.json").read_text())["metrics"]
    assert metrics["val/loss"] > 0 and 0 <= metrics["val/token_acc"] <= 1

    wrong = tiny_run(
        tiny_llama_dir, chatterbot_dir, tmp_path / "wrong", "task=dpo", "data=chatterbot_sft"
    )
    proc = run_cli(wrong, REPO, timeout=600)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: task=dpo needs preference batches"), proc.stderr[-2000:]


@pytest.mark.slow
def test_dpo_resumed_mid_epoch_ends_with_the_same_weights(
    tiny_llama_dir: Path, chatterbot_dir: Path, tmp_path: Path
) -> None:
    """The frozen reference is the starting model in a resumed run too (it is copied
    before the checkpoint loads), so training on from step 2 equals a straight run."""
    from tests.conftest import compose_config
    from trainer.checkpoint.io import load_checkpoint
    from trainer.run import train

    def config(out: Path, *extra: str) -> Any:
        args = tiny_run(tiny_llama_dir, chatterbot_dir, out, "task=dpo", "data=chatterbot_dpo")
        overrides = [a for a in args[1:] if not a.startswith(("paths.", "hydra."))]
        return compose_config([*overrides, "trainer.limit_train_batches=4", *extra], out)

    train(config(tmp_path / "straight"))
    train(config(tmp_path / "first", "trainer.max_steps=2"))
    first = tmp_path / "first" / "checkpoints" / "last.pt"
    assert load_checkpoint(first)["global_step"] == 2
    train(config(tmp_path / "resumed", f"ckpt_path={first}"))
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert resumed["global_step"] == 4
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b, mid = resumed["model"], load_checkpoint(first)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], mid[k]) for k in a)  # steps 3 and 4 did train
