"""Checkpoint files without training: retention, discovery, safe loading, naming."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import job_dirname
from trainer.errors import CheckpointError, ConfigError
from trainer.nan_guard import NanGuard
from trainer.resume import CheckpointFiles, find_resume_state


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "global_step": step}


def test_keep_last_k_rotates_step_files_and_never_touches_last_or_best(tmp_path: Path) -> None:
    files = CheckpointFiles(tmp_path, save_last=True, keep_last_k=2)
    files.save_best(_state(2))
    for step in (1, 2, 3, 4, 5):
        files.save(_state(step), step)
    assert [p.name for p in files.step_files()] == ["step_00000005.pt", "step_00000004.pt"]
    assert files.last.samefile(tmp_path / "step_00000005.pt")  # a link, not a second write
    assert load_checkpoint(files.best)["global_step"] == 2
    # Deleting every step file leaves last.pt and best.pt readable.
    for path in files.step_files():
        path.unlink()
    assert load_checkpoint(files.last)["global_step"] == 5
    assert load_checkpoint(files.best)["global_step"] == 2


def test_keep_all_and_keep_none(tmp_path: Path) -> None:
    keep_all = CheckpointFiles(tmp_path / "all", keep_last_k=None)
    for step in range(1, 6):
        keep_all.save(_state(step), step)
    assert len(keep_all.step_files()) == 5
    only_last = CheckpointFiles(tmp_path / "last", keep_last_k=0)
    for step in range(1, 4):
        only_last.save(_state(step), step)
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["last.pt"]
    assert load_checkpoint(only_last.last)["global_step"] == 3
    with pytest.raises(ConfigError, match="keep_last_k=-1"):
        CheckpointFiles(tmp_path, keep_last_k=-1)


def test_discovery_skips_damaged_newest_and_removes_partial_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = CheckpointFiles(tmp_path, keep_last_k=3)
    for step in (5, 10, 15):
        files.save(_state(step), step)
    (tmp_path / ".step_00000020.pt.abc.tmp").write_bytes(b"half a checkpoint")
    newest = tmp_path / "step_00000015.pt"
    newest.write_bytes(os.urandom(1000))  # also damages last.pt: the same file
    with caplog.at_level(logging.INFO, logger="trainer.resume"):
        state, path = find_resume_state(files)
    assert path.name == "step_00000010.pt" and state["global_step"] == 10
    assert "skipping unusable checkpoint" in caplog.text and str(newest) in caplog.text
    assert "resuming from the previous checkpoint" in caplog.text
    assert not list(tmp_path.glob(".*.tmp"))
    for path in files.step_files():
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="none loads"):
        find_resume_state(files)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_its_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused unread"):
        load_checkpoint(evil)
    assert not marker.exists()
    # The same file as the newest checkpoint of a run: skipped, the previous one used.
    files = CheckpointFiles(tmp_path / "ckpts")
    files.save(_state(1), 1)
    os.replace(evil, tmp_path / "ckpts" / "step_00000002.pt")
    _, path = find_resume_state(files)
    assert path.name == "step_00000001.pt" and not marker.exists()


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(_state(1), path)
    with pytest.raises(AttributeError):
        save_checkpoint({"model": {}, "bad": lambda: None}, path)  # unpicklable mid-write
    assert load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_deferred_nan_guard_records_first_bad_step_on_device() -> None:
    guard = NanGuard("error", 3, torch.device("cpu"))
    guard.check_every_batch = False  # the accelerator path, run on CPU tensors
    for step, value in [(1, 0.5), (2, 0.4), (3, float("inf")), (4, float("nan"))]:
        assert guard.observe(torch.tensor(value), step) is False  # nothing read back
    assert guard.recorded() == (3, float("inf"))
    with pytest.raises(ConfigError, match="nan_policy='ignore'"):
        NanGuard("ignore", 3, torch.device("cpu"))


def test_job_dirname_is_readable_and_safe() -> None:
    assert job_dirname("optimizer.lr=0.01,seed=1") == "optimizer.lr=0.01,seed=1"
    assert job_dirname("") == "default"
    with_path = job_dirname("data.data_dir=/a/b,seed=1")
    assert "/" not in with_path and with_path != job_dirname("data.data_dir=/a_b,seed=1")
    long = job_dirname("x" * 500)
    assert len(long) <= 200 and long != job_dirname("x" * 499)


def test_run_id_names_the_output_dirs() -> None:
    cfg = compose_config(["run_id=exp1"], config_name="train")
    assert cfg.run_id == "exp1"
    from hydra import compose, initialize_config_module

    with initialize_config_module("trainer.configs", version_base="1.3"):
        hydra_cfg = compose("train", ["run_id=exp1"], return_hydra_config=True).hydra
        assert hydra_cfg.run.dir == "outputs/exp1"
        assert hydra_cfg.sweep.dir == "multirun/exp1"
        stamped = compose("train", [], return_hydra_config=True).hydra
        assert stamped.run.dir.startswith("outputs/20")
