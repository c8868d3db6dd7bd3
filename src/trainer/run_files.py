"""Where a run's files went, in words a user can paste: logged at its start and end.

The run folder is named by Hydra (a date and time, or the run_id), so without
these lines a user would have to go looking for it.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

log = logging.getLogger(__name__)


def shown_path(path: Path) -> str:
    """`path` relative to the current folder when it lies inside it (shorter to paste),
    else absolute; quoted for a POSIX shell when it needs to be."""
    path = Path(path).absolute()
    try:
        text = str(path.relative_to(Path.cwd()))
    except ValueError:
        text = str(path)
    return shlex.quote(text)


def log_run_folder(output_dir: Path) -> None:
    log.info("run folder: %s", shown_path(output_dir))


def run_file_lines(
    output_dir: Path, checkpoint_dir: Path, tensorboard_dir: Path | None
) -> list[str]:
    """What a finished run left and the commands to look at it, one line each."""
    lines = [f"results file: {shown_path(output_dir / 'results.json')}"]
    best, last = checkpoint_dir / "best.pt", checkpoint_dir / "last.pt"
    ckpt = best if best.is_file() else last if last.is_file() else None
    if ckpt is not None:
        saved = ", ".join(shown_path(p) for p in (best, last) if p.is_file())
        lines.append(f"checkpoints: {saved}")
    if tensorboard_dir is not None and any(tensorboard_dir.glob("events.out.tfevents.*")):
        lines.append(f"TensorBoard events: {shown_path(tensorboard_dir)}")
        lines.append(f"  view them: tensorboard --logdir {shown_path(output_dir)}")
    if ckpt is not None:
        lines.append(f"  evaluate: python eval.py ckpt_path={shown_path(ckpt)}")
    return lines


def log_run_files(output_dir: Path, checkpoint_dir: Path, tensorboard_dir: Path | None) -> None:
    for line in run_file_lines(output_dir, checkpoint_dir, tensorboard_dir):
        log.info("%s", line)
