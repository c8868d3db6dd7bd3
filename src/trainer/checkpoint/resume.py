"""Checkpoint files of a run and `resume=auto`: naming, retention, discovery.

A run's checkpoint folder holds:
- `step_<global step>.pt`: one per save (step/minute/epoch cadence, preemption,
  end of fit); the newest `checkpoint.keep_last_k` are kept.
- `last.pt`: the newest state, a hard link to the newest step file (no second write).
- `best.pt`: the state with the best monitored metric.
Retention only ever deletes step files, so last.pt and best.pt always survive.
With checkpoint.async_write, writes run on a background thread (checkpoint_writer.py).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint.io import link_checkpoint, load_checkpoint, save_checkpoint
from trainer.checkpoint.writer import BackgroundWriter, snapshot
from trainer.errors import CheckpointError, ConfigError, RunDirInUseError

log = logging.getLogger(__name__)

RESUME_MODES = (None, "auto")
_STEP_FILE = re.compile(r"step_(\d+)\.pt")


class CheckpointFiles:
    def __init__(
        self,
        folder: str | Path,
        save_last: bool = True,
        keep_last_k: int | None = 2,
        async_write: bool = False,
    ) -> None:
        if keep_last_k is not None and keep_last_k < 0:
            raise ConfigError(f"checkpoint.keep_last_k={keep_last_k} must be >= 0 (or null: all)")
        self.folder, self.save_last, self.keep_last_k = Path(folder), save_last, keep_last_k
        self.last, self.best = self.folder / "last.pt", self.folder / "best.pt"
        # checkpoint.async_write: writes run on this one background thread (see
        # checkpoint_writer.py); without it, on the caller's thread.
        self.writer = BackgroundWriter() if async_write else None

    @classmethod
    def from_config(cls, folder: str | Path, cfg: Any) -> CheckpointFiles:
        """The files of a `checkpoint` config section in `folder`."""
        return cls(folder, cfg.save_last, cfg.keep_last_k, cfg.async_write)

    def save(
        self, state: dict[str, Any] | None, step: int, same_as: Path | None = None
    ) -> Path | None:
        """Write the state of `step`; returns the file written (None if none is configured).

        `same_as` names a file that holds this very state (best.pt saved at the same
        step): it is hard-linked instead of written a second time. With async writes
        the file is written in the background and is on disk after `wait()`.
        """
        path = self.path_for(step)
        if path is not None:
            self._write(self._write_step, state, path, same_as)
        return path

    def path_for(self, step: int) -> Path | None:
        """The file a save of `step` writes (None if none is configured)."""
        if self.keep_last_k == 0:
            return self.last if self.save_last else None
        return self.folder / f"step_{step:08d}.pt"

    def save_best(self, state: dict[str, Any]) -> None:
        self._write(save_checkpoint, state, self.best)

    def wait(self) -> None:
        """Block until every save so far is on disk; raises the error of a failed write."""
        if self.writer is not None:
            self.writer.wait()

    def close(self, raise_error: bool = True) -> None:
        """`wait`, then stop the writer thread; `raise_error=False` only logs a failure."""
        if self.writer is not None:
            self.writer.close(raise_error)

    def _write(self, write: Callable[..., None], state: Any, *args: Any) -> None:
        if self.writer is None:
            write(state, *args)
            return
        # The loop goes on updating params and optimizer state in place: the file must
        # hold them as they are now. A link (state None) copies nothing and waits for
        # nothing; the writer runs it after the write of the file it links.
        if state is None:
            self.writer.submit(write, None, *args, after_pending=False)
        else:
            self.writer.submit(write, snapshot(state), *args)

    def _write_step(self, state: dict[str, Any] | None, path: Path, same_as: Path | None) -> None:
        if same_as is not None:
            link_checkpoint(same_as, path)
        else:
            save_checkpoint(state, path)
        if path != self.last:
            if self.save_last:
                link_checkpoint(path, self.last)
            self.prune()

    def step_files(self) -> list[Path]:
        """Step checkpoints, newest first."""
        found = []
        for path in self.folder.glob("step_*.pt"):
            match = _STEP_FILE.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found, reverse=True)]

    def prune(self) -> None:
        if self.keep_last_k is None:
            return
        for path in self.step_files()[self.keep_last_k :]:
            path.unlink(missing_ok=True)

    def remove_partial_writes(self) -> int:
        """Delete temp files of writes that a crash interrupted (never a finished file)."""
        partial = list(self.folder.glob(".*.tmp")) if self.folder.is_dir() else []
        for path in partial:
            path.unlink(missing_ok=True)
        return len(partial)

    def candidates(self) -> list[Path]:
        """Files to resume from, newest first."""
        files = self.step_files()
        if self.last.is_file() and not any(_same_file(self.last, p) for p in files):
            files.append(self.last)
        return files


def find_resume_state(
    files: CheckpointFiles, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads; unreadable newer ones are reported and skipped."""
    removed = files.remove_partial_writes()
    if removed:
        log.info("removed %d unfinished checkpoint write(s) from %s", removed, files.folder)
    candidates = files.candidates()
    problems = []
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as e:
            problems.append(str(e))
            log.warning("resume=auto: skipping unusable checkpoint: %s", e)
            continue
        if problems:
            log.warning(
                "resume=auto: resuming from the previous checkpoint %s instead "
                "(%d newer file(s) skipped)",
                path,
                len(problems),
            )
        return state, path
    if problems:
        raise CheckpointError(
            f"resume=auto found {len(problems)} checkpoint(s) in {files.folder} but none "
            f"loads ({problems[-1]}); delete them to start over"
        )
    return None


def resume_state(
    cfg: Any, files: CheckpointFiles, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], str] | None:
    """What to resume from: this run's newest checkpoint (resume=auto), ckpt_path, or nothing."""
    _check_resume_mode(cfg)
    if cfg.resume == "auto":
        found = find_resume_state(files, map_location)
        if found is not None:
            return found[0], str(found[1])
        if not cfg.ckpt_path:
            log.info("resume=auto: no checkpoint in %s yet; starting from scratch", files.folder)
    else:
        check_run_dir_free(cfg, files.folder.parent, files)
    if cfg.ckpt_path:
        return load_checkpoint(cfg.ckpt_path, map_location), str(cfg.ckpt_path)
    return None


def check_run_dir_free(cfg: Any, output_dir: Path, files: CheckpointFiles | None = None) -> None:
    """Refuse a new run (no resume=auto) where an earlier run left checkpoints or results:
    it would overwrite them. Starting from ckpt_path=... is a new run too. Checked before
    anything is written, so a refused run leaves the folder as it was."""
    _check_resume_mode(cfg)
    if cfg.resume == "auto":
        return
    files = files or CheckpointFiles(output_dir / cfg.checkpoint.dirname)
    if files.candidates() or files.best.is_file():
        held = "checkpoints"
    elif _read_results(output_dir / "results.json").get("status") not in (None, "failed"):
        held = "the results (results.json)"
    else:
        return
    raise RunDirInUseError(
        f"{output_dir} already holds {held} of an earlier run; add resume=auto to continue "
        "it, or start a new run in another folder (run_id=..., hydra.run.dir=...)"
    )


def _check_resume_mode(cfg: Any) -> None:
    if cfg.resume not in RESUME_MODES:
        raise ConfigError(
            f"resume={cfg.resume!r} must be auto or null; to resume from a given file "
            "use ckpt_path=<file>"
        )


def finished_results(cfg: Any, output_dir: Path) -> dict[str, Any] | None:
    """With resume=auto, the results of a run that already finished in `output_dir`
    (a failed job's results.json does not count: the job runs again)."""
    path = output_dir / "results.json"
    if cfg.resume != "auto" or not path.is_file():
        return None
    results = _read_results(path)
    if not results:
        log.warning("resume=auto: %s is unreadable; running the job again", path)
        return None
    return None if results.get("status") == "failed" else results


def _read_results(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False
