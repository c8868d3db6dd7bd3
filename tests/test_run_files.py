"""The lines a run logs about its files: paths a user can paste into a shell."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from trainer.run_files import run_file_lines, shown_path


def test_paths_are_relative_inside_the_current_folder_and_quoted(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "outputs" / "a") == "outputs/a"
    assert shown_path(Path("/elsewhere/run")) == "/elsewhere/run"
    odd = tmp_path / "my runs" / "it's"
    assert shlex.split(shown_path(odd)) == ["my runs/it's"]


@pytest.mark.parametrize("files", [["best.pt", "last.pt"], ["last.pt"], []])
def test_file_lines_name_what_exists(tmp_path, monkeypatch, files: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run 1"
    (run / "checkpoints").mkdir(parents=True)
    for name in files:
        (run / "checkpoints" / name).write_bytes(b"")
    lines = run_file_lines(run, run / "checkpoints", run / "tensorboard")
    assert lines[0] == "results file: 'run 1/results.json'"
    assert not any("tensorboard" in line for line in lines)  # no events written: none named
    evaluate = [line for line in lines if "eval.py" in line]
    if files:
        ckpt = f"run 1/checkpoints/{files[0]}"
        assert shlex.split(evaluate[0].split(": ", 1)[1]) == [
            "python",
            "eval.py",
            f"ckpt_path={ckpt}",
        ]
    else:
        assert evaluate == []
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"")
    lines = run_file_lines(run, run / "checkpoints", run / "tensorboard")
    assert "  view them: tensorboard --logdir 'run 1'" in lines
