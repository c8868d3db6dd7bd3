"""Checkpoint files: atomic writes, safe loads, RNG capture.

A checkpoint is a plain dict of tensors and primitives, so it loads with
`torch.load(weights_only=True)`: no code inside a file can run on load.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import CheckpointError
from trainer.testing import fault_point

# 2 adds the in-epoch position, metric meters, NaN counters and the logger step.
FORMAT_VERSION = 2
# Wrappers add these to parameter names: DDP (`module.`) and torch.compile (`_orig_mod.`).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never a
    half-written file under the final name.
    """
    path = Path(path)
    tmp, writer = None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save({"format_version": FORMAT_VERSION, **state}, writer)
            f.flush()
            fault_point("save", path.name)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        write_error = _write_error(e, writer.error if writer else None)
        if write_error is None:
            raise
        kept = "the previous checkpoint there is intact" if path.exists() else "nothing was saved"
        raise CheckpointError(
            f"could not write checkpoint {path}: {write_error}; {kept}. Free disk space or "
            "point hydra.run.dir at another disk"
        ) from e
    _fsync_dir(path.parent)


def link_checkpoint(source: str | Path, path: str | Path) -> None:
    """Make `path` name the same file as `source`, atomically, without copying it.

    A hard link costs no I/O however big the checkpoint; where the filesystem has
    none, an fsynced copy takes its place. Either way `path` is replaced in one rename.
    """
    source, path = Path(source), Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        fault_point("save", path.name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # makes the rename itself durable
    finally:
        os.close(dir_fd)


class _RecordingWriter:
    """A file wrapper that keeps the OSError of a failed write.

    torch.save's zip writer turns a failed write (ENOSPC, EIO) into a RuntimeError
    that no longer says why; this keeps the reason for the error message.
    """

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def _write_error(error: BaseException, recorded: OSError | None) -> str | None:
    """The OS-level reason a checkpoint write failed, or None if it was something else."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if recorded is not None:
        return recorded.strerror or str(recorded)
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check ckpt_path")
    with path.open("rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (the legacy format is a pickle, protocol >= 2).
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{path} is not a readable checkpoint: not a file written by torch.save "
            "(corrupt, or not a checkpoint at all); check ckpt_path"
        )
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): not a whole zip archive"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a long essay; the line naming the offending global is the news.
        lines = str(e).splitlines() or [""]
        detail = next((ln.strip() for ln in lines if "global" in ln.lower()), lines[0])
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data, so it was "
            f"refused unread (nothing in it ran): {detail}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint written by this trainer")
    version = state.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this version's "
            f"{FORMAT_VERSION}; upgrade the trainer package to load it"
        )
    return state


def unwrapped_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP / torch.compile prefixes so checkpoints move between setups."""
    clean = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        clean[key] = value
    return clean


def check_state_fits(
    own: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], source: str
) -> None:
    """Fail naming every missing, unexpected or mis-shaped key of `state_dict` vs `own`."""
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k} (checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)})"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatch", mismatched),
    ):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            parts.append(f"{label}: {', '.join(keys[:5])}{more}")
    raise CheckpointError(
        f"{source} does not fit this model ({'; '.join(parts)}); was it made with "
        "another model or data config?"
    )


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, or fail naming every missing, unexpected or mis-shaped key."""
    state_dict = unwrapped_state_dict(state_dict)
    check_state_fits(unwrapped_state_dict(model.state_dict()), state_dict, source)
    model.load_state_dict(state_dict)


def capture_rng() -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only refuses: store it as a tensor.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype("int64")), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    # Python's random state must be nested tuples; keep it so after any round trip.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
