from __future__ import annotations

import os
import pickle
import random

import pytest
import torch

from trainer.checkpoint.io import (
    capture_rng,
    link_checkpoint,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
)
from trainer.errors import CheckpointError


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path) -> None:
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(2))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise OSError("disk full")

    with pytest.raises(CheckpointError, match="disk full.*previous checkpoint there is intact"):
        save_checkpoint({"model": {"w": Unpicklable()}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused unread.*system"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="checkpoint"):
        # Protocol 2, torch.load's own: another protocol would only add torch's warning.
        (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2], protocol=2))
        load_checkpoint(tmp_path / "junk.pt")


def test_truncated_and_newer_checkpoints_are_refused(tmp_path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(1000)}}, path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"model": {}, "format_version": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_model_mismatch_names_keys_and_shapes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2)).state_dict()
    with pytest.raises(
        CheckpointError, match=r"0.weight \(checkpoint \[5, 4\] vs model \[3, 4\]\)"
    ):
        load_model_state(model, state, "ckpt")
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    load_model_state(model, wrapped, "ckpt")  # DDP and compile prefixes are stripped


def test_rng_round_trip_through_weights_only(tmp_path) -> None:
    import numpy as np

    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_linked_checkpoints_change_independently(tmp_path) -> None:
    save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "best.pt")
    link_checkpoint(tmp_path / "best.pt", tmp_path / "last.pt")
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["model"]["w"], torch.ones(2))
    save_checkpoint({"model": {"w": torch.zeros(2)}}, tmp_path / "last.pt")
    assert torch.equal(load_checkpoint(tmp_path / "best.pt")["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
