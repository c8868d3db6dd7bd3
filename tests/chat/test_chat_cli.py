"""`python train.py task=dpo data=chatterbot_dpo` and SFT through the one loop, as users do."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.chat.runs import tiny_config, tiny_run
from tests.conftest import REPO, run_cli
from trainer.checkpoint.io import load_checkpoint
from trainer.testing import KILL_IN_SAVE_ENV


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
def test_sft_through_the_cli(tiny_llama_dir: Path, chatterbot_dir: Path, tmp_path: Path) -> None:
    sft = tiny_run(
        tiny_llama_dir, chatterbot_dir, tmp_path / "sft", "task=language_modeling",
        "data=chatterbot_sft",
    )  # fmt: skip
    proc = run_cli(sft, REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "sft" / "results.json").read_text())["metrics"]
    assert metrics["val/loss"] > 0 and 0 <= metrics["val/token_acc"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "lora_lm"), [("sft", True), ("dpo", True), ("dpo", False)],
    ids=["sft-lora", "dpo-lora", "dpo-full"],
)  # fmt: skip
def test_sigkill_mid_epoch_then_resume_auto_ends_with_the_same_weights(
    tiny_llama_dir: Path, chatterbot_dir: Path, tmp_path: Path, task: str, lora_lm: bool
) -> None:
    """SIGKILLed while writing step 4's checkpoint, the rerun continues from step 2 of 6
    and ends bit for bit where an uninterrupted run ends: adapters, the RNG of LoRA's
    dropout (finetune=lora_lm's 0.05) and, for DPO without adapters, the frozen
    reference (a copy of the starting model, made before the checkpoint loads)."""
    from trainer.run import train

    data = ["task=language_modeling", "data=chatterbot_sft"] if task == "sft" else ["task=dpo"]
    data += [] if task == "sft" else ["data=chatterbot_dpo"]

    def args(out: Path, *extra: str) -> list[str]:
        return tiny_run(
            tiny_llama_dir, chatterbot_dir, out, *data, "checkpoint.every_n_steps=2", *extra,
            lora_lm=lora_lm,
        )  # fmt: skip

    straight, run = tmp_path / "straight", tmp_path / "run"
    train(tiny_config(args(straight), straight))
    killed = run_cli(args(run), REPO, timeout=600, env={KILL_IN_SAVE_ENV: "step_00000004.pt"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["global_step"] == 2
    resumed = run_cli(args(run, "resume=auto"), REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(run / "checkpoints" / "last.pt")
    assert a["global_step"] == b["global_step"] == 6
    assert a["model"].keys() == b["model"].keys()
    assert len([k for k in a["model"] if ".lora_" in k]) == (8 if lora_lm else 0)
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    results = [json.loads((r / "results.json").read_text())["metrics"] for r in (straight, run)]
    assert results[0] == results[1]
