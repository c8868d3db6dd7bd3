"""A corpus tokenized once, kept as a memory-mapped array of token ids.

The file name holds a digest of the corpus text, the tokenizer's fingerprint
and the split, so a changed corpus or tokenizer can never read a stale cache:
it simply names another file. Ids are stored as uint16 when the vocabulary
fits (as nanoGPT's train.bin), else uint32, raw and native-endian, so
`np.memmap` opens them with no header. Files are written by atomic rename.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trainer.data.corpora import user_cache_dir, writable_dir

log = logging.getLogger(__name__)

CACHE_FOLDER = "token_cache"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_name(corpus: str, text_sha: str, tokenizer_fp: str, split: str, dtype: np.dtype) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in corpus)[:64]
    return f"{safe}-{text_sha[:16]}-{tokenizer_fp[:16]}-{split}.{dtype.name}.bin"


def cache_dirs(corpus_path: Path, cache_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Where to look, in order: the configured folder, or beside the corpus then the
    user cache (which takes the write when the data folder is read-only)."""
    if cache_dir is not None:
        return [Path(cache_dir)]
    return [corpus_path.parent / CACHE_FOLDER, user_cache_dir() / "tokens"]


def cached_tokens(
    name: str, dirs: list[Path], encode: Callable[[], np.ndarray], vocab_size: int
) -> np.ndarray:
    """The memmap of `name` from the first folder that has it, else `encode()`d
    and written to the first writable folder. `encode` returns int64 ids."""
    for folder in dirs:
        path = folder / name
        if path.is_file():
            try:
                return _open(path)
            except (OSError, ValueError) as e:
                log.warning("token cache %s unreadable (%s); tokenizing again", path, e)
    ids = encode()
    dtype = token_dtype(vocab_size)
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids outside [0, {vocab_size}): {ids.min()}..{ids.max()}")
    array = ids.astype(dtype)
    for folder in dirs:
        if not writable_dir(folder):
            log.info("token cache: %s is read-only; trying the next folder", folder)
            continue
        path = folder / name
        try:
            _atomic_save(path, array)
        except OSError as e:
            log.warning("token cache: cannot write %s: %s", path, e)
            continue
        log.info("token cache: %d tokens written to %s", len(array), path)
        return _open(path)
    log.warning("token cache: no writable folder among %s; keeping tokens in memory", dirs)
    return array


def _open(path: Path) -> np.memmap:
    dtype = np.dtype(path.suffixes[-2].lstrip("."))
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"size {size} is not a multiple of {dtype.itemsize}")
    if size == 0:
        return np.zeros(0, dtype=dtype)  # type: ignore[return-value]
    # Copy-on-write: torch.from_numpy wants a writable array; the file never changes.
    return np.memmap(path, dtype=dtype, mode="c")


def _atomic_save(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            array.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is for every user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
