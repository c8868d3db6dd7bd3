"""The IDX file format of MNIST-style datasets: parse, read and write.

An IDX file is a 4-byte magic (two zero bytes, a dtype code, the number of
dimensions), one big-endian uint32 per dimension, then the data, row-major and
big-endian. See http://yann.lecun.com/exdb/mnist/ ("FILE FORMATS").
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from trainer.errors import DataError

# dtype code -> (big-endian numpy dtype, torch dtype)
_DTYPES: dict[int, tuple[str, torch.dtype]] = {
    0x08: (">u1", torch.uint8),
    0x09: (">i1", torch.int8),
    0x0B: (">i2", torch.int16),
    0x0C: (">i4", torch.int32),
    0x0D: (">f4", torch.float32),
    0x0E: (">f8", torch.float64),
}
_CODES: dict[torch.dtype, int] = {tdt: code for code, (_, tdt) in _DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _bad(name: str, problem: str, fix: str) -> DataError:
    return DataError(f"{name} is not a valid IDX file: {problem}. {fix}")


_REFETCH = (
    "The file is damaged or is not a dataset file; delete it and fetch it again "
    "(run with data.download=true) or replace it with a good copy."
)


def parse_idx(raw: bytes, name: str) -> torch.Tensor:
    """Parse the (decompressed) bytes of an IDX file into a writable tensor.

    `name` is only used in error messages, to tell the user which file is bad.
    """
    view = memoryview(raw)
    if len(view) < 4:
        raise _bad(name, f"it has only {len(view)} bytes, fewer than the 4-byte header", _REFETCH)
    if bytes(view[:2]) != b"\x00\x00":
        if bytes(view[:2]) == _GZIP_MAGIC:
            raise _bad(
                name,
                "it is still gzip-compressed",
                "Decompress it first (gunzip), or read it with read_idx().",
            )
        raise _bad(name, f"bad magic number 0x{bytes(view[:4]).hex()}", _REFETCH)
    code, ndim = view[2], view[3]
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise _bad(name, f"unknown dtype code 0x{code:02X} (known: {known})", _REFETCH)
    header = 4 + 4 * ndim
    if len(view) < header:
        raise _bad(
            name,
            f"truncated header: {ndim} dimensions need {header} bytes, the file has {len(view)}",
            _REFETCH,
        )
    shape = tuple(int(d) for d in np.frombuffer(view, dtype=">u4", count=ndim, offset=4))
    be_dtype, torch_dtype = _DTYPES[code]
    itemsize = np.dtype(be_dtype).itemsize
    count = 1
    for d in shape:
        count *= d
    expected = header + count * itemsize
    if len(view) < expected:
        raise _bad(
            name,
            f"truncated data: shape {shape} needs {expected} bytes, the file has {len(view)}",
            _REFETCH,
        )
    if len(view) > expected:
        raise _bad(
            name,
            f"{len(view) - expected} trailing bytes after the data of shape {shape} "
            f"(expected {expected} bytes in all, the file has {len(view)})",
            _REFETCH,
        )
    data = np.frombuffer(view, dtype=be_dtype, count=count, offset=header)
    # astype copies, so the tensor owns writable, native-endian memory.
    native = data.astype(data.dtype.newbyteorder("="), copy=True).reshape(shape)
    return torch.from_numpy(native)


def gunzip(raw: bytes, name: str, max_size: int | None = None) -> bytes:
    """Decompress gzip bytes (all members), raising DataError if they are corrupt.

    `max_size` bounds the decompressed size, so a hostile download cannot
    exhaust memory.
    """
    out: list[bytes] = []
    total = 0
    data = raw
    try:
        while True:
            d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            limit = 0 if max_size is None else max_size - total + 1
            chunk = d.decompress(data, limit)
            total += len(chunk)
            out.append(chunk)
            if max_size is not None and total > max_size:
                raise DataError(
                    f"{name} decompresses to more than {max_size} bytes, far more than any "
                    f"file of this dataset; it is not the expected file. Delete it and fetch "
                    f"it again, or replace it with a good copy."
                )
            if not d.eof:
                raise DataError(
                    f"{name} is a truncated gzip file (the compressed stream ends early). "
                    f"{_REFETCH}"
                )
            data = d.unused_data
            # Concatenated gzip members are valid gzip; trailing zero padding is tolerated
            # the way gzip(1) tolerates it.
            if not data or not data.strip(b"\x00"):
                break
            if data[:2] != _GZIP_MAGIC:
                raise DataError(f"{name} has trailing garbage after its gzip data. {_REFETCH}")
    except zlib.error as e:
        raise DataError(f"{name} is not a valid gzip file ({e}). {_REFETCH}") from None
    return b"".join(out)


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file, gzip-compressed (by name `.gz` or by content) or raw."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"Dataset file {path} does not exist. Put the file there, point "
            f"TRAINER_DATA_DIR at the folder that has it, or run with data.download=true."
        ) from None
    except OSError as e:
        raise DataError(f"Cannot read dataset file {path}: {e}. Check its permissions.") from None
    if path.suffix == ".gz" or raw[:2] == _GZIP_MAGIC:
        raw = gunzip(raw, str(path))
    return parse_idx(raw, str(path))


def encode_idx(tensor: torch.Tensor) -> bytes:
    """The canonical IDX bytes of `tensor` (big-endian, row-major)."""
    code = _CODES.get(tensor.dtype)
    if code is None:
        supported = ", ".join(str(d) for d in _CODES)
        raise TypeError(f"IDX cannot store dtype {tensor.dtype}; supported: {supported}")
    if tensor.dim() > 255:
        raise ValueError(f"IDX stores at most 255 dimensions, got {tensor.dim()}")
    array = tensor.detach().cpu().contiguous().numpy()
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(_DTYPES[code][0], copy=False).tobytes()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and os.replace.

    Readers (or a crash mid-write) never see a partial file at `path`.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_idx(path: str | os.PathLike[str], tensor: torch.Tensor) -> None:
    """Write `tensor` as a canonical IDX file, gzip-compressed if `path` ends with .gz."""
    data = encode_idx(tensor)
    if str(path).endswith(".gz"):
        # mtime=0 keeps the .gz bytes reproducible; level 6 is far faster than 9 on
        # 47 MB of images and barely larger.
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write_bytes(path, data)
