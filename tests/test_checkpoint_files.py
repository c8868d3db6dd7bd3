"""Checkpoint files without training: retention, discovery, safe loading, naming."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config
from trainer.checkpoint import resume
from trainer.checkpoint.io import capture_rng, load_checkpoint, save_checkpoint
from trainer.checkpoint.resume import CheckpointFiles, find_resume_state
from trainer.config.schema import job_dirname
from trainer.errors import CheckpointError, ConfigError
from trainer.loop.nan_guard import NanGuard
from trainer.models.mlp import MLP


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
    with caplog.at_level(logging.INFO, logger="trainer.checkpoint.resume"):
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


# ------------------------------------------------ background writes (checkpoint.async_write)
def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("checkpoint-write")]


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A real model whose AdamW moments exist: the state a checkpoint holds."""
    model = MLP([1, 28, 28], 10, hidden_sizes=[16])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    return model, optimizer


def _train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng(),
        "global_step": step,
    }


def test_async_save_writes_the_state_as_of_the_save_call(tmp_path: Path, monkeypatch) -> None:
    model, optimizer = _model_and_optimizer()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    release, real_save = threading.Event(), resume.save_checkpoint

    def held_back_save(state: dict, path: Path) -> None:
        assert release.wait(30), "the test never released the write"
        real_save(state, path)

    monkeypatch.setattr(resume, "save_checkpoint", held_back_save)
    files = CheckpointFiles(tmp_path, keep_last_k=2, async_write=True)
    assert not _writer_threads()  # nothing saved yet: no thread
    path = files.save(_train_state(model, optimizer, 1), 1)
    assert path == tmp_path / "step_00000001.pt" and not path.exists()  # still being written
    (writer,) = _writer_threads()
    assert not writer.daemon  # never frozen mid-write at interpreter exit
    # Training goes on in place while the write waits.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    release.set()
    files.wait()
    saved = load_checkpoint(path)
    for key, tensor in expected.items():
        assert torch.equal(saved["model"][key], tensor), key
        assert not torch.equal(model.state_dict()[key], tensor), key
    for key, tensor in moments.items():
        assert torch.equal(saved["optimizer"]["state"][0][key], tensor), key
    assert files.last.samefile(path)
    files.close()
    writer.join(5)
    assert not writer.is_alive() and not _writer_threads()


def test_async_writes_run_in_order_so_a_link_finds_best(tmp_path: Path, monkeypatch) -> None:
    model, optimizer = _model_and_optimizer()
    real_save = resume.save_checkpoint

    def slow_save(state: dict, path: Path) -> None:
        time.sleep(0.2)
        real_save(state, path)

    monkeypatch.setattr(resume, "save_checkpoint", slow_save)
    files = CheckpointFiles(tmp_path, keep_last_k=2, async_write=True)
    files.save_best(_train_state(model, optimizer, 3))
    # best.pt holds step 3: linked as the step file, which needs best.pt written first.
    # The link is queued behind that write: the training thread does not wait for it.
    started = time.perf_counter()
    assert files.save(None, 3, same_as=files.best) == tmp_path / "step_00000003.pt"
    assert time.perf_counter() - started < 0.1
    assert not (tmp_path / "step_00000003.pt").exists()
    files.close()
    assert (tmp_path / "step_00000003.pt").samefile(files.best)
    assert files.last.samefile(files.best) and load_checkpoint(files.last)["global_step"] == 3


def test_a_link_queued_behind_a_failed_write_is_skipped(tmp_path: Path, full_disk) -> None:
    model, optimizer = _model_and_optimizer()
    files = CheckpointFiles(tmp_path, keep_last_k=2, async_write=True)
    files.save_best(_train_state(model, optimizer, 1))
    files.save(None, 1, same_as=files.best)
    files.wait()
    full_disk()
    files.save_best(_train_state(model, optimizer, 2))  # fails in the background
    # Linking the old best.pt (step 1) as step 2's file would label it wrongly.
    files.save(None, 2, same_as=files.best)
    with pytest.raises(CheckpointError, match="No space left on device"):
        files.wait()
    assert not (tmp_path / "step_00000002.pt").exists()
    assert load_checkpoint(files.last)["global_step"] == 1
    files.close()


def test_failed_async_write_is_raised_on_the_training_thread(tmp_path: Path, full_disk) -> None:
    model, optimizer = _model_and_optimizer()
    files = CheckpointFiles(tmp_path, keep_last_k=2, async_write=True)
    files.save_best(_train_state(model, optimizer, 1))
    files.save(_train_state(model, optimizer, 1), 1)
    files.wait()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    full_disk()
    files.save_best(_train_state(model, optimizer, 2))  # returns: it fails in the background
    with pytest.raises(CheckpointError) as error:
        files.wait()
    assert threading.current_thread() is threading.main_thread()
    message = str(error.value)
    assert f"could not write checkpoint {files.best}: No space left on device" in message
    assert "the previous checkpoint there is intact" in message and "\n" not in message
    files.wait()  # raised once, not again
    # A failure is also raised by the next save, before anything else is queued.
    assert files.save(_train_state(model, optimizer, 2), 2) == tmp_path / "step_00000002.pt"
    with pytest.raises(CheckpointError, match=r"step_00000002\.pt: No space.*nothing was saved"):
        files.save(_train_state(model, optimizer, 3), 3)
    files.close()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no temp files; best.pt and step 1 (and last.pt) as they were
    assert load_checkpoint(files.best)["global_step"] == 1
    assert load_checkpoint(files.last)["global_step"] == 1


def test_async_copy_keeps_tied_weights_shared(tmp_path: Path) -> None:
    """An embedding tied to the output layer is one tensor: the background write stores it
    once, as torch.save does, and it loads back tied."""
    model = torch.nn.ModuleDict(
        {"embed": torch.nn.Embedding(1000, 64), "out": torch.nn.Linear(64, 1000)}
    )
    model["out"].weight = model["embed"].weight
    state = {"model": model.state_dict(), "global_step": 1}
    save_checkpoint(state, tmp_path / "sync.pt")
    files = CheckpointFiles(tmp_path / "async", keep_last_k=0, async_write=True)
    files.save(state, 1)
    files.close()
    written = tmp_path / "async" / "last.pt"
    assert written.stat().st_size == pytest.approx((tmp_path / "sync.pt").stat().st_size, rel=0.02)
    loaded = load_checkpoint(written)["model"]
    embed, out = loaded["embed.weight"], loaded["out.weight"]
    assert embed.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    assert torch.equal(embed, model["embed"].weight.detach())
