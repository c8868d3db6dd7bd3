"""Checks on what a finished `python train.py` run wrote, shared by the resume tests of
every model (MNIST in test_resume.py, the GPT in test_gpt_guarantees.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.checkpoint.io import load_checkpoint


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard scalar of a run, in the order written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_same_final_state(expected: Path, actual: Path, steps: int, tags: list[str]) -> None:
    """Two runs ended bit for bit alike: weights, optimizer, scheduler, results and the
    TensorBoard curves of `tags` (no duplicate or out-of-order points)."""
    a = load_checkpoint(expected / "checkpoints" / "last.pt")
    b = load_checkpoint(actual / "checkpoints" / "last.pt")
    assert a["global_step"] == b["global_step"] == steps
    assert a["model"].keys() == b["model"].keys()
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for index, param_state in a["optimizer"]["state"].items():
        for key, value in param_state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    assert a["scheduler"] == b["scheduler"]
    ra = json.loads((expected / "results.json").read_text())
    rb = json.loads((actual / "results.json").read_text())
    assert ra["metrics"] == rb["metrics"] and ra["best_step"] == rb["best_step"]
    for tag in tags:
        assert scalars(expected, tag) == scalars(actual, tag), tag
