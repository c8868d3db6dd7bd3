"""LoRA on a causal LM through the whole loop: exact resume with the adapters in the checkpoint.

Here the first run stops at max_steps, in this process; a real SIGKILL mid-epoch and
`resume=auto` through the CLI is tests/chat/test_chat_cli.py's sigkill test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config
from trainer.checkpoint.io import load_checkpoint

pytest.importorskip("peft")


def _run(tiny_llama: Path, out: Path, *extra: str) -> dict:
    from trainer.run import train

    overrides = [
        "model=hf_causal_lm",
        f"model.name_or_path={tiny_llama}",
        "data=synthetic",
        "data.kind=language_modeling",
        "data.vocab_size=300",
        "data.block_size=32",
        "data.size=96",
        "data.val_size=16",
        "data.test_size=16",
        "data.batch_size=8",
        "task=language_modeling",
        "finetune=lora_lm",
        "finetune.lora.dropout=0.1",  # resume must restore the dropout masks' RNG too
        "optimizer.lr=1e-2",
        "scheduler=none",
        "logger=none",
        "trainer.max_epochs=null",
        "trainer.limit_val_batches=1",
        "trainer.test_after_fit=false",
        "trainer.progress_bar=false",
        "trainer.deterministic=true",
        *extra,
    ]
    train(compose_config(overrides, out))
    return load_checkpoint(out / "checkpoints" / "last.pt")


def test_lora_run_resumed_mid_training_ends_with_equal_adapters(
    tiny_llama: Path, tmp_path: Path
) -> None:
    straight = _run(tiny_llama, tmp_path / "straight", "trainer.max_steps=6")
    first = _run(tiny_llama, tmp_path / "first", "trainer.max_steps=3")
    ckpt = tmp_path / "first" / "checkpoints" / "last.pt"
    resumed = _run(tiny_llama, tmp_path / "resumed", "trainer.max_steps=6", f"ckpt_path={ckpt}")

    adapters = [k for k in straight["model"] if ".lora_" in k]
    assert len(adapters) == 8  # A and B of q_proj and v_proj in 2 layers
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for key in adapters:  # the adapters trained, and only they did
        assert not torch.equal(first["model"][key], straight["model"][key]), key
    frozen = [k for k in straight["model"] if ".lora_" not in k]
    assert all(torch.equal(first["model"][k], straight["model"][k]) for k in frozen)
    trained = sum(len(g["params"]) for g in straight["optimizer"]["param_groups"])
    assert trained == len(adapters)
